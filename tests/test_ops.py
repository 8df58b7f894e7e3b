"""The torch backend of block_sparse_linear against the dense-masked reference."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from blocksparse import BlockSparseWeight, block_sparse_linear
from blocksparse.ops import SHARED_SLAB_MAX_M, SMALL_M_MAX, dropout_keep_mask, torch_schedule
from helpers import assert_matches_reference, linear_lora, random_block_mask

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=["by-tokens", "transposed"])
def dx_orientation(request, monkeypatch):
    """Both ways of adding the row groups' dX products (the threshold picks one per weight)."""
    import blocksparse.ops as ops

    monkeypatch.setattr(ops, "DX_TRANSPOSED_MIN_ADDS", math.inf if request.param == "by-tokens" else 0.0)
    return request.param


def shared_group_mask(n_block_rows, n_block_cols, density, row_group, perm, generator, union=None):
    """Every group of `row_group` rows (in `perm` order) draws `union` (default: density)
    of the block columns; each of its rows keeps `density` of all columns among them."""
    keep = round(density * n_block_cols)
    width = max(keep, round((density if union is None else union) * n_block_cols))
    mask = torch.zeros(n_block_rows, n_block_cols, dtype=torch.bool)
    for g in range(0, n_block_rows, row_group):
        cols = torch.randperm(n_block_cols, generator=generator)[:width]
        for row in perm[g:g + row_group]:
            mask[row, cols[torch.randperm(width, generator=generator)[:keep]]] = True
    return mask


def make_case(m, n, k, density, dtype, bias=True, lora_rank=0, uniform_rows=False, lead=(), row_group=1,
              shared=False, union=None):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    mask = random_block_mask(n // 16, k // 16, density, generator=gen, uniform_rows=uniform_rows)
    w64 = torch.randn(n, k, generator=gen, dtype=torch.float64) / k ** 0.5
    perm = torch.randperm(n // 16, generator=gen) if row_group > 1 else None
    if shared:
        mask = shared_group_mask(n // 16, k // 16, density, row_group, perm, gen, union)
    w = BlockSparseWeight.from_dense(w64.to(dtype), mask, row_perm=perm, row_group=row_group)
    x64 = torch.randn(*lead, m, k, generator=gen, dtype=torch.float64)
    b64 = torch.randn(n, generator=gen, dtype=torch.float64) if bias else None
    a64 = torch.randn(lora_rank, k, generator=gen, dtype=torch.float64) / k ** 0.5 if lora_rank else None
    bb64 = torch.randn(n, lora_rank, generator=gen, dtype=torch.float64) if lora_rank else None
    return w, x64, b64, a64, bb64


def run_and_compare(m, n, k, density, dtype, bias=True, lora_rank=0, scaling=2.0,
                    uniform_rows=False, lead=(), transpose_x=False, row_group=1, shared=False, schedule=None,
                    train_values=False, union=None):
    """Output and every gradient against the fp64 dense-masked reference; with
    train_values, also dW at the stored blocks (the reference's dW at those blocks)."""
    w, x64, b64, a64, bb64 = make_case(m, n, k, density, dtype, bias, lora_rank, uniform_rows, lead, row_group,
                                       shared, union)
    if schedule is not None:
        assert torch_schedule(w, m) == schedule
    w.values.requires_grad_(train_values)
    w_ref64 = w.to_dense().detach().double().requires_grad_(train_values)
    w_torch = w.to_dense().detach().requires_grad_(train_values)

    def leaves(dt):
        out = []
        for t in (x64, b64, a64, bb64):
            out.append(None if t is None else t.detach().to(dt, copy=True).requires_grad_(True))
        return out

    x, b, a, bb = leaves(dtype)
    x_in = x
    if transpose_x:  # a non-contiguous view with the same values
        wide = torch.cat([x.detach(), torch.zeros_like(x.detach())], dim=-1)
        x_in = wide[..., : x.shape[-1]].requires_grad_(True)
        assert not x_in.is_contiguous()
        x = x_in
    y = block_sparse_linear(x_in, w, b, a, bb, scaling=scaling, backend="torch")
    x_r, b_r, a_r, bb_r = leaves(torch.float64)
    y_ref = linear_lora(x_r, w_ref64, b_r, a_r, bb_r, scaling)
    x_t, b_t, a_t, bb_t = leaves(dtype)
    y_torch = linear_lora(x_t, w_torch, b_t, a_t, bb_t, scaling)
    assert_matches_reference(y.detach(), y_ref.detach(), y_torch.detach(), "y")

    grad = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y.backward(grad.to(dtype))
    y_ref.backward(grad)
    y_torch.backward(grad.to(dtype))
    for name, ours, ref, theirs in zip(("x", "bias", "lora_a", "lora_b"), (x, b, a, bb),
                                       (x_r, b_r, a_r, bb_r), (x_t, b_t, a_t, bb_t)):
        if ours is not None:
            assert_matches_reference(ours.grad, ref.grad, theirs.grad, f"grad {name}")
    if train_values:
        assert w.values.grad.shape == w.values.shape and w.values.grad.dtype == dtype
        assert_matches_reference(w.values.grad, w.blocks_of(w_ref64.grad), w.blocks_of(w_torch.grad), "grad values")
    else:
        assert w.values.grad is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [0, 1, 7, SMALL_M_MAX + 1, 130])
@pytest.mark.parametrize("density", [0.0, 0.25, 0.5, 1.0])
def test_forward_and_gradients(dtype, m, density):
    run_and_compare(m, 64, 96, density, dtype, bias=True, lora_rank=8)


@pytest.mark.parametrize("m", [1, 7, SMALL_M_MAX + 1, 130])
@pytest.mark.parametrize("row_group", [2, 3])
@pytest.mark.parametrize("uniform_rows", [True, False])
def test_row_grouped_weights_match_the_reference(m, row_group, uniform_rows):
    run_and_compare(m, 96, 64, 0.5, torch.float32, bias=True, lora_rank=4, uniform_rows=uniform_rows,
                    row_group=row_group)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, row_group, schedule", [(1, 2, "blocks"), (7, 4, "shared-slab"),
                                                    (SMALL_M_MAX + 1, 2, "shared-slab"), (40, 4, "shared-slab"),
                                                    (130, 3, "row-groups"), (70, 6, "row-groups"),
                                                    (SHARED_SLAB_MAX_M + 1, 4, "row-groups")])
