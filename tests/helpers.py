"""Builders and references shared by the tests (fixtures live in conftest.py).

Tolerance rule (as in flash-attention's tests): a kernel's error against an
fp64 reference may be at most 2x the error of PyTorch's own dense op in the
same dtype, plus a small atol.
"""

import torch
import torch.nn.functional as F

# Tiny configs per family (blocksparse.families): every dim divides by 16.
TINY_DIMS = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


def make_tiny_model(model_type: str = "llama", num_layers: int = 2, seed: int = 0, **overrides):
    """A random causal LM of a family, small enough for CPU tests: hidden 64, MLP 128,
    4 heads, 2 KV heads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**TINY_DIMS, "num_hidden_layers": num_layers, **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


def make_tiny_llama(num_layers: int = 2, seed: int = 0, **overrides):
    """The tiny random Llama most tests use."""
    return make_tiny_model("llama", num_layers=num_layers, seed=seed, **overrides)


def byte_tokenizer():
    """A real fast tokenizer with one token per UTF-8 byte (ids 0..255, no special
    tokens): it fits the tiny models' vocabulary, and token counts are byte counts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def random_block_mask(n_block_rows, n_block_cols, density, generator=None, uniform_rows=False):
    """A bool block mask with about `density` of its blocks kept."""
    if uniform_rows:
        keep = round(density * n_block_cols)
        scores = torch.rand(n_block_rows, n_block_cols, generator=generator)
        mask = torch.zeros(n_block_rows, n_block_cols, dtype=torch.bool)
        if keep:
            mask.scatter_(1, scores.topk(keep, dim=1).indices, True)
        return mask
    return torch.rand(n_block_rows, n_block_cols, generator=generator) < density


def linear_lora(x, w_dense, bias=None, lora_a=None, lora_b=None, scaling=1.0, keep_mask=None, p=0.0):
    """The dense computation that block_sparse_linear must equal."""
    y = F.linear(x, w_dense, bias)
    if lora_a is not None:
        lora_in = x if keep_mask is None else x * keep_mask / (1.0 - p)
        y = y + scaling * F.linear(F.linear(lora_in, lora_a), lora_b)
    return y


def assert_matches_reference(out, reference64, torch_out, name="output"):
    """|out - ref| <= 2 |torch_out - ref| + atol, elementwise max; NaN never passes."""
    assert out.shape == reference64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(reference64.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    err = (out.double() - reference64).abs().max().item() if out.numel() else 0.0
    torch_err = (torch_out.double() - reference64).abs().max().item() if out.numel() else 0.0
    bound = 2 * torch_err + ATOL[out.dtype] * max(1.0, reference64.abs().max().item() if out.numel() else 1.0)
    assert err <= bound, (
        f"{name} ({out.dtype}): max error {err:.3e} exceeds 2 x torch's own {torch_err:.3e} + atol "
        f"(bound {bound:.3e})"
    )


# Calibration ids for the tiny models, and a prune of a fresh tiny Llama with them.
CALIB = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))


def prune_tiny(sparsity=0.5, block_size=16, **kwargs):
    """prune_model on a fresh tiny Llama with CALIB; returns (model, report)."""
    from blocksparse.prune import prune_model

    model = make_tiny_llama()
    report = prune_model(model, CALIB, sparsity=sparsity, block_size=block_size, batch_size=4,
                         progress=False, **kwargs)
    return model, report


def sparse_layers(model):
    """{name: BlockSparseLinear} of a model."""
    from blocksparse import BlockSparseLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, BlockSparseLinear)}


def masked_dense(linear, mask, b=16):
    """The weight of `linear` with the blocks outside `mask` zeroed."""
    return linear.weight.detach() * mask.repeat_interleave(b, 0).repeat_interleave(b, 1)


