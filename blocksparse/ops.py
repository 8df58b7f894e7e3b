"""`block_sparse_linear`: Y = X W^T (+ bias) (+ s * drop(X) A^T B^T), W block-sparse.

Two backends behind one function:

- "triton": the fused kernels in `blocksparse.kernels` (CUDA tensors, or the
  CPU under TRITON_INTERPRET=1 for tests);
- "torch": plain PyTorch, the CPU path users get and the reference the kernels
  are tested against. For decode-sized inputs it multiplies only the stored
  blocks (see `_sparse_matmul_small_m`); for larger inputs it runs one GEMM per
  fully shared row group, or else materialises the masked dense W for one call
  (`torch_schedule` says which); an input holding NaN or inf always takes the
  stored-blocks path, so pruned weights never meet it.

"auto" picks Triton for CUDA tensors and torch otherwise; the environment
variable BLOCKSPARSE_BACKEND=triton|torch overrides "auto".
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .format import BlockSparseWeight
from .grouping import cluster_block_rows

BACKENDS = ("auto", "torch", "triton")

# Up to this many tokens the torch backend multiplies only the stored blocks;
# above it the dense product of the masked weight is faster on a CPU (measured:
# docs/DESIGN.md, "The torch backend").
SMALL_M_MAX = 16
# Fully shared row groups: up to BLOCKS_MAX_M_SHARED tokens each block row gathers its
# own X columns (Y and dX; dW up to SMALL_M_MAX); above it the forward's group rows share
# one gathered slab up to SHARED_SLAB_MAX_M, and beyond that (dX at once) each group runs
# one GEMM on its packed tiles (measured at 4096-11008 wide weights: docs/DESIGN.md).
BLOCKS_MAX_M_SHARED = 4
SHARED_SLAB_MAX_M = 64
# Above SMALL_M_MAX tokens, row groups whose unions (zero tiles included) cover more than
# this fraction of W run dense BLAS on the masked weight instead of one GEMM per group: the
# GEMMs cost about union x dense plus the gathers, and broke even near 0.6 (docs/DESIGN.md).
UNION_GEMM_MAX = 0.6
# dX over row groups adds each group's product into its union's columns of dX: from this
# many additions per dX entry on average (sum of unions x b / K), adding whole token-long
# rows of dX^T beats adding b-wide blocks token by token (measured: slower at 6, faster at
# 16 and 43; 8 lies in that gap, docs/DESIGN.md).
DX_TRANSPOSED_MIN_ADDS = 8
# Rows per group when the torch backend groups a free mask's rows itself.
FREE_MASK_ROW_GROUP = 8
# Working-set size of one chunk of block rows in the small-M path: the gathered
# X slab and the transposed weight tiles of a chunk should stay in cache.
_CHUNK_BYTES = 1 << 20
# One step of the row-group GEMMs: its gathered X slab and its packed tiles stay in
# cache. 4 MiB of slab with one group's tiles (1 MiB) per step was the best of 1/4/16 MiB
# x 1/4/16 groups measured at 4096x4096, M = 2048 (docs/DESIGN.md, "The torch backend").
_GROUP_SLAB_BYTES = 4 << 20
_GROUP_TILE_BYTES = 1 << 20


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        forced = os.environ.get("BLOCKSPARSE_BACKEND", "").strip().lower()
        if forced:
            if forced not in ("torch", "triton"):
                raise ValueError(
                    f"BLOCKSPARSE_BACKEND must be 'torch' or 'triton', got {forced!r}"
                )
            return forced
        return "triton" if x.is_cuda else "torch"
    return backend


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_inputs(x: torch.Tensor, weight: BlockSparseWeight, bias: torch.Tensor | None,
                 lora_a: torch.Tensor | None, lora_b: torch.Tensor | None) -> None:
    """Raise a clear error for any operand that does not fit W [N, K]."""
    if not isinstance(weight, BlockSparseWeight):
        raise TypeError(f"weight must be a BlockSparseWeight, got {type(weight).__name__}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have in_features={k} as its last dimension, got {_describe(x)}")
    values = weight.values
    if x.dtype != values.dtype or x.device != values.device:
        raise ValueError(
            f"x and the weight must share dtype and device: x has {_describe(x)}, "
            f"weight values have dtype {weight.dtype}, device {weight.device}"
        )
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(
            f"bias must have shape ({n},), dtype {x.dtype}, device {x.device}; got {_describe(bias)}"
        )
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together")
    if lora_a is not None:
        r = lora_a.shape[0] if lora_a.dim() == 2 else -1
        if lora_a.dim() != 2 or lora_a.shape[1] != k:
            raise ValueError(f"lora_a must be [r, in_features={k}], got {_describe(lora_a)}")
        if lora_b.shape != (n, r):
            raise ValueError(f"lora_b must be [out_features={n}, r={r}], got {_describe(lora_b)}")
        for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
            if t.dtype != x.dtype or t.device != x.device:
                raise ValueError(
                    f"{name} must match x (dtype {x.dtype}, device {x.device}); got {_describe(t)}"
                )


# --------------------------------------------------------------------------
# torch backend
# --------------------------------------------------------------------------
def _padded_rows(weight: BlockSparseWeight) -> dict:
    """The torch backend's padded per-row ("ELL") layout: each storage row lists
    max-blocks-per-row block indices; padding points at block 0 and is masked.
    With a row grouping, `to_storage` gathers true block rows into storage order
    and `to_true` the reverse (None: storage order is the true order)."""
    crow = weight.crow.long()
    counts = crow[1:] - crow[:-1]
    width = int(counts.max()) if counts.numel() else 0
    slot = torch.arange(width, device=crow.device)
    valid = slot[None, :] < counts[:, None]
    index = torch.where(valid, crow[:-1, None] + slot[None, :], 0)
    perm = weight.row_perm.long()
    identity = bool((perm == torch.arange(perm.numel(), device=perm.device)).all())
    # int64: the index tensors of index_select; the chunk plans hold views of these.
    return {"index": index, "col": torch.where(valid, weight.col.long()[index], 0),
            "valid": valid, "uniform": bool(valid.all()),
            "to_storage": None if identity else perm, "to_true": None if identity else torch.argsort(perm)}


def _row_chunks(weight: BlockSparseWeight, m: int) -> dict:
    """The stored-blocks plan of `weight` for M tokens (built once per weight and M <=
    SMALL_M_MAX): `chunks` lists (r0, r1, cols, index, valid) per chunk of storage rows of
    the padded row layout, with the weight's grid, block size, `uniform` (every row has
    P blocks) and the row order (`to_true`, `to_storage`) at hand: the decode path makes
    one look-up per call, not a dozen (a decode step of the embedded model makes 180 calls).

    cols [ch*P]: the chunk's block columns; index: where its tiles lie in `values`
    (None when every row has P blocks: the tiles are then one contiguous stretch);
    valid: the padding mask, None if uniform. A chunk's gathered activations
    ([M, ch*P*b]) and its tiles stay in cache.
    """
    if m > SMALL_M_MAX:  # the non-finite fallback at large M: rare, not cached per M
        return _build_row_chunks(weight, m)
    return weight.layout(f"row_chunks_{m}", lambda w: _build_row_chunks(w, m))


def _build_row_chunks(weight: BlockSparseWeight, m: int) -> dict:
    rows = weight.layout("padded_rows", _padded_rows)
    b, width = weight.block_size, rows["index"].shape[1]
    n_rows, n_cols = weight.block_grid
    chunk = max(1, _CHUNK_BYTES // max(width * b * m * weight.values.element_size(), 1))
    uniform, chunks = rows["uniform"], []
    for r0 in range(0, n_rows, chunk):
        r1 = min(r0 + chunk, n_rows)
        chunks.append((r0, r1, rows["col"][r0:r1].reshape(-1),  # views: no copy per plan
                       None if uniform else rows["index"][r0:r1],
                       None if uniform else rows["valid"][r0:r1]))
    return {"chunks": chunks, "rows": n_rows, "cols": n_cols, "b": b, "n": weight.shape[0], "k": weight.shape[1],
            "uniform": uniform, "empty": weight.nnz_blocks == 0,
            "to_true": rows["to_true"], "to_storage": rows["to_storage"]}


def _row_slabs(values: torch.Tensor, plan: dict, r0: int, r1: int, index: torch.Tensor | None) -> torch.Tensor:
    """[ch, P*b, b]: the chunk's transposed tiles of `values` (laid out like the weight's),
    row r's stacked into the [P*b, b] slab of W^T it needs (a free view when every row
    has P blocks; short rows are padded with block 0, which `valid` masks out)."""
    b = plan["b"]
    if index is None:
        return values.view(plan["rows"], -1, b)[r0:r1]
    return values[index].view(r1 - r0, -1, b)


def _sparse_matmul_small_m(x: torch.Tensor, weight: BlockSparseWeight) -> torch.Tensor:
    """Y = X W^T over the stored blocks only: small M, and any M holding a non-finite input.

    Gathering the X columns of block row r's blocks into [M, P*b] turns the row
    into one small GEMM against its slab, and a chunk of rows into one batched
    GEMM; W is read from memory once, like dense, but only its kept blocks.
    """
    m = x.shape[0]
    plan = _row_chunks(weight, m)
    if plan["empty"] or m == 0:
        return x.new_zeros(m, plan["n"])
    values, b, rows = weight.values, plan["b"], plan["rows"]
    x_blocks = x.reshape(m, plan["cols"], b)
    if len(plan["chunks"]) == 1 and plan["uniform"]:  # decode's usual case: one gather, one bmm
        gathered = x_blocks.index_select(1, plan["chunks"][0][2]).view(m, rows, -1).transpose(0, 1)
        out = torch.bmm(gathered, values.view(rows, -1, b))
    else:
        out = x.new_empty(rows, m, b)  # storage order
        for r0, r1, cols, index, valid in plan["chunks"]:
            gathered = x_blocks.index_select(1, cols)  # [M, ch*P, b]
            if valid is not None:
                gathered = torch.where(valid.reshape(1, -1, 1), gathered, 0.0)  # not * (0 * NaN)
            # [ch, M, P*b] as a strided view: bmm reads it in place.
            torch.bmm(gathered.view(m, r1 - r0, -1).transpose(0, 1), _row_slabs(values, plan, r0, r1, index),
                      out=out[r0:r1])
    if plan["to_true"] is not None:
        out = out.index_select(0, plan["to_true"])
    return out.transpose(0, 1).reshape(m, plan["n"])


def _sparse_matmul_t_small_m(grad_y: torch.Tensor, weight: BlockSparseWeight) -> torch.Tensor:
    """dX = dY W over the stored blocks only (small M, or a non-finite dY): the forward's
    slabs, transposed, scatter-added into the block columns they came from."""
    m = grad_y.shape[0]
    plan = _row_chunks(weight, m)
    b = plan["b"]
    grad_x = grad_y.new_zeros(m, plan["cols"], b)
    if plan["empty"] or m == 0:
        return grad_x.reshape(m, plan["k"])
    grad_y_blocks = grad_y.reshape(m, plan["rows"], b)
    if plan["to_storage"] is not None:
        grad_y_blocks = grad_y_blocks.index_select(1, plan["to_storage"])
    for r0, r1, cols, index, valid in plan["chunks"]:
        slab = _row_slabs(weight.values, plan, r0, r1, index)
        partial = torch.bmm(grad_y_blocks[:, r0:r1].transpose(0, 1), slab.transpose(1, 2))  # [ch, M, P*b]
        partial = partial.view(r1 - r0, m, -1, b)
        if valid is not None:
            partial = torch.where(valid[:, None, :, None], partial, 0.0)
        grad_x.index_add_(1, cols, partial.permute(1, 0, 2, 3).reshape(m, -1, b))
    return grad_x.reshape(m, plan["k"])


def _grad_values_small_m(x: torch.Tensor, grad_y: torch.Tensor, weight: BlockSparseWeight) -> torch.Tensor:
    """dW at the stored blocks, in `values`' layout ([nnz, b, b]): per chunk of block rows
    the forward's gathered X columns, transposed, times the rows' dY ([ch, P*b, M] x
    [ch, M, b] = the rows' [P*b, b] slabs, written where their tiles lie)."""
    m = x.shape[0]
    plan = _row_chunks(weight, m)
    b = plan["b"]
    grad = torch.zeros_like(weight.values)
    if plan["empty"] or m == 0:
        return grad
    x_blocks = x.reshape(m, plan["cols"], b)
    grad_y_blocks = grad_y.reshape(m, plan["rows"], b)
    if plan["to_storage"] is not None:
        grad_y_blocks = grad_y_blocks.index_select(1, plan["to_storage"])
    for r0, r1, cols, index, valid in plan["chunks"]:
        gathered = x_blocks.index_select(1, cols).view(m, r1 - r0, -1).permute(1, 2, 0)  # [ch, P*b, M]
        rows_grad_y = grad_y_blocks[:, r0:r1].transpose(0, 1)  # [ch, M, b]
        if index is None:
            torch.bmm(gathered, rows_grad_y, out=_row_slabs(grad, plan, r0, r1, None))
        else:  # padding slots (valid False) read block 0's columns: dropped
            grad[index[valid]] = torch.bmm(gathered, rows_grad_y).view(r1 - r0, -1, b, b)[valid]
    return grad


def _row_groups(weight: BlockSparseWeight) -> dict:
    """The GEMM plan of a weight: its block rows in groups of G (the weight's own row
    grouping, groups of G consecutive storage rows; or, for a free mask, G =
    FREE_MASK_ROW_GROUP rows clustered once by shared columns), each group's union of block
    columns, in steps of a few groups whose packed tiles ([U*b, G*b] each) fit
    `_GROUP_TILE_BYTES`. The last group may be shorter. `union_cols`: every group's union
    columns, group after group (one gather for the shared-slab forward).

    `shared`: every row holds its group's whole union and every union has P blocks (fully
    shared: the tiles pack without zeros, and the forward's shared-slab path applies);
    otherwise a row's missing union blocks are zero tiles, union / density more work than
    its blocks, and a step's `pack` says where each of its stored tiles' rows go in its
    packed matrices (`tiles`: the step's blocks, a range of `values` or their indices).
    The products write Y in schedule order; `to_true` / `to_schedule` reorder block
    columns between it and the true order (None: the same). `dx_adds`: how many group
    products each dX entry receives on average (sum of unions x b / K). `usable` is False
    without blocks, or when the union is too dense (> UNION_GEMM_MAX) to beat dense BLAS."""
    (rows, cols_in), b = weight.block_grid, weight.block_size
    if weight.nnz_blocks == 0 or weight.density > UNION_GEMM_MAX:  # a union is never below the density
        return {"usable": False}
    crow, col, device = weight.crow.long(), weight.col.long(), weight.col.device
    counts = crow[1:] - crow[:-1]
    row_of = torch.repeat_interleave(torch.arange(rows, device=device), counts)  # each block's storage row
    g, order = weight.row_group, None
    if g == 1:  # a free mask: rows with similar columns grouped (the greedy pass; no swap search)
        g = FREE_MASK_ROW_GROUP
        stored = torch.zeros(rows, cols_in, dtype=torch.bool, device=device)
        stored[row_of, col] = True
        order = cluster_block_rows(stored.cpu(), g, max_swap_passes=0).to(device)  # storage rows in schedule order
    position = row_of if order is None else torch.argsort(order)[row_of]  # each block's schedule position
    n_groups = -(-rows // g)
    present = torch.zeros(n_groups, cols_in, dtype=torch.bool, device=device)
    present[position // g, col] = True
    unions, sizes = present.sum(1), torch.full((n_groups,), g, device=device)
    sizes[-1] = rows - (n_groups - 1) * g
    union_density = float((unions * sizes).sum()) / (rows * cols_in)
    if union_density > UNION_GEMM_MAX:
        return {"usable": False}
    shared = order is None and bool((counts == counts[0]).all() and (unions == counts[0]).all())
    slot = (present.cumsum(1) - 1)[position // g, col]  # each block's place in its group's union
    by_position = torch.argsort(position, stable=True)  # blocks in schedule order
    first_block = torch.zeros(n_groups + 1, dtype=torch.long, device=device)
    first_block[1:] = torch.bincount(position // g, minlength=n_groups).cumsum(0)
    es, steps, full = weight.values.element_size(), [], rows // g
    for start, stop, size in ((0, full, g), (full, n_groups, rows - full * g)):
        group = start
        while group < stop:  # a step: as many groups as fit the tile budget, at least one
            end, tile_bytes = group + 1, int(unions[group]) * b * b * size * es
            while end < stop and tile_bytes + int(unions[end]) * b * b * size * es <= _GROUP_TILE_BYTES:
                tile_bytes += int(unions[end]) * b * b * size * es
                end += 1
            step_unions = unions[group:end].tolist()
            span = (int(first_block[group]), int(first_block[end]))
            block = by_position[span[0]:span[1]]
            tiles = span if order is None else block  # in storage order the step's blocks are one stretch
            pack = None
            if not shared:  # the packed row (of b elements) of each stored tile's b rows
                local = position[block] // g - group
                region = torch.tensor([0] + step_unions[:-1], device=device).cumsum(0) * b * size
                pack = (region[local][:, None] + (slot[block][:, None] * b + torch.arange(b, device=device)) * size
                        + (position[block] % g)[:, None]).reshape(-1)
            steps.append({"first": group * g, "size": size, "groups": end - group, "unions": step_unions,
                          "cols": present[group:end].nonzero()[:, 1], "tiles": tiles, "pack": pack})
            group = end
    true_of = weight.row_perm.long() if order is None else weight.row_perm.long()[order]  # per schedule row
    identity = bool((true_of == torch.arange(rows, device=device)).all())
    return {"usable": True, "shared": shared, "union_density": union_density, "steps": steps,
            "dx_adds": float(unions.sum()) / cols_in, "union_cols": present.nonzero()[:, 1],
            "to_schedule": None if identity else true_of,
            "to_true": None if identity else torch.argsort(true_of)}


def _group_steps(m: int, layout: dict, like: torch.Tensor, block_size: int):
    """The grouped product step by step: yields (step, token rows per chunk, buffers). One
    set of buffers per call serves every step (packed tiles and a chunk's gathered slab, as
    flat storage): a fresh multi-MiB tensor per step cost more in page faults than the
    copies into it (4096x4096, M = 2048: gathering X took 226 ms into new tensors, 50 ms
    into one buffer). A chunk's slab ([rows, sum of the step's U*b]) stays within
    `_GROUP_SLAB_BYTES`, so it stays in cache while the step's tiles multiply it."""
    b, es = block_size, like.element_size()
    plan = [(step, max(1, min(m, _GROUP_SLAB_BYTES // max(sum(step["unions"]) * b * es, 1))))
            for step in layout["steps"]]
    buffers = {"tiles": _tile_buffer(layout, like, b),
               "slab": like.new_empty(max(rows * sum(s["unions"]) * b for s, rows in plan))}
    for step, rows in plan:
        yield step, rows, buffers


def _tile_buffer(layout: dict, like: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat storage for the largest step's packed tiles, reused by every step of a call."""
    b = block_size
    return like.new_empty(max(sum(s["unions"]) * b * s["size"] * b for s in layout["steps"]))


def _pack(weight: BlockSparseWeight, step: dict, buffer: torch.Tensor) -> list[torch.Tensor]:
    """The step's groups' W^T tiles as dense [U*b, G*b] matrices in `buffer` (zero where a
    row lacks a union block): a permuted copy for fully shared groups, a row scatter else."""
    b, size, unions = weight.block_size, step["size"], step["unions"]
    total = sum(unions) * b * size * b
    if step["pack"] is None:
        per_row, groups = unions[0], step["groups"]
        buffer[:total].view(groups, per_row, b, size, b).copy_(
            _step_tiles(weight.values, step).view(groups, size, per_row, b, b).permute(0, 2, 3, 1, 4))
    else:
        buffer[:total].zero_().view(-1, b).index_copy_(0, step["pack"], _step_tiles(weight.values, step).reshape(-1, b))
    return _split_packed(buffer, unions, b, size)


def _step_tiles(values: torch.Tensor, step: dict) -> torch.Tensor:
    """The step's stored tiles in schedule order: a slice of `values`, or gathered."""
    tiles = step["tiles"]
    return values[tiles[0]:tiles[1]] if isinstance(tiles, tuple) else values.index_select(0, tiles)


def _split_packed(buffer: torch.Tensor, unions: list[int], b: int, size: int) -> list[torch.Tensor]:
    """The [U*b, size*b] matrices of a step's groups, one after the other in `buffer`."""
    out, start = [], 0
    for u in unions:
        out.append(buffer[start:start + u * b * size * b].view(u * b, size * b))
        start += u * b * size * b
    return out


def _unpack(weight: BlockSparseWeight, step: dict, buffer: torch.Tensor, out: torch.Tensor) -> None:
    """The inverse of `_pack`: the step's packed matrices (in `buffer`) written as its
    groups' stored tiles of `out` (laid out like `values`); zero tiles are dropped."""
    b, size, unions, tiles = weight.block_size, step["size"], step["unions"], step["tiles"]
    packed = buffer[:sum(unions) * b * size * b]
    if step["pack"] is None:
        per_row, groups = unions[0], step["groups"]
        out[tiles[0]:tiles[1]].view(groups, size, per_row, b, b).copy_(
            packed.view(groups, per_row, b, size, b).permute(0, 3, 1, 2, 4))
    elif isinstance(tiles, tuple):
        torch.index_select(packed.view(-1, b), 0, step["pack"], out=out[tiles[0]:tiles[1]].view(-1, b))
    else:
        out.index_copy_(0, tiles, packed.view(-1, b).index_select(0, step["pack"]).view(-1, b, b))


def _block_index(blocks_per_token: int, tokens: int, blocks: torch.Tensor) -> torch.Tensor:
    """Row indices into the [tokens * blocks_per_token, b] view of a [tokens, width] matrix
    that name its b-wide column blocks `blocks` in each token row, token-major. Gathers
    and scatters through such a view run at copy speed (a dim-1 select of a few blocks ran
    3-4x slower), and the first r tokens' indices are a prefix."""
    starts = torch.arange(0, tokens * blocks_per_token, blocks_per_token, device=blocks.device)
    return (starts[:, None] + blocks[None, :]).reshape(-1)


def _permute_block_columns(t: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """t [M, R*b] with its b-wide column blocks reordered (block j of the result is block
    order[j] of t), or t itself for no order: one row select over the whole matrix, about
    3x faster than scattering each step's result (index_copy_) into place."""
    if order is None:
        return t
    m, b = t.shape[0], t.shape[1] // order.numel()
    return t.view(-1, b).index_select(0, _block_index(order.numel(), m, order)).view(m, -1)


def _shared_slab_matmul(x: torch.Tensor, weight: BlockSparseWeight, layout: dict) -> torch.Tensor:
    """Y = X W^T for fully shared row groups at a few dozen tokens: X's union columns of
    every group gathered in one select ([M, groups, U*b], each group's slab shared by its
    G rows) and each row's stored tiles multiplied where they lie ([M, U*b] x [U*b, b];
    one bmm per group reads its slab through a zero batch stride). No packing: at this M
    copying the tiles costs about as much as multiplying them, and a gather per row (the
    "blocks" path) copies X G times. The loop holds nothing but the bmm: per-group
    gathers and slicing cost ~20% at 4096x4096, M = 16 (DESIGN.md, "The torch backend")."""
    m, (n, _), b = x.shape[0], weight.shape, weight.block_size
    rows_out, cols_in = weight.block_grid
    g, span = weight.row_group, layout["steps"][0]["unions"][0] * b
    slabs = x.reshape(m, cols_in, b).index_select(1, layout["union_cols"]).view(m, -1, span)
    tiles = weight.values.view(rows_out, span, b)
    result = x.new_empty(rows_out, m, b)  # block rows in storage order
    for j, start in enumerate(range(0, rows_out, g)):
        stop = min(start + g, rows_out)
        torch.bmm(slabs[:, j].expand(stop - start, m, span), tiles[start:stop], out=result[start:stop])
    if layout["to_true"] is not None:
        result = result.index_select(0, layout["to_true"])
    return result.transpose(0, 1).reshape(m, n)


def _tile_spans(step: dict, b: int) -> list[tuple[slice, slice]]:
    """Per group of a step: its union's columns in the step's gathered slab, and its rows'
    columns of Y (in schedule order)."""
    spans, start = [], 0
    for j, union in enumerate(step["unions"]):
        first = (step["first"] + j * step["size"]) * b
        spans.append((slice(start, start + union * b), slice(first, first + step["size"] * b)))
        start += union * b
    return spans


def _gather_tokens(t: torch.Tensor, m0: int, r: int, index: torch.Tensor, count: int, buffer: torch.Tensor,
                   b: int) -> torch.Tensor:
    """[r, count * b] in `buffer`: token rows m0..m0+r of t at the `count` column blocks per
    token that `index` names (a `_block_index` over a chunk of tokens, whose first r
    tokens' entries are a prefix)."""
    return torch.index_select(t[m0:m0 + r].view(-1, b), 0, index[:r * count],
                              out=buffer[:r * count * b].view(-1, b)).view(r, count * b)


def _grouped_matmul(x: torch.Tensor, weight: BlockSparseWeight, layout: dict) -> torch.Tensor:
    """Y = X W^T over row groups: per group one GEMM of the group's gathered union columns
    of X [M, U*b] with its packed tile [U*b, G*b], written into Y's columns in schedule
    order, which one permutation then puts in place. Groups and token rows are blocked
    (`_group_steps`); the tiles are packed one step at a time, never all at once."""
    m, (n, _), b = x.shape[0], weight.shape, weight.block_size
    cols_in = weight.block_grid[1]
    x = x.contiguous()
    out = x.new_empty(m, n)  # block rows in schedule order
    for step, rows, buf in _group_steps(m, layout, x, b):
        packed, spans = _pack(weight, step, buf["tiles"]), _tile_spans(step, b)
        gather = _block_index(cols_in, rows, step["cols"])
        for m0 in range(0, m, rows):
            r = min(rows, m - m0)
            slab = _gather_tokens(x, m0, r, gather, step["cols"].numel(), buf["slab"], b)
            for tile, (cols, outs) in zip(packed, spans):
                torch.mm(slab[:, cols], tile, out=out[m0:m0 + r, outs])
    return _permute_block_columns(out, layout["to_true"])


def _grouped_matmul_t(grad_y: torch.Tensor, weight: BlockSparseWeight, layout: dict) -> torch.Tensor:
    """dX = dY W over row groups, in the orientation that adds faster for this weight."""
    transposed = layout["dx_adds"] >= DX_TRANSPOSED_MIN_ADDS
    return (_grouped_dx_transposed if transposed else _grouped_dx_by_tokens)(grad_y, weight, layout)


def _grouped_dx_by_tokens(grad_y: torch.Tensor, weight: BlockSparseWeight, layout: dict) -> torch.Tensor:
    """dX = dY W, few additions per dX entry: dY's columns put in schedule order once, then
    per group its [M, G*b] columns times the packed tile transposed, added into the group's
    union columns of dX (b-wide blocks per token); blocked like the forward."""
    m, (_, k), b = grad_y.shape[0], weight.shape, weight.block_size
    cols_in = weight.block_grid[1]
    grad_y = _permute_block_columns(grad_y.contiguous(), layout["to_schedule"])
    grad_x = grad_y.new_zeros(m, k)
    for step, rows, buf in _group_steps(m, layout, grad_y, b):
        packed, spans = _pack(weight, step, buf["tiles"]), _tile_spans(step, b)
        scatter, width = _block_index(cols_in, rows, step["cols"]), sum(step["unions"]) * b
        for m0 in range(0, m, rows):
            r = min(rows, m - m0)
            partial = buf["slab"][:r * width].view(r, width)
            for tile, (cols, outs) in zip(packed, spans):
                torch.mm(grad_y[m0:m0 + r, outs], tile.t(), out=partial[:, cols])
            grad_x[m0:m0 + r].view(-1, b).index_add_(0, scatter[:r * step["cols"].numel()], partial.view(-1, b))
    return grad_x


def _grouped_dx_transposed(grad_y: torch.Tensor, weight: BlockSparseWeight, layout: dict) -> torch.Tensor:
    """dX = dY W, many additions per dX entry, computed as dX^T = W^T dY^T: per group its
    packed tile [U*b, G*b] times the group's rows of dY^T, then one `index_add_` per step of
    whole token-long rows into the unions' rows of dX^T. Adding b-wide column blocks into dX
    token by token ran at a fraction of copy speed, and blocking the tokens (short rows)
    was slower too (docs/DESIGN.md). Memory at the peak: dX^T, its transposed copy and one
    step's products ([the step's U*b summed, M]: half of dX^T at 4096x11008, G=8, 50%).
    dY is put in schedule order once and read transposed; dX^T is transposed back once."""
    m, (_, k), b = grad_y.shape[0], weight.shape, weight.block_size
    steps = layout["steps"]
    grad_yt = _permute_block_columns(grad_y.contiguous(), layout["to_schedule"]).t()  # BLAS reads it transposed
    grad_xt = grad_y.new_zeros(k, m)
    tiles = _tile_buffer(layout, grad_y, b)
    products = grad_y.new_empty(max(sum(s["unions"]) for s in steps) * b * m)
    within = torch.arange(b, device=grad_y.device)
    for step in steps:
        packed, spans = _pack(weight, step, tiles), _tile_spans(step, b)
        targets = (step["cols"][:, None] * b + within).reshape(-1)  # the step's unions' rows of dX^T
        partial = products[:targets.numel() * m].view(-1, m)
        for tile, (cols, outs) in zip(packed, spans):
            torch.mm(tile, grad_yt[outs], out=partial[cols])
        grad_xt.index_add_(0, targets, partial)
    return grad_xt.t().contiguous()


def _grad_values_grouped(x: torch.Tensor, grad_y: torch.Tensor, weight: BlockSparseWeight,
                         layout: dict) -> torch.Tensor:
    """dW at the stored blocks over row groups: per group the gathered union columns of X
    transposed times the group's dY columns ([U*b, M] x [M, G*b], one GEMM per group,
    accumulated over the token chunks); the stored tiles are taken out of it. Exact for any
    input: a stored tile's entries read only its own columns of X and dY."""
    m, b = x.shape[0], weight.block_size
    cols_in = weight.block_grid[1]
    x = x.contiguous()
    grad_y = _permute_block_columns(grad_y.contiguous(), layout["to_schedule"])
    grad = torch.empty_like(weight.values)
    for step, rows, buf in _group_steps(m, layout, x, b):
        total = sum(step["unions"]) * b * step["size"] * b
        packed = _split_packed(buf["tiles"][:total].zero_(), step["unions"], b, step["size"])  # the tiles' gradient
        spans, gather = _tile_spans(step, b), _block_index(cols_in, rows, step["cols"])
        for m0 in range(0, m, rows):
            r = min(rows, m - m0)
            slab = _gather_tokens(x, m0, r, gather, step["cols"].numel(), buf["slab"], b)
            for tile, (cols, outs) in zip(packed, spans):
                tile.addmm_(slab[:, cols].t(), grad_y[m0:m0 + r, outs])
        _unpack(weight, step, buf["tiles"], grad)
    return grad


SCHEDULED_PRODUCTS = ("y", "dx", "dw")


def torch_schedule(weight: BlockSparseWeight, m: int, product: str = "y") -> str:
    """How the torch backend computes `product` for M tokens: "y" = X W^T, "dx" = dY W or
    "dw" (dY^T X at the stored blocks). Schedules: "blocks" (each block row's stored
    blocks against its own gathered X columns), "shared-slab" (fully shared row groups,
    forward only: the stored blocks against X gathered once per group), "row-groups"
    (one GEMM per row group on its packed union tiles) or "dense" (BLAS on the masked
    weight, materialised for the call). The token counts where each wins were measured
    (docs/DESIGN.md, "The torch backend").

    Pruned weights do not exist on every path: a non-finite input reaches only the
    outputs whose stored blocks read it. Dense BLAS, and the row-group GEMMs over zero
    tiles, would compute 0 * NaN, so there an input holding NaN or inf takes the
    stored-blocks path."""
    if product not in SCHEDULED_PRODUCTS:
        raise ValueError(f"product must be one of {SCHEDULED_PRODUCTS}, got {product!r}")
    if m <= SMALL_M_MAX and weight.row_group == 1:  # (the free mask's row groups are built on first need)
        return "blocks"
    groups = weight.layout("row_groups", _row_groups)
    if not groups["usable"]:
        return "blocks" if m <= SMALL_M_MAX else "dense"
    if not groups["shared"]:
        return "blocks" if m <= SMALL_M_MAX else "row-groups"
    if m <= (SMALL_M_MAX if product == "dw" else BLOCKS_MAX_M_SHARED):
        return "blocks"
    if product != "y":
        return "row-groups"
    return "shared-slab" if m <= SHARED_SLAB_MAX_M else "row-groups"


def _reads_only_stored_blocks(schedule: str, weight: BlockSparseWeight) -> bool:
    """Whether `schedule` multiplies nothing but stored tiles (no 0 * NaN)."""
    return schedule in ("blocks", "shared-slab") or (
        schedule == "row-groups" and weight.layout("row_groups", _row_groups)["shared"])


def sparse_matmul_torch(x: torch.Tensor, weight: BlockSparseWeight) -> torch.Tensor:
    """Y = X [M, K] W^T with W block-sparse."""
    schedule = torch_schedule(weight, x.shape[0])
    if schedule == "blocks" or not (_reads_only_stored_blocks(schedule, weight) or bool(torch.isfinite(x).all())):
        return _sparse_matmul_small_m(x, weight)
    if schedule == "dense":
        return F.linear(x, weight.to_dense())
    layout = weight.layout("row_groups", _row_groups)
    return (_shared_slab_matmul if schedule == "shared-slab" else _grouped_matmul)(x, weight, layout)


def sparse_matmul_t_torch(grad_y: torch.Tensor, weight: BlockSparseWeight) -> torch.Tensor:
    """dX = dY [M, N] W with W block-sparse."""
    schedule = torch_schedule(weight, grad_y.shape[0], "dx")
    if schedule == "blocks" or not (_reads_only_stored_blocks(schedule, weight)
                                    or bool(torch.isfinite(grad_y).all())):
        return _sparse_matmul_t_small_m(grad_y, weight)
    if schedule == "dense":
        return grad_y @ weight.to_dense()
    return _grouped_matmul_t(grad_y, weight, weight.layout("row_groups", _row_groups))


def sparse_grad_values_torch(x: torch.Tensor, grad_y: torch.Tensor, weight: BlockSparseWeight) -> torch.Tensor:
    """dW = dY^T X [N, K] at the stored blocks only, in `values`' layout [nnz, b, b]
    (an SDD product: the structure never changes). Dense BLAS (or a group's GEMM over its
    union) computes more entries of dW and keeps the stored ones, which read no pruned
    weight: exact for any input."""
    schedule = torch_schedule(weight, x.shape[0], "dw")
    if schedule == "blocks":
        return _grad_values_small_m(x, grad_y, weight)
    if schedule == "row-groups":
        return _grad_values_grouped(x, grad_y, weight, weight.layout("row_groups", _row_groups))
    return weight.blocks_of(grad_y.t() @ x)


def _linear_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, keep_mask):
    """(Y, the LoRA input, its shrink T = drop(X) A^T): the forward of the torch backend."""
    y = sparse_matmul_torch(x, weight)
    if bias is not None:
        y = y + bias
    lora_in = shrink = None
    if lora_a is not None:
        lora_in = x if keep_mask is None else x * keep_mask / (1.0 - dropout_p)
        shrink = lora_in @ lora_a.t()  # [M, r]
        y = y.addmm_(shrink, lora_b.t(), alpha=scaling)
    return y, lora_in, shrink


class _LinearTorch(torch.autograd.Function):
    # `values` is weight.values, an input of its own so that autograd can hand it a
    # gradient when the kept blocks are trained; the forward reads it through `weight`.
    @staticmethod
    def forward(ctx, x, values, weight, bias, lora_a, lora_b, scaling, dropout_p, keep_mask):
        y, lora_in, shrink = _linear_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, keep_mask)
        ctx.weight, ctx.scaling, ctx.dropout_p = weight, scaling, dropout_p
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x if values.requires_grad else None, lora_in, shrink, lora_a, lora_b, keep_mask)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_in, shrink, lora_a, lora_b, keep_mask = ctx.saved_tensors
        weight, s = ctx.weight, ctx.scaling
        grad_x = grad_values = grad_bias = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = sparse_matmul_t_torch(grad_y, weight)
        if ctx.needs_input_grad[1]:
            grad_values = sparse_grad_values_torch(x, grad_y, weight)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_y.sum(0)
        if lora_a is not None:
            grad_shrink = (grad_y @ lora_b) * s  # [M, r]
            if ctx.needs_input_grad[4]:
                grad_a = grad_shrink.t() @ lora_in
            if ctx.needs_input_grad[5]:
                grad_b = (grad_y.t() @ shrink) * s
            if ctx.needs_input_grad[0]:
                grad_lora_in = grad_shrink @ lora_a
                if keep_mask is not None:
                    grad_lora_in = grad_lora_in * keep_mask / (1.0 - ctx.dropout_p)
                grad_x = grad_x + grad_lora_in
        return grad_x, grad_values, None, grad_bias, grad_a, grad_b, None, None, None


def linear_torch(x2d: torch.Tensor, weight: BlockSparseWeight, bias: torch.Tensor | None = None,
                 lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
                 scaling: float = 1.0, dropout_p: float = 0.0,
                 keep_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The torch backend on x2d [M, K] with an explicit LoRA dropout keep-mask [M, K]
    (1/0 in x's dtype, or None for no dropout): how tests replay the Triton kernels'
    Philox mask (`blocksparse.kernels.philox_keep_mask`) element for element."""
    values = weight.values
    if not (torch.is_grad_enabled() and (x2d.requires_grad or values.requires_grad or any(
            t is not None and t.requires_grad for t in (bias, lora_a, lora_b)))):
        # Inference: no graph to record (autograd.Function costs ~10 us a call, a decode step has 210)
        return _linear_forward(x2d, weight, bias, lora_a, lora_b, float(scaling), float(dropout_p), keep_mask)[0]
    return _LinearTorch.apply(x2d, values, weight, bias, lora_a, lora_b, float(scaling),
                              float(dropout_p), keep_mask)


# --------------------------------------------------------------------------
# functional API
# --------------------------------------------------------------------------
def dropout_keep_mask(shape: tuple[int, ...], p: float, device: torch.device | str,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The torch backend's LoRA dropout mask: 1 with probability 1 - p, from torch's global
    generator, p resolved to 2^-16 (and kept below 1: a p within 2^-17 of 1 drops all but
    2^-16). Four 16-bit lanes per 64-bit draw: on a CPU the generator's calls are the cost
    (256 x 1536: 0.5 ms against torch.rand's 1.6)."""
    numel = math.prod(shape)
    draws = torch.empty(-(-numel // 4), dtype=torch.int64, device=device).random_(-2 ** 63, None)
    lanes = draws.view(torch.int16)[:numel].view(shape)  # uniform over [-2^15, 2^15)
    # The threshold must stay an int16: 2^15 would wrap to -2^15 and keep everything.
    return (lanes >= min(round(p * 65536), 65535) - 32768).to(dtype)


def block_sparse_linear(
    x: torch.Tensor,
    weight: BlockSparseWeight,
    bias: torch.Tensor | None = None,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scaling: float = 1.0,
    lora_dropout: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """F.linear(x, W, bias) + scaling * dropout(x) @ lora_a.T @ lora_b.T, W block-sparse.

    x: [..., K]; weight: BlockSparseWeight of shape [N, K]; bias: [N];
    lora_a: [r, K]; lora_b: [N, r] (PEFT's lora_A.weight / lora_B.weight).
    `lora_dropout` is applied (whenever > 0) to the LoRA path's input only, as
    in PEFT; pass 0 in eval mode. W receives a gradient at its stored blocks
    only, and only when `weight.values.requires_grad` (frozen by default).
    Under autocast it runs in autocast's dtype, as F.linear does: every operand is
    cast (outside the op, so fp32 parameters get fp32 gradients).
    """
    if (isinstance(x, torch.Tensor) and torch.amp.is_autocast_available(x.device.type)
            and torch.is_autocast_enabled(x.device.type)):
        dtype = torch.get_autocast_dtype(x.device.type)
        cast = (lambda t: t if t is None else t.to(dtype))
        with torch.autocast(x.device.type, enabled=False):
            return block_sparse_linear(cast(x), weight.cast(dtype) if isinstance(weight, BlockSparseWeight) else weight,
                                       cast(bias), cast(lora_a), cast(lora_b), scaling, lora_dropout, backend)
    check_inputs(x, weight, bias, lora_a, lora_b)
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    if not math.isfinite(scaling):  # addmm_ would silently take alpha=nan as 1
        raise ValueError(f"scaling must be a finite number, got {scaling}")
    if lora_a is None:
        lora_dropout = 0.0
    backend = resolve_backend(backend, x)
    lead, (n, k) = x.shape[:-1], weight.shape
    x2d = x.reshape(-1, k)
    if backend == "triton":
        from .kernels import block_sparse_linear_triton

        y = block_sparse_linear_triton(x2d, weight, bias, lora_a, lora_b, scaling, lora_dropout)
    else:
        keep_mask = None
        if lora_dropout > 0:  # Bernoulli keep-mask of the LoRA input, kept for backward
            keep_mask = dropout_keep_mask(x2d.shape, lora_dropout, x.device, x.dtype)
        y = linear_torch(x2d, weight, bias, lora_a, lora_b, scaling, lora_dropout, keep_mask)
    return y.reshape(*lead, n)
