"""Triton kernels vs the fp32 reference (TRITON_INTERPRET=1 on a CPU, or CUDA).

Tolerance rule (DESIGN.md section 8): the kernel's max error against an fp32
reference is at most 2x the error of the PyTorch backend in the same dtype,
plus a small atol relative to the output's scale.
"""

import copy
import os

import pytest
import torch

from blocksparse import BlockSparseWeight, block_sparse_linear
from blocksparse.ops import linear_torch

if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    DEVICE = "cpu"
else:
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1 (make test sets it)",
                allow_module_level=True)

from blocksparse.kernels import (  # noqa: E402  (after the device check on purpose)
    block_sparse_linear_triton,
    get_schedule,
    new_dropout_seed,
    philox_keep_mask,
)

ATOL_SCALE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
RANK = 8
SCALING = 0.5


def random_mask(rows: int, cols: int, density: float) -> torch.Tensor:
    """A block mask with exactly round(density * rows * cols) blocks, rows of unequal length."""
    count = round(density * rows * cols)
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[torch.randperm(rows * cols)[:count]] = True
    return mask.view(rows, cols)


def make_weight(n: int, k: int, density: float, dtype: torch.dtype, block_size: int = 16, row_group: int = 1):
    dense = torch.randn(n, k) / k ** 0.5
    mask = random_mask(n // block_size, k // block_size, density)
    perm = torch.randperm(n // block_size) if row_group > 1 else None
    return BlockSparseWeight.from_dense(dense, mask, row_perm=perm, row_group=row_group).to(device=DEVICE, dtype=dtype)


def make_operands(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, lora: bool):
    ops = {
        "x": torch.randn(m, k),
        "bias": torch.randn(n) if bias else None,
        "lora_a": torch.randn(RANK, k) / k ** 0.5 if lora else None,
        "lora_b": torch.randn(n, RANK) if lora else None,
    }
    return {name: None if t is None else t.to(device=DEVICE, dtype=dtype).requires_grad_()
            for name, t in ops.items()}


def run(fn, ops: dict, grad_y: torch.Tensor) -> dict:
    """Output and the gradient of every operand that has one, for a fresh copy of `ops`."""
    leaves = {name: None if t is None else t.detach().clone().requires_grad_() for name, t in ops.items()}
    y = fn(**leaves)
    y.backward(grad_y.to(y.dtype))
    out = {"y": y.detach()}
    out.update({f"d{name}": t.grad for name, t in leaves.items() if t is not None})
    return out


def assert_within_rule(kernel: dict, torch_same_dtype: dict, reference: dict, dtype) -> None:
    for name, ref in reference.items():
        ref = ref.float()
        err = (kernel[name].float() - ref).abs().max().item()
        torch_err = (torch_same_dtype[name].float() - ref).abs().max().item()
        bound = 2 * torch_err + ATOL_SCALE[dtype] * max(1.0, ref.abs().max().item())
        assert err <= bound, (f"{name}: kernel error {err:.3g} > bound {bound:.3g} "
                              f"(torch error {torch_err:.3g})")


def check_against_torch(m, n, k, dtype, density, *, bias, lora, dropout, row_group=1, **schedule):
    weight = make_weight(n, k, density, dtype, row_group=row_group)
    ops = make_operands(m, n, k, dtype, bias, lora)
    grad_y = torch.randn(m, n, device=DEVICE)
    seed = new_dropout_seed(torch.device(DEVICE))
    keep = philox_keep_mask(seed, m, k, dropout, dtype) if dropout else None

    def kernel(x, bias, lora_a, lora_b):
        return block_sparse_linear_triton(x, weight, bias, lora_a, lora_b, SCALING, dropout,
                                          seed=seed, **schedule)

    def torch_backend(w, cast):
        def fn(x, bias, lora_a, lora_b):
            args = [None if t is None else t.to(cast) for t in (x, bias, lora_a, lora_b)]
            mask = None if keep is None else keep.to(cast)
            return linear_torch(args[0], w, args[1], args[2], args[3], SCALING, dropout, mask)
        return fn

    weight32 = copy.deepcopy(weight).to(torch.float32)
    got = run(kernel, ops, grad_y)
    assert got["y"].dtype == dtype and got["y"].shape == (m, n)
    assert_within_rule(got, run(torch_backend(weight, dtype), ops, grad_y),
                       run(torch_backend(weight32, torch.float32), ops, grad_y), dtype)
    return weight, got


# (dtype, M, G, density, bias, lora, dropout, cluster, split_k): a covering set,
# not the full cross product (the interpreter is slow). N=96 gives 6 block rows,
# so G=4 has a padded last group; K=80 gives 5 block columns.
CASES = [
    (torch.float32, 1, None, 0.5, True, True, 0.0, True, 0),     # decode defaults
    (torch.float32, 7, 2, 0.25, False, True, 0.1, True, 0),
    (torch.float32, 64, 4, 0.5, True, False, 0.0, True, 0),
    (torch.float32, 130, 4, 0.5, True, True, 0.2, True, 0),
    (torch.float32, 130, 2, 0.5, True, True, 0.0, False, 0),
    (torch.float32, 130, 1, 1.0, False, True, 0.0, True, 0),
    (torch.float32, 7, 1, 0.5, True, True, 0.1, True, 0),
    (torch.float16, 130, 2, 0.25, True, True, 0.1, True, 0),
    (torch.float16, 64, None, 1.0, False, False, 0.0, True, 0),
    (torch.bfloat16, 1, 1, 0.25, False, True, 0.1, True, 0),
    (torch.bfloat16, 64, 2, 1.0, True, False, 0.0, True, 0),
    (torch.bfloat16, 130, 4, 0.5, True, True, 0.1, True, 0),
    (torch.bfloat16, 130, None, 0.5, False, True, 0.0, True, 0),  # G from the cost model
]


@pytest.mark.parametrize("dtype,m,group_size,density,bias,lora,dropout,cluster,split_k", CASES)
def test_forward_and_gradients_match_torch(dtype, m, group_size, density, bias, lora, dropout,
                                           cluster, split_k):
    check_against_torch(m, 96, 80, dtype, density, bias=bias, lora=lora, dropout=dropout,
                        group_size=group_size, cluster=cluster, split_k=split_k)


@pytest.mark.parametrize("m, group_size, cluster", [(1, None, True), (130, 2, False), (130, 4, True)])
def test_row_grouped_weights_match_torch(m, group_size, cluster):
    # Storage lists block rows in a permuted order: the kernels must store every row at its true place.
    check_against_torch(m, 96, 80, torch.float32, 0.5, bias=True, lora=True, dropout=0.1, row_group=2,
                        group_size=group_size, cluster=cluster, split_k=0)


# Decode split-K: K=512 at density 0.75 gives 24 blocks per block row, two
# 256-deep K steps: 2 splits both reduce work, the third of 3 is empty.
@pytest.mark.parametrize("dtype,m,split_k,dropout", [
    (torch.float32, 7, 2, 0.1), (torch.float16, 7, 3, 0.0), (torch.bfloat16, 1, 2, 0.1)])
def test_decode_split_k_matches_torch(dtype, m, split_k, dropout):
    check_against_torch(m, 32, 512, dtype, 0.75, bias=True, lora=True, dropout=dropout,
                        group_size=1, split_k=split_k)


@pytest.fixture
def program_order(monkeypatch):
    """Set how the interpreter hands out program ids: it runs programs in turn, so without this
    the split-K part arriving last is always the last split. `order(n)` permutes the flat ids
    x * ny * nz + y * nz + z of an (nx, ny, nz) grid (1-D grids: the axis-0 id)."""
    if DEVICE != "cpu":
        pytest.skip("the GPU's program order is not ours to choose")
    from triton.runtime.interpreter import interpreter_builder as builder

    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx
    state = {"order": None, "perm": [], "dims": (1, 1, 1)}

    def dim(x, y, z):
        n = x * y * z
        state["perm"] = list(state["order"](n)) if state["order"] else list(range(n))
        state["dims"] = (x, y, z)
        assert sorted(state["perm"]) == list(range(n))
        set_dim(x, y, z)

    def idx(x, y, z):
        _, ny, nz = state["dims"]
        flat = state["perm"][(x * ny + y) * nz + z]
        set_idx(flat // (ny * nz), flat // nz % ny, flat % nz)

    monkeypatch.setattr(builder, "set_grid_dim", dim)
    monkeypatch.setattr(builder, "set_grid_idx", idx)
    return lambda order: state.__setitem__("order", order)


@pytest.fixture
def addresses(monkeypatch):
    """Every interpreted load and store checked against the launch's tensor arguments: lanes the
    mask lets through must lie inside one of them, and a load reading `values` (the block tiles)
    must form no address outside it even on masked-off lanes (absent blocks, a step's tail)."""
    if DEVICE != "cpu":
        pytest.skip("checks the interpreter's addresses")
    import numpy as np
    from triton.runtime import interpreter

    launch = {"ranges": [], "values": None}
    problems = []
    init = interpreter.GridExecutor._init_args_hst

    def record(self, args_dev, kwargs):
        args, kw = init(self, args_dev, kwargs)
        named = dict(zip(self.arg_names, args), **kw)
        ranges = {name: (t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
                  for name, t in named.items() if isinstance(t, torch.Tensor)}
        launch.update(ranges=list(ranges.values()), values=ranges.get("VALUES"), fn=self.fn.__name__)
        return args, kw

    def check(ptrs, mask, what):
        p = ptrs.data.astype(np.uint64).ravel()
        on = np.ones(p.shape, bool) if mask is None else np.broadcast_to(mask.data, ptrs.data.shape).ravel()
        inside = np.zeros(p.shape, bool)
        for lo, hi in launch["ranges"]:
            inside |= (p >= lo) & (p < hi)
        if (on & ~inside).any():
            problems.append(f"{launch['fn']}: a {what} reads outside every argument")
        if launch["values"] is not None and on.any():
            lo, hi = launch["values"]
            first = p[on][0]
            if lo <= first < hi and not ((p >= lo) & (p < hi)).all():
                problems.append(f"{launch['fn']}: a {what} of values forms addresses outside it")

    builder = interpreter.interpreter_builder
    load, store = builder.create_masked_load, builder.create_masked_store
    monkeypatch.setattr(interpreter.GridExecutor, "_init_args_hst", record)
    monkeypatch.setattr(builder, "create_masked_load",
                        lambda ptrs, mask, other, *a: (check(ptrs, mask, "load"), load(ptrs, mask, other, *a))[1])
    monkeypatch.setattr(builder, "create_masked_store",
                        lambda ptrs, value, mask, *a: (check(ptrs, mask, "store"), store(ptrs, value, mask, *a))[1])
    return problems


@pytest.mark.parametrize("m, group_size, density", [(7, 1, 0.6), (130, 1, 0.6), (130, 4, 0.5)])
def test_no_address_outside_the_tensors(addresses, m, group_size, density):
    # G=1 walks the blocks as one stream whose last step has a tail; G=4 reads a union's absent
    # blocks (index -1); the backward walks the transposed structure.
    check_against_torch(m, 96, 80, torch.float32, density, bias=True, lora=True, dropout=0.1,
                        group_size=group_size, split_k=0)
    assert not addresses, sorted(set(addresses))


@pytest.mark.parametrize("view", ["offset", "row_stride"])
def test_a_misaligned_view_is_copied_to_an_aligned_one(monkeypatch, view):
    weight = make_weight(96, 80, 0.5, torch.float32)
    base = torch.randn(130, 81 if view == "row_stride" else 96, device=DEVICE)
    x = base[:, 1:81] if view == "offset" else base[:, :80]      # 4 bytes off / rows 81 elements apart
    assert (x.data_ptr() % 16 != 0, x.stride(0) % 16 != 0) == ((True, False) if view == "offset" else (False, True))
    seen = []
    if DEVICE == "cpu":
        from triton.runtime import interpreter
        init = interpreter.GridExecutor._init_args_hst

        def record(self, args_dev, kwargs):
            if self.fn.__name__ == "_bsl_matmul_kernel":
                named = dict(zip(self.arg_names, args_dev))
                seen.append((named["X"].data_ptr() % 16, named["stride_xm"] % 16))
            return init(self, args_dev, kwargs)
        monkeypatch.setattr(interpreter.GridExecutor, "_init_args_hst", record)
    x = x.requires_grad_()
    y = block_sparse_linear_triton(x, weight, group_size=2)
    y.sum().backward()
    aligned = x.detach().clone().requires_grad_()
    torch.testing.assert_close(y, block_sparse_linear_triton(aligned, weight, group_size=2), rtol=0, atol=0)
    block_sparse_linear_triton(aligned, weight, group_size=2).sum().backward()
    torch.testing.assert_close(x.grad, aligned.grad, rtol=0, atol=0)
    assert DEVICE != "cpu" or (seen and set(seen) == {(0, 0)}), seen


@pytest.mark.parametrize("last", [0, 1, 2, "shuffled"])
def test_split_k_sums_the_same_whichever_split_arrives_last(program_order, last):
    # M=7 is one token tile and N=32 two block rows at G=1, so program p is split p % 3 of row
    # p // 3; the third split of each row is empty (two K steps). Every kernel of the call, the
    # backward's included, runs in the order given: the LoRA shrinks' K splits (grid (1, 8) at
    # M=7, K=512 and (1, 1) at N=32) arrive in the orders p % 3 == last puts last, or shuffled.
    if last == "shuffled":
        program_order(lambda n: torch.randperm(n, generator=torch.Generator().manual_seed(n)).tolist())
    else:
        program_order(lambda n: sorted(range(n), key=lambda p: (p % 3 == last, p)))
    check_against_torch(7, 32, 512, torch.float32, 0.75, bias=True, lora=True, dropout=0.1, group_size=1,
                        split_k=3)


@pytest.mark.parametrize("dtype,m,row_group,block_size", [
    (torch.float32, 1, 1, 16), (torch.float32, 130, 2, 16), (torch.float16, 70, 1, 16),
    (torch.bfloat16, 130, 1, 16), (torch.float32, 70, 1, 32)])
def test_trained_block_values_get_the_torch_gradient(dtype, m, row_group, block_size):
    """dW at the stored blocks (`_sdd_kernel`) with LoRA beside it, against the torch backend."""
    weight = make_weight(96, 160, 0.5, dtype, block_size=block_size, row_group=row_group)
    weight32 = copy.deepcopy(weight).to(torch.float32)
    x = torch.randn(m, 160, device=DEVICE)
    lora_a, lora_b = torch.randn(RANK, 160, device=DEVICE) / 13, torch.randn(96, RANK, device=DEVICE)
    grad_y = torch.randn(m, 96, device=DEVICE)

    def grads(w, cast, fn):
        w.values.requires_grad_(True)
        w.values.grad = None
        leaves = [t.to(cast).requires_grad_() for t in (x, lora_a, lora_b)]
        fn(w, *leaves).backward(grad_y.to(cast))
        return {"dvalues": w.values.grad, "dx": leaves[0].grad, "dlora_a": leaves[1].grad}

    def kernel(w, x, a, b):
        return block_sparse_linear_triton(x, w, None, a, b, SCALING)

    def torch_backend(w, x, a, b):
        return linear_torch(x, w, None, a, b, SCALING)

    got = grads(weight, dtype, kernel)
    assert got["dvalues"].dtype == dtype and got["dvalues"].shape == weight.values.shape
    assert_within_rule(got, grads(weight, dtype, torch_backend), grads(weight32, torch.float32, torch_backend),
                       dtype)


@pytest.mark.parametrize("dtype,group_size,split_k,bad", [
    (torch.float32, 4, 0, float("nan")), (torch.float32, 1, 0, float("nan")), (torch.bfloat16, 2, 0, float("inf")),
    (torch.float32, 4, 2, float("-inf"))])
def test_pruned_weights_do_not_exist_for_a_non_finite_input(dtype, group_size, split_k, bad):
    # The grouped schedule multiplies a group's union, absent blocks as zero tiles: a NaN or inf
    # input must still reach exactly the outputs whose stored blocks read it (as on the torch
    # backend; there NaN, where the blocks' product could be +-inf), forward and dX; every other
    # output equals the torch backend's.
    weight = make_weight(96, 160, 0.4, dtype, row_group=1)
    mask = weight.block_mask.cpu()

    def mixed_groups(m, g):  # groups (of the schedule's rows) where some rows have the block and some lack it
        rows = get_schedule(weight, g, transposed=m is not mask).group_rows.cpu()
        return lambda c: any(m[r[r >= 0].long(), c].any() and not m[r[r >= 0].long(), c].all() for r in rows)

    # A column some group's union holds while one of its rows lacks the block: the 0 * NaN case.
    forward_case = mixed_groups(mask, group_size)
    col = next(c for c in range(mask.shape[1]) if forward_case(c) or group_size == 1 and not mask[:, c].all()
               and mask[:, c].any())
    backward_case = mixed_groups(mask.T, group_size)
    row = next(r for r in range(mask.shape[0]) if backward_case(r) or group_size == 1 and not mask[r].all()
               and mask[r].any())
    m = 130
    x = torch.randn(m, 160, device=DEVICE, dtype=dtype)
    x[1, col * 16 + 3] = bad
    x = x.requires_grad_()
    y = block_sparse_linear_triton(x, weight, group_size=group_size, split_k=split_k)
    ref_x = x.detach().clone().requires_grad_()
    ref = linear_torch(ref_x, weight)
    reads = mask[:, col].repeat_interleave(16).to(DEVICE)
    assert (~torch.isfinite(y[1, reads])).all() and torch.isfinite(y[1, ~reads]).all()
    others = torch.arange(m, device=DEVICE) != 1
    torch.testing.assert_close(y[others], ref[others], rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-2)
    torch.testing.assert_close(y[1, ~reads], ref[1, ~reads], rtol=1e-2 if dtype != torch.float32 else 1e-5,
                               atol=1e-2)
    grad = torch.zeros(m, 96, device=DEVICE, dtype=dtype)
    grad[2, row * 16 + 5] = bad
    y.backward(grad)
    stored = mask[row].repeat_interleave(16).to(DEVICE)
    assert (~torch.isfinite(x.grad[2, stored])).all() and torch.isfinite(x.grad[2, ~stored]).all()
    assert torch.isfinite(x.grad[others & (torch.arange(m, device=DEVICE) != 2)]).all()


def test_empty_weight_gives_bias_plus_lora():
    weight, got = check_against_torch(7, 64, 48, torch.float32, 0.0, bias=True, lora=True,
                                      dropout=0.0, group_size=2)
    assert weight.nnz_blocks == 0


@pytest.mark.parametrize("block_size,group_size", [(32, 2), (64, 1)])
def test_larger_blocks(block_size, group_size):
    weight = make_weight(128, 128, 0.5, torch.float32, block_size)
    ops = make_operands(70, 128, 128, torch.float32, True, True)
    grad_y = torch.randn(70, 128, device=DEVICE)
    got = run(lambda x, bias, lora_a, lora_b: block_sparse_linear_triton(
        x, weight, bias, lora_a, lora_b, SCALING, group_size=group_size), ops, grad_y)
    ref = run(lambda x, bias, lora_a, lora_b: linear_torch(
        x, weight, bias, lora_a, lora_b, SCALING), ops, grad_y)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-4)


def test_block_size_8_is_rejected_by_name():
    weight = make_weight(32, 32, 0.5, torch.float32, block_size=8)
    with pytest.raises(ValueError, match="block_size=8"):
        block_sparse_linear_triton(torch.randn(4, 32, device=DEVICE), weight)


def test_public_function_takes_3d_and_non_contiguous_x():
    weight = make_weight(64, 96, 0.5, torch.float32)
    bias = torch.randn(64, device=DEVICE)
    x = torch.randn(2, 96, 5, device=DEVICE).transpose(1, 2)  # [2, 5, 96], last dim strided
    assert not x.is_contiguous()
    y = block_sparse_linear(x, weight, bias, backend="triton")
    ref = block_sparse_linear(x, weight, bias, backend="torch")
    assert y.shape == (2, 5, 64)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    rows = torch.randn(9, 2 * 96, device=DEVICE)[:, ::2]  # strided rows and columns
    torch.testing.assert_close(block_sparse_linear(rows, weight, backend="triton"),
                               block_sparse_linear(rows, weight, backend="torch"), rtol=1e-5, atol=1e-5)


def test_split_k_is_deterministic():
    weight = make_weight(32, 512, 0.75, torch.float32)
    x = torch.randn(3, 512, device=DEVICE)
    first = block_sparse_linear_triton(x, weight, split_k=2)
    again = block_sparse_linear_triton(x, weight, split_k=2)
    assert torch.equal(first, again)
    torch.testing.assert_close(first, block_sparse_linear_triton(x, weight, split_k=1))


def test_dropout_mask_comes_from_the_seed():
    seed = torch.tensor([1234], dtype=torch.int64, device=DEVICE)
    keep = philox_keep_mask(seed, 64, 96, 0.25)
    assert torch.equal(keep, philox_keep_mask(seed, 64, 96, 0.25))
    assert not torch.equal(keep, philox_keep_mask(seed + 1, 64, 96, 0.25))
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    assert abs(keep.mean().item() - 0.75) < 0.03
    # Four neighbours share one Philox call, each its own output: as often alike as independent bits.
    quads = keep.view(64, 24, 4)
    alike = (quads == quads[..., :1]).all(-1).float().mean().item()
    assert abs(alike - (0.75 ** 4 + 0.25 ** 4)) < 0.05, alike


def test_fake_tensor_path():
    from torch._subclasses.fake_tensor import FakeTensorMode

    weight = make_weight(64, 48, 0.5, torch.float32)
    luts = get_schedule(weight, 2).tensors
    t_luts = get_schedule(weight, 2, transposed=True).tensors
    real = [torch.randn(5, 48), torch.randn(64), torch.randn(RANK, 48), torch.randn(64, RANK)]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x, bias, a, b = (mode.from_tensor(t.to(DEVICE)) for t in real)
        w_luts = [weight.crow, weight.col, weight.row_perm]
        y, shrink, keep_bits = torch.ops.blocksparse.linear(x, weight.values, luts, t_luts, w_luts, bias, a, b,
                                                            None, 64, 1.0, 0.0, 0, True)
        assert y.shape == (5, 64) and shrink.shape == (5, RANK) and keep_bits.shape == (0, 0)
        seed = mode.from_tensor(torch.zeros(1, dtype=torch.int64, device=DEVICE))
        _, _, keep_bits = torch.ops.blocksparse.linear(x, weight.values, luts, t_luts, w_luts, bias, a, b, seed,
                                                       64, 1.0, 0.1, 0, True)
        assert keep_bits.shape == (5, 2) and keep_bits.dtype == torch.int32   # 48 columns: two words
        grads = torch.ops.blocksparse.linear_backward(y, x, weight.values, t_luts, w_luts, a, b, shrink,
                                                      keep_bits, 1.0, 0.1, 0, True, True, True, False)
        assert [tuple(g.shape) for g in grads] == [(5, 48), tuple(weight.values.shape), (RANK, 48), (0,)]


def test_torch_compile_traces_the_op():
    weight = make_weight(64, 48, 0.5, torch.float32)
    a = (torch.randn(RANK, 48, device=DEVICE) / 7).requires_grad_()
    b = torch.randn(64, RANK, device=DEVICE).requires_grad_()

    def fn(x):
        return block_sparse_linear(x, weight, None, a, b, 2.0, backend="triton").square().sum()

    x = torch.randn(3, 48, device=DEVICE, requires_grad=True)
    compiled = torch.compile(fn, backend="aot_eager")
    loss = compiled(x)
    grads = torch.autograd.grad(loss, (x, a, b))
    ref_loss = fn(x)
    ref_grads = torch.autograd.grad(ref_loss, (x, a, b))
    torch.testing.assert_close(loss, ref_loss)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref)


def test_opcheck_forward_op():
    """Schema, fake tensor, autograd registration and AOT dispatch of the registered op."""
    weight = make_weight(64, 48, 0.5, torch.float32)
    luts = get_schedule(weight, 2).tensors
    t_luts = get_schedule(weight, 2, transposed=True).tensors
    x, bias, a, b = (t.to(DEVICE).requires_grad_() for t in (
        torch.randn(5, 48), torch.randn(64), torch.randn(RANK, 48), torch.randn(64, RANK)))
    seed = torch.tensor([7], dtype=torch.int64, device=DEVICE)
    values = weight.values.detach().clone().requires_grad_()  # the trained-blocks path too
    w_luts = [weight.crow, weight.col, weight.row_perm]
    torch.library.opcheck(torch.ops.blocksparse.linear.default,
                          (x, values, luts, t_luts, w_luts, bias, a, b, seed, 64, 0.5, 0.1, 0, True))


@pytest.mark.parametrize("m", [5, 130])
def test_every_autotune_candidate_computes_the_same(monkeypatch, m):
    """Each config autotuning may pick (decode: splits and K steps; prefill: BM, warps) is exact."""
    import blocksparse.kernels.block_sparse_linear as bsl

    weight = make_weight(96, 512, 0.5, torch.float32)
    x = torch.randn(m, 512, device=DEVICE)
    expected = block_sparse_linear_triton(x, weight, group_size=2)
    timings = iter(range(100, 0, -1))  # each candidate "faster" than the last: the last wins
    ran = []

    def fake_bench(fn, **_):
        ran.append(fn())
        return next(timings)

    monkeypatch.setattr(bsl, "_autotune_enabled", lambda device: True)
    monkeypatch.setattr(bsl.triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(bsl, "_TUNED", {})
    monkeypatch.setattr(bsl, "AUTOTUNE_RECORDS", [])
    got = block_sparse_linear_triton(x, weight, group_size=2)
    assert len(bsl._TUNED) == 1
    (cfg, split_k), = bsl._TUNED.values()
    candidates = bsl.matmul_candidates(*_heuristic_args(bsl, weight, m), m=m)
    assert len(ran) == len(candidates) >= 3 and (cfg, split_k) == candidates[-1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_wide_tile_candidate_forward_and_grads(monkeypatch):
    """The sm_90 wide tile (256 x 128 at G=8, 16-bit inputs, M > 512), which autotuning may
    pick, gives the heuristic tile's output and gradients (bias and LoRA fused)."""
    import blocksparse.kernels.block_sparse_linear as bsl
    from blocksparse.kernels.configs import WIDE_TILE_BM

    if DEVICE == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the wide tile is an sm_90 candidate")
    weight = make_weight(128, 96, 0.5, torch.bfloat16)
    x0, bias, a, b = (torch.randn(*shape, device=DEVICE).to(torch.bfloat16)
                      for shape in ((600, 96), (128,), (RANK, 96), (128, RANK)))

    def run():
        x = x0.clone().requires_grad_()
        y = block_sparse_linear_triton(x, weight, bias, a, b, scaling=0.5, group_size=8)
        y.float().square().sum().backward()
        return y.detach(), x.grad

    expected = run()
    offered = []

    def wide_fastest(candidates, launch):
        offered.append([c.constexprs["BM"] for c, _ in candidates])
        return [0.0 if c.constexprs["BM"] == WIDE_TILE_BM else 1.0 for c, _ in candidates]

    monkeypatch.setattr(bsl, "_autotune_enabled", lambda device: True)
    monkeypatch.setattr(bsl, "_time_candidates", wide_fastest)
    monkeypatch.setattr(bsl, "_TUNED", {})
    monkeypatch.setattr(bsl, "AUTOTUNE_RECORDS", [])
    got = run()
    assert len(offered) == 2 and all(WIDE_TILE_BM in bms for bms in offered)  # forward and dX
    assert [r["chosen"].split()[0] for r in bsl.AUTOTUNE_RECORDS] == [f"{WIDE_TILE_BM}x128"] * 2
    assert [r["transposed"] for r in bsl.AUTOTUNE_RECORDS] == [False, True]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_an_autotune_candidate_that_fails_is_ruled_out(monkeypatch):
    import blocksparse.kernels.block_sparse_linear as bsl

    monkeypatch.setattr(bsl.triton.testing, "do_bench", lambda fn, **_: fn())

    def run(candidate):
        if candidate == "too big":
            raise RuntimeError("out of resources: shared memory")
        return 1.5

    assert bsl._time_candidates(["fits", "too big"], run) == [1.5, float("inf")]
    with pytest.raises(RuntimeError, match="out of resources"):
        bsl._time_candidates(["too big", "too big"], run)


def _heuristic_args(bsl, weight, m):
    schedule = get_schedule(weight, 2)
    cfg, split, steps = bsl.matmul_plan(m, 16, 2, 4, schedule.group_rows.shape[0], schedule.union_col.numel() - 1,
                                        out_dropout=False, smem_bytes=bsl.SMEM_BYTES[80],
                                        num_sms=bsl.DEFAULT_NUM_SMS)
    return cfg, split, steps, 4, bsl.SMEM_BYTES[80]