@pytest.mark.usefixtures("dx_orientation")
def test_fully_shared_row_groups_share_their_gathered_input(dtype, m, row_group, schedule):
    # 6 block rows: row_group 4 leaves a short last group
    run_and_compare(m, 96, 80, 0.4, dtype, bias=True, lora_rank=4, row_group=row_group, shared=True,
                    schedule=schedule)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, row_group, schedule", [(7, 2, "blocks"), (SMALL_M_MAX + 1, 2, "row-groups"),
                                                    (130, 4, "row-groups"), (70, 3, "row-groups")])
@pytest.mark.usefixtures("dx_orientation")
def test_row_groups_with_zero_tiles_run_one_gemm_per_group(dtype, m, row_group, schedule):
    # Each group draws 3 of 5 block columns and each row keeps 2 of them (density 0.4,
    # union 0.6): the packed tiles hold zeros where a row lacks a union block.
    import blocksparse.ops as ops

    w, *_ = make_case(m, 96, 80, 0.4, dtype, row_group=row_group, shared=True, union=0.6)
    assert not ops._row_groups(w)["shared"]
    run_and_compare(m, 96, 80, 0.4, dtype, bias=True, lora_rank=4, row_group=row_group, shared=True,
                    union=0.6, schedule=schedule, train_values=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, density, uniform_rows, row_group, shared, schedule", [
    (0, 0.5, False, 1, False, "blocks"), (1, 0.5, False, 1, False, "blocks"),
    (7, 0.25, True, 1, False, "blocks"), (7, 0.5, False, 3, False, "blocks"),
    (SMALL_M_MAX + 1, 0.5, False, 1, False, "dense"), (130, 1.0, True, 1, False, "dense"),
    (130, 0.0, False, 1, False, "dense"), (SMALL_M_MAX + 1, 0.4, True, 2, True, "shared-slab"),
    (70, 0.4, True, 6, True, "row-groups"), (40, 0.4, True, 4, True, "shared-slab"),
    (7, 0.4, True, 2, True, "shared-slab")])
def test_trained_block_values_get_the_reference_gradient(dtype, m, density, uniform_rows, row_group, shared,
                                                         schedule):
    # dW at the stored blocks on every schedule, with bias and LoRA beside it.
    run_and_compare(m, 96, 80, density, dtype, bias=True, lora_rank=4, uniform_rows=uniform_rows,
                    row_group=row_group, shared=shared, schedule=schedule, train_values=True)


