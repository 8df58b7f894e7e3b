"""Block pruning (blocksparse.prune) on a tiny random Llama and on small matrices."""

import itertools

import pytest
import torch

from blocksparse import BlockSparseLinear
from blocksparse.integration import target_linears
from blocksparse.prune import (block_scores, explicit_densities, greedy_obs_mask, keep_counts,
                               output_error, owl_densities, prune_model, reconstruct_block_rows,
                               select_block_mask, sink_probe_ids, _InputStats, _slice_kwargs, _target_weight)
from conftest import make_tiny_llama

CALIB = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))
PROBE = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))


def _prune(sparsity=0.5, block_size=16, **kwargs):
    model = make_tiny_llama()
    report = prune_model(model, CALIB, sparsity=sparsity, block_size=block_size, batch_size=4,
                         progress=False, **kwargs)
    return model, report


def _sparse_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, BlockSparseLinear)}


@pytest.mark.parametrize("method", ["wanda", "obs", "magnitude", "obc"])
def test_every_block_row_keeps_the_same_number_of_blocks(method):
    model, report = _prune(method=method)
    layers = _sparse_layers(model)
    assert len(layers) == 2 * 7  # every q/k/v/o/gate/up/down of both layers
    for name, layer in layers.items():
        per_row = layer.block_mask.sum(1)
        assert per_row.tolist() == [layer.block_mask.shape[1] // 2] * layer.block_mask.shape[0], name
        assert report["layers"][name]["blocks_per_row"] == [layer.block_mask.shape[1] // 2]
        assert report["layers"][name]["zero_output_rows"] == 0
    assert report["total_density"] == 0.5


def test_pruned_weights_are_zero_outside_the_mask_and_model_still_runs():
    model, _ = _prune(method="wanda")
    for layer in _sparse_layers(model).values():
        dense = layer.to_dense()
        outside = ~layer.block_mask.repeat_interleave(16, 0).repeat_interleave(16, 1)
        assert torch.count_nonzero(dense[outside]) == 0
    assert torch.isfinite(model(PROBE).logits).all()


def test_global_group_keeps_half_of_each_matrix_with_uneven_rows():
    model, report = _prune(method="wanda", group="global", reconstruct=False)
    uneven = 0
    for name, layer in _sparse_layers(model).items():
        assert layer.block_mask.sum() == layer.block_mask.numel() // 2, name
        uneven += len(report["layers"][name]["blocks_per_row"]) > 1
    assert uneven > 0  # one threshold per matrix does not balance block rows
    assert report["total_density"] == 0.5


@pytest.mark.parametrize("block_size", [8, 32])
def test_other_block_sizes(block_size):
    model, report = _prune(block_size=block_size, sparsity=0.5, method="wanda")
    for layer in _sparse_layers(model).values():
        assert layer.block_size == block_size
        assert (layer.block_mask.sum(1) == layer.block_mask.shape[1] // 2).all()
    assert report["total_density"] == 0.5


def test_block_size_that_does_not_divide_a_matrix_is_refused():
    # k_proj/v_proj have 2 KV heads x 16 = 32 outputs: not a multiple of 64.
    with pytest.raises(ValueError, match=r"k_proj.*block_size=64"):
        _prune(block_size=64)


def test_sparsity_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        _prune(sparsity=1.0)


def test_convert_false_leaves_masked_dense_linears():
    model, report = _prune(method="wanda", convert=False)
    assert not _sparse_layers(model)
    lin = target_linears(model)["model.layers.0.mlp.down_proj"]
    blocks = lin.weight.reshape(4, 16, 8, 16).abs().sum(dim=(1, 3)) > 0
    assert (blocks.sum(1) == 4).all()


# ----------------------------------------------------------------- scores and masks
def test_block_scores_match_their_definitions():
    torch.manual_seed(0)
    w, sq = torch.randn(16, 32), torch.rand(32)
    wanda = block_scores(w, sq, 8, "wanda")
    assert wanda.shape == (2, 4)
    assert torch.allclose(wanda[1, 2], (w[8:16, 16:24].abs() * sq[16:24].sqrt()).sum())
    obs = block_scores(w, sq, 8, "obs")
    assert torch.allclose(obs[0, 3], (w[0:8, 24:32].square() * sq[24:32]).sum())
    assert torch.allclose(block_scores(w, None, 8, "magnitude")[1, 0], w[8:16, 0:8].abs().sum())


def test_select_block_mask_rows_and_global():
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0], [1.0, 2.0, 3.0, 4.0]])
    row = select_block_mask(scores, 2, "block-row")
    assert row.tolist() == [[True, True, False, False], [False, False, True, True]]
    glob = select_block_mask(scores, 2, "global")
    assert glob.tolist() == [[True, True, True, True], [False, False, False, False]]