def fsdp_lora_worker(rank: int, world_size: int, init_file: str, out_file: str, steps: int = 3):
    """One rank of the FSDP2 test (tests/integration/test_fsdp.py), on the CPU with gloo: the
    pruned tiny Llama with LoRA on q/v, every decoder layer and the root `fully_shard`ed, a few
    AdamW steps on a batch of its own. Rank 0 writes what the test checks to `out_file` (JSON)."""
    import json

    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from blocksparse.integration.fsdp import end_process_group
    from blocksparse.integration.peft import get_peft_model, lora_config

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model, _ = prune_tiny()
        before = {name + ".sparse_weight": {key: t.detach().clone() for key, t in m.sparse_weight.state_dict().items()}
                  for name, m in sparse_layers(model).items()}
        model = get_peft_model(model, lora_config(r=4, lora_alpha=8, lora_dropout=0.0,
                                                  target_modules=["q_proj", "v_proj"]))
        model.train()
        ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(rank))
        with torch.no_grad():
            unsharded_loss = float(model(input_ids=ids, labels=ids).loss)
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        values = [m.sparse_weight.values for m in sparse_layers(model).values()]
        sharded = all(isinstance(v, DTensor) and v.to_local().shape[0] < v.shape[0] for v in values)
        local_fraction = sum(v.to_local().numel() for v in values) / sum(v.numel() for v in values)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss))
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            prefix = "base_model.model."
            unchanged = all(torch.equal(full[prefix + name.replace("q_proj", "q_proj.base_layer")
                                             .replace("v_proj", "v_proj.base_layer") + "." + key], t)
                            for name, tensors in before.items() for key, t in tensors.items())
            lora_b = [t for key, t in full.items() if "lora_B" in key]
            with open(out_file, "w") as f:
                json.dump({"sharded": sharded, "local_fraction": local_fraction, "unchanged": unchanged,
                           "losses": losses,
                           "unsharded_loss": unsharded_loss,
                           "lora_b_trained": all(bool(t.abs().sum() > 0) for t in lora_b),
                           "lora_b_count": len(lora_b), "values_count": len(values)}, f)
        del model, optimizer, values, full, loss
        dist.barrier()  # no rank tears its connections down while another still uses them
    except BaseException:
        dist.destroy_process_group()
        raise
    end_process_group()


def fsdp_skeleton_worker(rank: int, world_size: int, init_file: str, checkpoint: str, out_file: str):
    """One rank of the sharded-loading test (tests/integration/test_fsdp.py): the checkpoint's
    skeleton with LoRA, sharded, then each rank reading its own shards (`fsdp.load_weights`);
    rank 0 compares the gathered model with `load_sparse_pretrained` + the same LoRA."""
    import json

    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from blocksparse.integration.checkpoint import load_sparse_pretrained, sparse_skeleton
    from blocksparse.integration.fsdp import end_process_group, load_weights, shard_model
    from blocksparse.integration.peft import get_peft_model, lora_config

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        def with_lora(model):
            torch.manual_seed(0)
            return get_peft_model(model, lora_config(r=4, lora_alpha=8, lora_dropout=0.0,
                                                     target_modules=["q_proj", "v_proj"]))

        model = with_lora(sparse_skeleton(checkpoint)[0])
        shard_model(model)
        load_weights(model, checkpoint)
        values = [m.sparse_weight.values for m in sparse_layers(model).values()]
        local_fraction = sum(v.to_local().numel() for v in values) / sum(v.numel() for v in values)
        ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            reference = with_lora(load_sparse_pretrained(checkpoint)[0])
            expected = reference.state_dict()
            with torch.no_grad():
                same_logits = torch.equal(logits, reference(input_ids=ids).logits)
            with open(out_file, "w") as f:
                json.dump({"local_fraction": local_fraction, "same_logits": same_logits,
                           "same_keys": sorted(full) == sorted(k for k in expected if k in full),
                           "differ": [k for k in full if not torch.equal(full[k], expected[k])]}, f)
        del model, values, logits, full
        dist.barrier()  # no rank tears its connections down while another still uses them
    except BaseException:
        dist.destroy_process_group()
        raise
    end_process_group()