def test_each_product_of_fully_shared_groups_has_its_own_token_thresholds():
    from blocksparse.ops import BLOCKS_MAX_M_SHARED

    w, *_ = make_case(1, 96, 80, 0.4, torch.float32, row_group=2, shared=True)
    lo, hi = BLOCKS_MAX_M_SHARED, SMALL_M_MAX
    assert [torch_schedule(w, m, "y") for m in (lo, lo + 1, SHARED_SLAB_MAX_M + 1)] == [
        "blocks", "shared-slab", "row-groups"]
    assert [torch_schedule(w, m, "dx") for m in (lo, lo + 1)] == ["blocks", "row-groups"]
    assert [torch_schedule(w, m, "dw") for m in (hi, hi + 1)] == ["blocks", "row-groups"]
    with pytest.raises(ValueError, match="product must be one of"):
        torch_schedule(w, 8, "dy")


def test_dx_orientation_follows_the_additions_per_entry(monkeypatch):
    # 32 block rows in groups of 2, each group's union 2 of the 4 block columns: every dX
    # entry receives 16 x 2 / 4 = 8 group products on average.
    import blocksparse.ops as ops

    w, x64, *_ = make_case(130, 512, 64, 0.5, torch.float32, bias=False, row_group=2, shared=True)
    layout = ops._row_groups(w)
    assert layout["dx_adds"] == 8.0 and torch_schedule(w, 130, "dx") == "row-groups"
    called = []
    for name in ("_grouped_dx_by_tokens", "_grouped_dx_transposed"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _f=original, _n=name: called.append(_n) or _f(*a))
    grads = {}
    for threshold, expected in ((8.0, "_grouped_dx_transposed"), (8.5, "_grouped_dx_by_tokens")):
        monkeypatch.setattr(ops, "DX_TRANSPOSED_MIN_ADDS", threshold)
        called.clear()
        x = x64.float().requires_grad_(True)
        block_sparse_linear(x, w, backend="torch").sum().backward()
        assert called == [expected]
        grads[expected] = x.grad
    torch.testing.assert_close(grads["_grouped_dx_transposed"], grads["_grouped_dx_by_tokens"])


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.usefixtures("dx_orientation")
def test_row_group_steps_cover_every_group_and_token_once(monkeypatch, shared):
    import blocksparse.ops as ops

    monkeypatch.setattr(ops, "_GROUP_SLAB_BYTES", 1000)  # a few token rows per chunk
    monkeypatch.setattr(ops, "_GROUP_TILE_BYTES", 7000)  # a group or two per step
    w, *_ = make_case(130, 96, 80, 0.4, torch.float32, row_group=2, shared=shared)
    layout = ops._row_groups(w)
    assert layout["usable"] and layout["shared"] == shared
    steps = layout["steps"]
    assert len(steps) > 1 and sum(step["groups"] for step in steps) == 3
    assert [step["first"] for step in steps] == [sum(s["groups"] * 2 for s in steps[:i]) for i in range(len(steps))]
    assert [step["tiles"] for step in steps] == [(a, b) for a, b in zip(
        [0] + [step["tiles"][1] for step in steps[:-1]], [step["tiles"][1] for step in steps])]
    assert steps[-1]["tiles"][1] == w.nnz_blocks
    run_and_compare(130, 96, 80, 0.4, torch.float32, bias=True, lora_rank=4, row_group=2, shared=shared,
                    schedule="row-groups", train_values=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [SMALL_M_MAX + 1, 130])
@pytest.mark.usefixtures("dx_orientation")
def test_free_masks_run_their_clustered_row_groups(dtype, m):
    # A free mask (no grouping of its own) whose rows follow 4 column patterns, shuffled:
    # the backend clusters rows into groups of FREE_MASK_ROW_GROUP, whose tiles are not
    # contiguous in `values`: gathered to pack, scattered back for dW.
    import blocksparse.ops as ops

    gen = torch.Generator().manual_seed(m)
    patterns = torch.rand(4, 10, generator=gen) < 0.4
    mask = patterns[torch.randint(0, 4, (64,), generator=gen)]
    mask[3, :] = False  # an empty row, and one that differs from its pattern
    mask[5] = ~mask[5]
    w64 = torch.randn(64 * 16, 160, generator=gen, dtype=torch.float64) / 160 ** 0.5
    w = BlockSparseWeight.from_dense(w64.to(dtype), mask)
    layout = ops._row_groups(w)
    assert layout["usable"] and not layout["shared"] and layout["to_true"] is not None
    assert not all(isinstance(step["tiles"], tuple) for step in layout["steps"])
    assert torch_schedule(w, m) == "row-groups" and torch_schedule(w, m, "dx") == "row-groups"
    gen_x = torch.Generator().manual_seed(1)
    check_fuzzed_case(w, m, dtype, 4, gen_x)