# ----------------------------------------------------------------- reconstruction
def _problem(n=16, k=32, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g) @ torch.randn(k, k, generator=g)  # correlated inputs
    w = torch.randn(n, k, generator=g)
    return w, x, (x.T @ x).double()


def test_reconstruction_is_the_least_squares_solution_and_lowers_the_error():
    w, x, gram = _problem()
    mask = select_block_mask(block_scores(w, gram.diagonal(), 8, "wanda"), 2)
    masked = w * mask.repeat_interleave(8, 0).repeat_interleave(8, 1)
    solved = reconstruct_block_rows(w, mask, gram, damp=1e-8)
    assert output_error(w, solved, gram) < 0.6 * output_error(w, masked, gram)
    for r in range(2):  # each block row: lstsq on the kept columns
        cols = torch.nonzero(mask[r]).flatten()
        idx = (cols[:, None] * 8 + torch.arange(8)).flatten()
        ref = torch.linalg.lstsq(x[:, idx].double(), (x @ w[8 * r:8 * r + 8].T).double()).solution.T
        torch.testing.assert_close(solved[8 * r:8 * r + 8, idx].double(), ref, rtol=1e-4, atol=1e-4)
        outside = torch.ones(32, dtype=torch.bool)
        outside[idx] = False
        assert torch.count_nonzero(solved[8 * r:8 * r + 8, outside]) == 0


def test_greedy_obs_first_step_is_the_best_single_block_to_drop():
    w, _, gram = _problem(n=8, k=40)
    mask = greedy_obs_mask(w, gram, keep_per_row=4, block_size=8, damp=1e-6)
    errors = []
    for drop in range(5):
        candidate = torch.ones(1, 5, dtype=torch.bool)
        candidate[0, drop] = False
        errors.append(output_error(w, reconstruct_block_rows(w, candidate, gram, damp=1e-6), gram))
    assert mask[0].tolist() == [i != min(range(5), key=errors.__getitem__) for i in range(5)]


def test_greedy_obs_beats_wanda_scores_after_reconstruction():
    w, _, gram = _problem(n=16, k=64, seed=3)
    greedy = greedy_obs_mask(w, gram, 4, 8)
    wanda = select_block_mask(block_scores(w, gram.diagonal(), 8, "wanda"), 4)
    err = {name: output_error(w, reconstruct_block_rows(w, m, gram), gram)
           for name, m in (("greedy", greedy), ("wanda", wanda))}
    assert err["greedy"] < err["wanda"]
    best = min(output_error(w, reconstruct_block_rows(w, torch.tensor([list(c)] * 2), gram), gram)
               for c in itertools.product([True, False], repeat=8) if sum(c) == 4)
    assert err["greedy"] >= best  # sanity: no mask can beat the exhaustive optimum


def test_dense_target_is_the_weight_itself_when_inputs_agree():
    w, x, gram = _problem()
    stats = _InputStats(32, gram=True, cross=True)
    stats.add(x, x)
    assert torch.equal(_target_weight(w, stats, 0.01), w)


def test_sink_weight_counts_the_first_token_of_every_window_that_many_times():
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    stats = _InputStats(8, gram=True, cross=True, sink_weight=10.0)
    stats.add(x, 2 * x)
    flat, first = x.reshape(-1, 8).double(), x[:, 0].double()
    expected = flat.T @ flat + 9 * first.T @ first
    f32 = dict(rtol=1e-5, atol=1e-5)  # the statistics are accumulated from float32 products
    torch.testing.assert_close(stats.gram, expected, **f32)
    torch.testing.assert_close(stats.cross, 2 * expected, **f32)
    torch.testing.assert_close(stats.sq_norms, expected.diagonal(), **f32)
    assert stats.tokens == 15


