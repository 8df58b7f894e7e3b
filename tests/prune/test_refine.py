"""Layer refinement through prune_model(refine_steps=...)."""

import pytest
import torch

from blocksparse.prune import prune_model
from helpers import CALIB, make_tiny_llama, prune_tiny, sparse_layers


def test_refinement_keeps_the_block_pattern_and_lowers_every_layer_loss():
    plain, _ = prune_tiny(method="wanda")
    refined, report = prune_tiny(method="wanda", refine_steps=30)
    # Layer 0 sees the same inputs in both runs, so refinement must leave its masks as chosen;
    # later layers choose theirs on the refined layers' outputs.
    for name, m in sparse_layers(refined).items():
        assert len(set(m.block_mask.sum(1).tolist())) == 1, name
        if name.startswith("model.layers.0."):
            assert torch.equal(m.block_mask, sparse_layers(plain)[name].block_mask), name
    losses = report["refine"]["layer_loss_before_after"]
    assert set(losses) == {"0", "1"}
    assert all(after < before for before, after in losses.values()), losses
    reference = make_tiny_llama()(CALIB).logits
    error = {name: ((m(CALIB).logits - reference).norm() / reference.norm()).item()
             for name, m in (("plain", plain), ("refined", refined))}
    assert error["refined"] < error["plain"], error


def test_refinement_of_a_bfloat16_model_keeps_its_dtype_and_leaves_no_gradients():
    model = make_tiny_llama().to(torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    report = prune_model(model, CALIB, refine_steps=10, batch_size=4, convert=False, progress=False)
    assert {name: p.dtype for name, p in model.named_parameters()} == dtypes
    assert all(p.grad is None for p in model.parameters())
    losses = report["refine"]["layer_loss_before_after"].values()
    assert all(after < before for before, after in losses), losses


def test_bfloat16_refinement_steps_lower_the_fp32_loss_and_keep_the_pattern_and_dtypes():
    exact, exact_report = prune_tiny(method="wanda", refine_steps=30)
    fast, report = prune_tiny(method="wanda", refine_steps=30, refine_precision="bfloat16")
    assert report["refine"]["precision"] == "bfloat16"
    losses = report["refine"]["layer_loss_before_after"]
    # Layer 0 starts from the same fit in both runs and its loss is measured in fp32 either way.
    assert losses["0"][0] == exact_report["refine"]["layer_loss_before_after"]["0"][0]
    assert all(after < before for before, after in losses.values()), losses
    assert all(p.dtype == torch.float32 for p in fast.parameters())
    for name, m in sparse_layers(fast).items():
        if name.startswith("model.layers.0."):
            assert torch.equal(m.block_mask, sparse_layers(exact)[name].block_mask), name
    # The steps did run in bf16: the refined weights are not the fp32 run's.
    q = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(sparse_layers(fast)[q].sparse_weight.values, sparse_layers(exact)[q].sparse_weight.values)


def test_refinement_options_are_validated():
    with pytest.raises(ValueError, match="refine_steps"):
        prune_tiny(refine_steps=-1)
    with pytest.raises(ValueError, match="refine_lr"):
        prune_tiny(refine_steps=2, refine_lr=0.0)
    with pytest.raises(ValueError, match=r"refine_precision must be one of \('float32', 'bfloat16'\), got 'half'"):
        prune_tiny(refine_steps=2, refine_precision="half")