@pytest.mark.parametrize("row_group", [1, 2])
@pytest.mark.usefixtures("dx_orientation")
def test_row_groups_with_empty_rows_and_groups(row_group):
    # Whole groups without a block (their output columns are zero) and a step of them.
    import blocksparse.ops as ops

    gen = torch.Generator().manual_seed(3)
    mask = torch.zeros(12, 6, dtype=torch.bool)
    mask[6:, :2] = True
    mask[8:, 4] = True
    perm = torch.arange(12) if row_group > 1 else None
    w = BlockSparseWeight.from_dense(torch.randn(192, 96, generator=gen), mask, row_perm=perm, row_group=row_group)
    assert ops._row_groups(w)["usable"] and torch_schedule(w, 40) == "row-groups"
    check_fuzzed_case(w, 40, torch.float32, 0, gen)


def test_row_groups_with_zero_tiles_keep_pruned_weights_out_of_a_non_finite_input():
    # Not fully shared: a row's missing union blocks are zero tiles in the packed GEMM, so a
    # NaN input takes the stored-blocks path (checked against the reference's NaN pattern).
    import blocksparse.ops as ops

    w, x64, *_ = make_case(130, 96, 80, 0.4, torch.float32, bias=False, row_group=2)
    assert torch_schedule(w, 130) == "row-groups" and not ops._row_groups(w)["shared"]
    mask = w.block_mask
    col = int(torch.nonzero(~mask.all(0))[0])
    x = x64.float()
    x[5, col * 16] = float("nan")
    y = block_sparse_linear(x, w, backend="torch")
    assert torch.equal(torch.isnan(y[5]), mask[:, col].repeat_interleave(16))


@pytest.mark.parametrize("m", [1, 7])
@pytest.mark.parametrize("uniform_rows", [True, False])
def test_stored_blocks_in_several_chunks_of_rows(monkeypatch, m, uniform_rows):
    import blocksparse.ops as ops

    monkeypatch.setattr(ops, "_CHUNK_BYTES", 400)  # a block row or two per chunk
    w, *_ = make_case(m, 96, 80, 0.5, torch.float32, uniform_rows=uniform_rows)
    assert len(ops._row_chunks(w, m)["chunks"]) > 1
    run_and_compare(m, 96, 80, 0.5, torch.float32, lora_rank=4, uniform_rows=uniform_rows, train_values=True,
                    schedule="blocks")


@pytest.mark.parametrize("m", [1, 7, SMALL_M_MAX + 1, 130])
@pytest.mark.parametrize("shared", [False, True])
def test_inference_and_a_frozen_input_match_the_reference(m, shared):
    """No graph at all (inference: the op skips autograd), and LoRA training with x frozen
    (the graph holds A and B only): both paths against the fp64 reference."""
    w, x64, b64, a64, bb64 = make_case(m, 96, 80, 0.4, torch.float32, bias=True, lora_rank=4, row_group=2,
                                       shared=shared)
    ref = lambda *t: linear_lora(*t[:1], w.to_dense().double(), *t[1:], 0.5)  # noqa: E731
    x, b, a, bb = (t.float() for t in (x64, b64, a64, bb64))
    with torch.no_grad():
        y = block_sparse_linear(x, w, b, a, bb, scaling=0.5, backend="torch")
    assert not y.requires_grad
    torch.testing.assert_close(y.double(), ref(x64, b64, a64, bb64), rtol=1e-4, atol=1e-4)
    a_t, bb_t = a.clone().requires_grad_(True), bb.clone().requires_grad_(True)
    y = block_sparse_linear(x, w, b, a_t, bb_t, scaling=0.5, backend="torch")
    a_r, bb_r = a64.clone().requires_grad_(True), bb64.clone().requires_grad_(True)
    y_ref = ref(x64, b64, a_r, bb_r)
    torch.testing.assert_close(y.double(), y_ref.detach(), rtol=1e-4, atol=1e-4)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(a_t.grad.double(), a_r.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bb_t.grad.double(), bb_r.grad, rtol=1e-4, atol=1e-4)