def test_sink_weight_is_validated_and_reported():
    with pytest.raises(ValueError, match="sink_weight must be >= 1"):
        _prune(sink_weight=0.5)
    _, report = _prune(method="magnitude", reconstruct=False, sink_weight=1.0)
    assert report["sink_weight"] == 1.0


def test_sink_probes_are_the_most_frequent_calibration_tokens_and_bos():
    calib = torch.tensor([[5, 7, 7, 9], [7, 9, 3, 7]])
    assert sink_probe_ids(calib, 2).tolist() == [[7], [9]]
    assert sink_probe_ids(calib, 2, bos_token_id=1).tolist() == [[1], [7]]
    assert sink_probe_ids(calib, 9, bos_token_id=7).flatten().tolist() == [7, 9, 3, 5]
    assert sink_probe_ids(calib, 0, bos_token_id=1).shape == (0, 1)


def test_sink_probes_fit_the_first_position_for_first_tokens_the_windows_lack():
    # Position 0 attends only to itself, so a one-token sequence is the first position of any
    # window starting with that token. With the probes in the fit, the pruned model's output
    # there is closer to the dense one for the probe tokens, most of which start no window.
    reference = make_tiny_llama()
    probes = sink_probe_ids(CALIB, 64, reference.config.bos_token_id)
    unseen = probes[~torch.isin(probes[:, 0], CALIB[:, 0])]
    assert len(unseen) > 50
    errors = {}
    for sink_tokens in (0, 64):
        model, report = _prune(method="wanda", sink_tokens=sink_tokens)
        assert report["sink_tokens"] == sink_tokens
        out, ref = model(unseen).logits, reference(unseen).logits
        errors[sink_tokens] = ((out - ref).norm() / ref.norm()).item()
    assert errors[64] < 0.8 * errors[0], errors
    with pytest.raises(ValueError, match="sink_tokens"):
        _prune(sink_tokens=-1)