def test_row_groups_whose_unions_are_nearly_dense_fall_back_to_dense_blas():
    import blocksparse.ops as ops

    w, *_ = make_case(130, 96, 80, 0.6, torch.float32, row_group=3)  # three random rows: ~94% union
    assert not ops._row_groups(w)["usable"]
    assert torch_schedule(w, 130) == "dense" and torch_schedule(w, SMALL_M_MAX) == "blocks"


@pytest.mark.parametrize("m", [1, 7, 130])
@pytest.mark.parametrize("uniform_rows", [True, False])
def test_without_bias_or_lora(m, uniform_rows):
    run_and_compare(m, 96, 64, 0.5, torch.float32, bias=False, lora_rank=0, uniform_rows=uniform_rows)


@pytest.mark.parametrize("m", [1, 7, 130])
def test_leading_dims_and_non_contiguous_x(m):
    run_and_compare(m, 64, 64, 0.5, torch.float32, lora_rank=4, lead=(2, 3))
    run_and_compare(m, 64, 64, 0.5, torch.bfloat16, lora_rank=4, lead=(2,), transpose_x=True)


@pytest.mark.parametrize("m", [5, 70])
def test_lora_dropout_matches_reference_with_the_same_mask(m):
    p = 0.3
    w, x64, b64, a64, bb64 = make_case(m, 64, 48, 0.5, torch.float32, lora_rank=4)
    x, a, bb = (t.float().requires_grad_(True) for t in (x64, a64, bb64))
    torch.manual_seed(123)
    y = block_sparse_linear(x, w, None, a, bb, scaling=0.5, lora_dropout=p, backend="torch")
    torch.manual_seed(123)
    keep = dropout_keep_mask((m, 48), p, "cpu", torch.float64)  # the mask the op draws
    x_r, a_r, bb_r = (t.clone().requires_grad_(True) for t in (x64, a64, bb64))
    y_ref = linear_lora(x_r, w.to_dense().double(), None, a_r, bb_r, 0.5, keep_mask=keep, p=p)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    y_ref.sum().backward()
    for ours, ref in ((x, x_r), (a, a_r), (bb, bb_r)):
        torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=1e-5, atol=1e-5)
    # dropout touches the LoRA path only: with a zero LoRA delta it changes nothing
    y0 = block_sparse_linear(x, w, None, a, torch.zeros_like(bb), lora_dropout=p, backend="torch")
    torch.testing.assert_close(y0, block_sparse_linear(x, w, backend="torch"))


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_dropout_keep_mask_rate_and_independent_lanes(p):
    torch.manual_seed(0)
    n = 1 << 20
    keep = dropout_keep_mask((n // 64, 64), p, "cpu")
    assert keep.dtype == torch.float32 and set(keep.unique().tolist()) <= {0.0, 1.0}
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(1 - keep.mean().item() - p) < 5 * sd + 2 ** -16
    # the four lanes of one draw are neighbours: each lane keeps at the same rate, and a
    # neighbour's drop says nothing about the next one
    lanes = keep.view(-1, 4)
    for lane in lanes.unbind(1):
        assert abs(1 - lane.mean().item() - p) < 5 * 2 * sd + 2 ** -16
    for i, j in ((0, 1), (1, 2), (2, 3)):
        both = ((1 - lanes[:, i]) * (1 - lanes[:, j])).mean().item()
        assert abs(both - p * p) < 5 * math.sqrt(p * p / (n // 4)) + 1e-4
    both = ((1 - lanes[:-1, 3]) * (1 - lanes[1:, 0])).mean().item()  # across neighbouring draws
    assert abs(both - p * p) < 5 * math.sqrt(p * p / (n // 4)) + 1e-4
    odd = dropout_keep_mask((3, 7), p, "cpu")  # a size that is not a whole number of draws
    assert odd.shape == (3, 7)
    torch.manual_seed(1)
    whole = dropout_keep_mask((4, 8), p, "cpu")  # the first 21 lanes of the same draws
    torch.manual_seed(1)
    assert torch.equal(dropout_keep_mask((3, 7), p, "cpu").flatten(), whole.flatten()[:21])


def test_dropout_keep_mask_near_zero_and_one():
    torch.manual_seed(0)
    n = 1 << 18
    assert dropout_keep_mask((n,), 1e-7, "cpu").mean().item() == 1.0  # below 2^-17: nothing dropped
    # within 2^-17 of 1 the threshold stays an int16 (2^15 would wrap and keep everything)
    kept = dropout_keep_mask((n,), 1 - 1e-6, "cpu").sum().item()
    assert kept < 30  # 2^-16 of 2^18 lanes: 4 expected


@pytest.mark.parametrize("m", [3, 100])
def test_nan_stays_in_its_token(m):
    w, x64, *_ = make_case(m, 64, 64, 0.5, torch.float32, bias=False, uniform_rows=True)
    x = x64.float()
    x[1, 5] = float("nan")
    x[2, 40] = float("inf")
    y = block_sparse_linear(x, w, backend="torch")
    reads_col0 = w.block_mask[:, 0].repeat_interleave(16)  # output rows whose blocks read column 5
    assert torch.isnan(y[1, reads_col0]).all()
    assert not torch.isfinite(y[2, w.block_mask[:, 2].repeat_interleave(16)]).any()
    keep = torch.ones(m, dtype=torch.bool)
    keep[1:3] = False
    assert torch.isfinite(y[keep]).all()


def test_backend_selection(monkeypatch):
    w = BlockSparseWeight.from_dense(torch.randn(32, 32), torch.ones(2, 2, dtype=torch.bool))
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="backend must be one of"):
        block_sparse_linear(x, w, backend="cuda")
    monkeypatch.setenv("BLOCKSPARSE_BACKEND", "fast")
    with pytest.raises(ValueError, match="BLOCKSPARSE_BACKEND must be"):
        block_sparse_linear(x, w)
    monkeypatch.setenv("BLOCKSPARSE_BACKEND", "torch")
    torch.testing.assert_close(block_sparse_linear(x, w), x @ w.to_dense().t())


def test_bad_inputs_name_expected_and_given():
    w = BlockSparseWeight.from_dense(torch.randn(32, 48), torch.ones(2, 3, dtype=torch.bool))
    x = torch.randn(4, 48)
    cases = [
        (dict(x=torch.randn(4, 32)), "in_features=48 as its last dimension, got shape \\(4, 32\\)"),
        (dict(x=x.double()), "share dtype and device.*float64"),
        (dict(x=x.to("meta")), "share dtype and device.*meta"),
        (dict(bias=torch.randn(48)), "bias must have shape \\(32,\\)"),
        (dict(bias=torch.randn(32).half()), "bias must have shape.*float16"),
        (dict(lora_a=torch.randn(4, 48)), "given together"),
        (dict(lora_a=torch.randn(4, 32), lora_b=torch.randn(32, 4)), "lora_a must be \\[r, in_features=48\\]"),
        (dict(lora_a=torch.randn(4, 48), lora_b=torch.randn(32, 8)), "lora_b must be \\[out_features=32, r=4\\]"),
        (dict(lora_a=torch.randn(4, 48).half(), lora_b=torch.randn(32, 4)), "lora_a must match x"),
        (dict(lora_a=torch.randn(4, 48), lora_b=torch.randn(32, 4), lora_dropout=1.0), "lora_dropout"),
    ]
    for overrides, message in cases:
        kwargs = dict(x=x, weight=w) | overrides
        with pytest.raises(ValueError, match=message):
            block_sparse_linear(**kwargs)
    with pytest.raises(TypeError, match="BlockSparseWeight"):
        block_sparse_linear(x, torch.randn(32, 48))


def check_fuzzed_case(w, m, dtype, lora_rank, gen):
    """Output, dX and dW at the stored blocks (and LoRA's gradients) against fp64."""
    n, k = w.shape
    w.values.requires_grad_(True)
    x64 = torch.randn(m, k, generator=gen, dtype=torch.float64)
    a64 = torch.randn(lora_rank, k, generator=gen, dtype=torch.float64) if lora_rank else None
    b64 = torch.randn(n, lora_rank, generator=gen, dtype=torch.float64) if lora_rank else None
    leaves = lambda dt: [None if t is None else t.to(dt, copy=True).requires_grad_() for t in (x64, a64, b64)]  # noqa: E731
    inputs = {dt: leaves(dt) for dt in (torch.float64, dtype)}
    ours = leaves(dtype)
    w_ref, w_torch = (w.to_dense().detach().to(dt).requires_grad_() for dt in (torch.float64, dtype))
    y = block_sparse_linear(ours[0], w, None, ours[1], ours[2], scaling=0.5, backend="torch")
    y_ref = linear_lora(inputs[torch.float64][0], w_ref, None, *inputs[torch.float64][1:], 0.5)
    y_torch = linear_lora(inputs[dtype][0], w_torch, None, *inputs[dtype][1:], 0.5)
    assert_matches_reference(y.detach(), y_ref.detach(), y_torch.detach())
    grad = torch.randn(m, n, generator=gen, dtype=torch.float64)
    for out, g in ((y, grad.to(dtype)), (y_ref, grad), (y_torch, grad.to(dtype))):
        out.backward(g)
    assert_matches_reference(w.values.grad, w.blocks_of(w_ref.grad), w.blocks_of(w_torch.grad), "grad values")
    for name, mine, ref, theirs in zip(("x", "lora_a", "lora_b"), ours, inputs[torch.float64], inputs[dtype]):
        if mine is not None:
            assert_matches_reference(mine.grad, ref.grad, theirs.grad, f"grad {name}")


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(0, 40),
    n_blocks=st.integers(1, 5),
    k_blocks=st.integers(1, 5),
    block_size=st.sampled_from([8, 16, 32]),
    density=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    lora_rank=st.sampled_from([0, 1, 8]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_dense_reference(m, n_blocks, k_blocks, block_size, density, dtype, lora_rank, seed):
    gen = torch.Generator().manual_seed(seed)
    n, k = n_blocks * block_size, k_blocks * block_size
    mask = random_block_mask(n_blocks, k_blocks, density, generator=gen)
    w = BlockSparseWeight.from_dense(torch.randn(n, k, generator=gen).to(dtype), mask)
    check_fuzzed_case(w, m, dtype, lora_rank, gen)


@settings(max_examples=100, deadline=None)
@given(
    m=st.one_of(st.integers(0, 20), st.integers(21, 150)),  # every schedule: blocks, shared-slab, row-groups, dense, several token chunks
    n_blocks=st.integers(1, 13),
    k_blocks=st.integers(1, 6),
    row_group=st.integers(2, 5),
    block_size=st.sampled_from([8, 16, 32]),
    density=st.floats(0.0, 1.0),
    extra_union=st.sampled_from([0.0, 0.0, 0.2]),  # fully shared twice as often as with zero tiles
    dtype=st.sampled_from(DTYPES),
    lora_rank=st.sampled_from([0, 4]),
    small_steps=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_row_groups_match_dense_reference(m, n_blocks, k_blocks, row_group, block_size, density,
                                                   extra_union, dtype, lora_rank, small_steps, seed):
    import blocksparse.ops as ops

    gen = torch.Generator().manual_seed(seed)
    n, k = n_blocks * block_size, k_blocks * block_size
    perm = torch.randperm(n_blocks, generator=gen)
    mask = shared_group_mask(n_blocks, k_blocks, density, row_group, perm, gen, union=min(1.0, density + extra_union))
    w = BlockSparseWeight.from_dense(torch.randn(n, k, generator=gen).to(dtype), mask, row_perm=perm,
                                     row_group=row_group)
    tiles, slab = ops._GROUP_TILE_BYTES, ops._GROUP_SLAB_BYTES
    if small_steps:  # a few groups and token rows per step: every step and chunk boundary
        ops._GROUP_TILE_BYTES, ops._GROUP_SLAB_BYTES = 2 * k * block_size, 3 * k * 8
    try:
        check_fuzzed_case(w, m, dtype, lora_rank, gen)
    finally:
        ops._GROUP_TILE_BYTES, ops._GROUP_SLAB_BYTES = tiles, slab


@pytest.mark.parametrize("m, uniform_rows, row_group, schedule", [
    (3, False, 1, "blocks"), (3, True, 1, "blocks"), (40, False, 1, "dense"), (40, True, 2, "shared-slab"),
    (SHARED_SLAB_MAX_M + 1, True, 2, "row-groups")])
def test_pruned_weights_do_not_exist_for_a_non_finite_input(m, uniform_rows, row_group, schedule):
    # One semantics on every path of the torch backend: a NaN in an input feature reaches
    # exactly the outputs whose stored blocks read it (0 * NaN is never computed); the same
    # for dX with a NaN in the output gradient.
    w, x64, *_ = make_case(m, 96, 64, 0.5, torch.float32, bias=False, uniform_rows=uniform_rows,
                           row_group=row_group, shared=row_group > 1)
    assert torch_schedule(w, m) == schedule
    mask = w.block_mask
    col = int(torch.nonzero(~mask.all(0))[0])  # a block column some block rows lack
    x = x64.float().requires_grad_(True)
    with torch.no_grad():
        x[1, col * 16 + 3] = float("nan")
    w.values.requires_grad_(True)
    y = block_sparse_linear(x, w, backend="torch")
    reads = mask[:, col].repeat_interleave(16)
    assert torch.isnan(y[1, reads]).all() and torch.isfinite(y[1, ~reads]).all()
    assert torch.isfinite(y[torch.arange(m) != 1]).all()
    row = int(torch.nonzero(~mask.all(1))[0])   # a block row that lacks some block column
    grad = torch.zeros(m, 96)
    grad[2, row * 16 + 5] = float("nan")
    y.backward(grad)
    stored = mask[row].repeat_interleave(16)
    assert torch.isnan(x.grad[2, stored]).all() and torch.isfinite(x.grad[2, ~stored]).all()
    # dW[i][c, j] = sum_m X[m, c] dY[m, j] of block i: NaN where its own input column
    # (c = 3 of column `col`: 0 * NaN there) or output row (j = 5 of row `row`) is.
    expected = torch.zeros(w.values.shape, dtype=torch.bool)
    expected[w.col.long() == col, 3, :] = True
    expected[w.row.long() == row, :, 5] = True
    assert torch.equal(torch.isnan(w.values.grad), expected)


@pytest.mark.parametrize("scaling", [float("nan"), float("inf")])
def test_a_non_finite_lora_scaling_is_refused(scaling):
    # addmm_ with alpha=nan silently acted as alpha=1 on the CPU.
    w = BlockSparseWeight.from_dense(torch.randn(32, 48), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=f"scaling must be a finite number, got {scaling}"):
        block_sparse_linear(torch.randn(4, 48), w, None, torch.randn(4, 48), torch.randn(32, 4), scaling=scaling)


@pytest.mark.parametrize("row_group", [1, 4])
def test_under_autocast_it_runs_as_f_linear_does_in_the_lower_precision(row_group):
    # fp32 weights, values trained, LoRA: autocast casts every operand, the gradients
    # come back in fp32 and equal the op's on the bf16-cast operands.
    gen = torch.Generator().manual_seed(5)
    mask = random_block_mask(8, 4, 0.5, generator=gen)
    weight = BlockSparseWeight.from_dense(torch.randn(128, 64, generator=gen), mask,
                                          row_perm=torch.randperm(8, generator=gen), row_group=row_group)
    weight.values.requires_grad_(True)
    bias = torch.randn(128, generator=gen, requires_grad=True)
    lora_a = torch.randn(4, 64, generator=gen, requires_grad=True)
    lora_b = torch.randn(128, 4, generator=gen, requires_grad=True)
    x = torch.randn(3, 64, generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block_sparse_linear(x, weight, bias, lora_a, lora_b, scaling=0.5)
    grad_y = torch.randn(y.shape, generator=gen, dtype=torch.bfloat16)
    y.backward(grad_y)
    assert y.dtype == torch.bfloat16 and weight.values.dtype == torch.float32
    grads = [t.grad for t in (x, weight.values, bias, lora_a, lora_b)]
    assert all(g.dtype == torch.float32 for g in grads)

    half = BlockSparseWeight.from_dense(weight.to_dense().detach().bfloat16(), mask, row_perm=weight.row_perm,
                                        row_group=row_group)
    half.values.requires_grad_(True)
    ref_in = [t.detach().bfloat16().requires_grad_(True) for t in (x, bias, lora_a, lora_b)]
    ref = block_sparse_linear(ref_in[0], half, ref_in[1], ref_in[2], ref_in[3], scaling=0.5)
    ref.backward(grad_y)
    assert torch.equal(y, ref)
    for got, want in zip(grads, [ref_in[0].grad, half.values.grad, *(t.grad for t in ref_in[1:])]):
        assert torch.equal(got, want.float())
    # The cast views keep their own layouts; the weight's own are untouched.
    assert torch.bfloat16 in weight._cast_layouts and all(isinstance(v, dict) for v in weight._layouts.values())