def test_dense_target_follows_the_dense_model_through_layers_left_unpruned():
    # Only layer 1 is pruned, so q/k/v (its first linears) see exactly the dense model's
    # inputs: fitting the dense outputs and fitting their own weights must agree.
    only_layer_1 = lambda module, name: name.startswith("model.layers.1.")  # noqa: E731
    weights = {}
    for target in ("dense", "pruned"):
        model, _ = _prune(method="wanda", reconstruct_target=target, filter_fn=only_layer_1)
        weights[target] = {name: m.to_dense() for name, m in _sparse_layers(model).items()}
    assert len(weights["dense"]) == 7
    for proj in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.1.self_attn.{proj}"
        torch.testing.assert_close(weights["dense"][name], weights["pruned"][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("target", ["pruned", "dense"])
def test_reconstruction_lowers_the_model_output_error_on_calibration_data(target):
    reference = make_tiny_llama()(CALIB).logits
    errors = {}
    for reconstruct in (False, True):
        model, _ = _prune(method="wanda", reconstruct=reconstruct, reconstruct_target=target)
        errors[reconstruct] = ((model(CALIB).logits - reference).norm() / reference.norm()).item()
    assert errors[True] < 0.8 * errors[False]


def test_refinement_keeps_the_block_pattern_and_lowers_every_layer_loss():
    plain, _ = _prune(method="wanda")
    refined, report = _prune(method="wanda", refine_steps=30)
    # Layer 0 sees the same inputs in both runs, so refinement must leave its masks as chosen;
    # later layers choose theirs on the refined layers' outputs.
    for name, m in _sparse_layers(refined).items():
        assert len(set(m.block_mask.sum(1).tolist())) == 1, name
        if name.startswith("model.layers.0."):
            assert torch.equal(m.block_mask, _sparse_layers(plain)[name].block_mask), name
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


def test_micro_batch_kwargs_cut_only_batch_shaped_tensors_at_the_right_samples():
    mask = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 5, 5).to(torch.bfloat16)
    rotary = (torch.ones(1, 5, 8, dtype=torch.bfloat16), torch.zeros(1, 5, 8, dtype=torch.bfloat16))
    positions = torch.arange(5)
    cut = _slice_kwargs({"attention_mask": mask, "position_embeddings": rotary, "cache_position": positions,
                         "use_cache": False}, 4, 2, 4, float32=True)
    assert cut["attention_mask"][:, 0, 0, 0].tolist() == [2.0, 3.0] and cut["attention_mask"].dtype == torch.float32
    assert all(t.shape == (1, 5, 8) and t.dtype == torch.float32 for t in cut["position_embeddings"])
    assert torch.equal(cut["cache_position"], positions) and cut["use_cache"] is False


def test_refinement_options_are_validated():
    with pytest.raises(ValueError, match="refine_steps"):
        _prune(refine_steps=-1)
    with pytest.raises(ValueError, match="refine_lr"):
        _prune(refine_steps=2, refine_lr=0.0)


# ----------------------------------------------------------------- allocation
def test_keep_counts_meet_the_total_budget_exactly():
    shapes = {"a": (64, 64), "b": (32, 64), "c": (128, 64)}
    counts = keep_counts({"a": 0.7, "b": 0.6, "c": 0.4}, shapes, 16, 0.5)
    kept = sum(counts[n] * (shapes[n][0] // 16) for n in shapes)
    assert kept == 0.5 * sum((n // 16) * (k // 16) for n, k in shapes.values())
    assert counts["a"] > counts["c"]


def test_keep_counts_refuse_a_budget_they_cannot_meet():
    shapes = {"a": (32, 64), "b": (32, 64)}  # 4 block columns each
    with pytest.raises(ValueError, match="cannot keep a total density of 0.2000"):
        keep_counts({"a": 1.0, "b": 0.01}, shapes, 16, 0.2)


def test_owl_densities_centre_on_the_target():
    dens = owl_densities([0.01, 0.03, 0.02, 0.05], density=0.5, spread=0.08)
    assert sum(dens) / 4 == pytest.approx(0.5)
    assert max(dens) - min(dens) == pytest.approx(0.16)
    assert dens[3] == max(dens) and dens[0] == min(dens)


def test_explicit_allocation_keeps_the_total_at_the_target():
    model = make_tiny_llama()
    names = list(target_linears(model))
    allocation = {name: (0.75 if ".layers.0." in name else 0.25) for name in names}
    report = prune_model(model, CALIB, sparsity=0.5, allocation=allocation, batch_size=4, progress=False)
    layers = _sparse_layers(model)
    assert report["total_density"] == 0.5
    assert layers["model.layers.0.mlp.up_proj"].block_mask.sum(1).tolist() == [3] * 8
    assert layers["model.layers.1.mlp.up_proj"].block_mask.sum(1).tolist() == [1] * 8


def test_a_module_prefix_keeps_its_density_and_the_rest_share_the_budget():
    model = make_tiny_llama()
    report = prune_model(model, CALIB, sparsity=0.5, allocation={"model.layers.0.mlp": 1.0},
                         batch_size=4, progress=False)
    layers = _sparse_layers(model)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert bool(layers[f"model.layers.0.mlp.{proj}"].block_mask.all()), proj
    assert report["total_density"] == 0.5
    assert layers["model.layers.1.mlp.up_proj"].block_mask.float().mean() < 0.5
    assert report["allocation"] == {"explicit": {"model.layers.0.mlp": 1.0}}


def test_explicit_densities_are_checked():
    shapes = {"a.q": (32, 32), "a.k": (32, 32), "b.q": (32, 32)}
    assert explicit_densities({"a": 0.6}, shapes, 0.5) == pytest.approx({"a.q": 0.6, "a.k": 0.6, "b.q": 0.3})
    assert explicit_densities({"a": 0.6, "a.k": 0.2}, shapes, 0.5)["a.k"] == 0.2  # longest key wins
    assert explicit_densities({"*.q": 0.25}, shapes, 0.5) == pytest.approx({"a.q": 0.25, "b.q": 0.25, "a.k": 1.0})
    with pytest.raises(ValueError, match="match no pruned linear"):
        explicit_densities({"c": 0.5}, shapes, 0.5)
    with pytest.raises(ValueError, match="leave density"):
        explicit_densities({"a": 1.0}, shapes, 0.5)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        explicit_densities({"a": 1.5}, shapes, 0.5)


def test_owl_allocation_keeps_the_total_at_the_target():
    model, report = _prune(method="wanda", allocation="owl", owl_spread=0.25)
    assert report["total_density"] == 0.5
    assert len(report["owl_outlier_ratios"]) == 2
    layer_density = [sum(report["layers"][n]["density"] for n in report["layers"] if f".layers.{i}." in n)
                     for i in range(2)]
    assert layer_density[0] != layer_density[1]
