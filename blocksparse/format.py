"""Block-sparse weight format: W [N, K] (out x in) in BSR with b x b blocks.

`BlockSparseWeight` keeps the index arrays as module buffers and the block
values as a Parameter that is frozen (requires_grad False) unless the kept
blocks are trained (`train_sparse_values`), so that `.to()`, `state_dict()`,
safetensors round trips, optimizers and FSDP see it like any other layer:

- `crow`   int32 [N/b + 1]  block-row pointers into `col` / `values`
- `col`    int32 [nnz]      block-column of each block, sorted within a row
- `values` [nnz, b, b]      values[i] is the TRANSPOSED W tile of block i:
                            values[i][c, j] = W[row*b + j, col*b + c]
                            (rows = in, columns = out)

Row grouping (saved; a layout, never a correctness requirement):

- `row_perm`  int32 [N/b]   storage row s holds block row row_perm[s]: the BSR
                            arrays list block rows in this order, so the G rows
                            of a row group lie next to each other (their tiles
                            form one contiguous stretch of `values`);
- `row_group` int           G, the rows per group (consecutive storage rows;
                            1 = ungrouped, row_perm then the identity); saved
                            in the state dict as an int32 scalar.

Derived metadata (not saved, rebuilt from crow/col/row_perm):

- `row`     int32 [nnz]     (true) block row of each block
- `t_crow`  int32 [K/b + 1] the transposed structure (block rows over K)
- `t_row`   int32 [nnz]     (true) block row (over N) of each transposed entry
- `t_index` int32 [nnz]     index into `values` of each transposed entry:
                            a permutation, the weights are never copied

Each backend keeps its own layouts of the structure (the torch backend's
padded rows and row groups, the Triton schedules' look-up tables) through
`layout(key, build)`: built once per weight and device, held in a plain dict
that `.to()` empties (they are rebuilt where the weight now lives) and that
checkpoints never see.

Why transposed tiles: the forward product X W^T multiplies X by W^T tiles,
so each tile is stored the way the forward pass reads it: one block row's
tiles stacked are exactly the [P*b, b] slab of W^T that the row needs (the
torch backend multiplies it without any copy), and the Triton forward kernel
loads row-major [k, n] tiles. The backward pass reads them transposed.

Every construction from index data validates it (in range, sorted, no
duplicates, monotone crow), so a malformed checkpoint raises a clear error and
can never make a kernel read out of bounds.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

SUPPORTED_BLOCK_SIZES = (8, 16, 32, 64)
DEFAULT_BLOCK_SIZE = 16


def check_block_size(block_size: int) -> int:
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(
            f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}"
        )
    return int(block_size)


def check_divisible(shape: tuple[int, int], block_size: int, what: str = "weight") -> None:
    n, k = shape
    if n % block_size or k % block_size:
        raise ValueError(
            f"{what} shape (out={n}, in={k}) is not divisible by block_size={block_size}; "
            f"both dimensions must be multiples of the block size"
        )


def _validate_structure(crow: torch.Tensor, col: torch.Tensor, n_block_rows: int,
                        n_block_cols: int, nnz: int) -> None:
    """Raise ValueError unless (crow, col) is a well-formed BSR structure."""
    for name, t in (("crow", crow), ("col", col)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be an int32/int64 tensor, got dtype {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if crow.numel() != n_block_rows + 1:
        raise ValueError(
            f"crow must have N/b + 1 = {n_block_rows + 1} entries, got {crow.numel()}"
        )
    crow64, col64 = crow.long().cpu(), col.long().cpu()
    if crow64[0].item() != 0:
        raise ValueError(f"crow[0] must be 0, got {crow64[0].item()}")
    steps = crow64[1:] - crow64[:-1]
    if (steps < 0).any():
        bad = int(torch.nonzero(steps < 0)[0])
        raise ValueError(
            f"crow must be non-decreasing: crow[{bad}]={crow64[bad].item()} > "
            f"crow[{bad + 1}]={crow64[bad + 1].item()}"
        )
    if crow64[-1].item() != col64.numel() or col64.numel() != nnz:
        raise ValueError(
            f"crow[-1]={crow64[-1].item()}, len(col)={col64.numel()} and "
            f"len(values)={nnz} must all equal the number of blocks"
        )
    if col64.numel():
        if col64.min() < 0 or col64.max() >= n_block_cols:
            bad = int(torch.nonzero((col64 < 0) | (col64 >= n_block_cols))[0])
            raise ValueError(
                f"col[{bad}]={col64[bad].item()} is out of range [0, {n_block_cols})"
            )
        row = torch.repeat_interleave(torch.arange(n_block_rows), steps)
        same_row = row[1:] == row[:-1]
        unsorted = same_row & (col64[1:] <= col64[:-1])
        if unsorted.any():
            bad = int(torch.nonzero(unsorted)[0])
            raise ValueError(
                f"col must be strictly increasing within a block row (sorted, no duplicates): "
                f"block row {row[bad].item()} has col[{bad}]={col64[bad].item()} followed by "
                f"col[{bad + 1}]={col64[bad + 1].item()}"
            )


def _validate_grouping(row_perm: torch.Tensor, row_group: int, n_block_rows: int) -> None:
    """Raise ValueError unless row_perm is a permutation of the block rows and row_group >= 1."""
    if row_perm.dtype not in (torch.int32, torch.int64) or row_perm.dim() != 1:
        raise ValueError(f"row_perm must be a 1-D int32/int64 tensor, got dtype {row_perm.dtype} "
                         f"and shape {tuple(row_perm.shape)}")
    if row_perm.numel() != n_block_rows:
        raise ValueError(f"row_perm must list all N/b = {n_block_rows} block rows, got {row_perm.numel()} entries")
    perm = row_perm.long().cpu()
    outside = (perm < 0) | (perm >= n_block_rows)
    seen = torch.zeros(n_block_rows, dtype=torch.long).index_add_(0, perm[~outside], torch.ones_like(perm[~outside]))
    bad = outside | ~outside & (seen[perm.clamp(0, max(n_block_rows - 1, 0))] != 1)
    if bad.any():
        first = int(torch.nonzero(bad)[0])
        raise ValueError(f"row_perm is not a permutation of range({n_block_rows}): row_perm[{first}]="
                         f"{perm[first].item()} is out of range or repeated")
    if isinstance(row_group, bool) or not isinstance(row_group, int) or row_group < 1:
        raise ValueError(f"row_group must be an int >= 1, got {row_group!r}")


@torch.compiler.disable
def _build_layout(weight: "BlockSparseWeight", build: Callable[["BlockSparseWeight"], dict]) -> dict:
    return build(weight)  # index arithmetic with data-dependent shapes: never traced


class BlockSparseWeight(nn.Module):
    """W [N, K] stored as b x b blocks (BSR): a fixed structure, values frozen unless trained.
    Build with `from_dense`."""

    def __init__(self, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                 shape: tuple[int, int], *, row_perm: torch.Tensor | None = None, row_group: int = 1,
                 validate: bool = True):
        super().__init__()
        if values.dim() != 3 or values.shape[1] != values.shape[2]:
            raise ValueError(f"values must be [nnz, b, b], got shape {tuple(values.shape)}")
        block_size = check_block_size(values.shape[1])
        shape = (int(shape[0]), int(shape[1]))
        check_divisible(shape, block_size)
        n_block_rows, n_block_cols = shape[0] // block_size, shape[1] // block_size
        if row_perm is None:
            row_perm = torch.arange(n_block_rows)
        if validate:
            _validate_structure(crow, col, n_block_rows, n_block_cols, values.shape[0])
            _validate_grouping(row_perm, row_group, n_block_rows)
        self.shape = shape
        self.block_size = block_size
        device = values.device
        crow = crow.to(device=device, dtype=torch.int32)
        col = col.to(device=device, dtype=torch.int32)
        self.register_buffer("crow", crow)
        self.register_buffer("col", col)
        # A Parameter (frozen by default) so optimizers can train the kept blocks and FSDP
        # can shard them; the structure never changes in training.
        self.values = nn.Parameter(values.detach().contiguous(), requires_grad=False)
        row_perm = row_perm.to(device=device, dtype=torch.int32)
        self.register_buffer("row_perm", row_perm)
        self.row_group = int(row_group)  # saved as a tensor by _save_to_state_dict
        self._register_derived(crow.long(), col.long(), row_perm.long(), n_block_cols)

    def _register_derived(self, crow: torch.Tensor, col: torch.Tensor, row_perm: torch.Tensor,
                          n_block_cols: int) -> None:
        counts = crow[1:] - crow[:-1]
        row = torch.repeat_interleave(row_perm, counts)  # the true block row of each block
        # Transposed structure: sort blocks by col; a stable sort keeps storage order within a column.
        t_index = torch.sort(col, stable=True).indices
        t_counts = torch.bincount(col, minlength=n_block_cols)
        t_crow = torch.zeros(n_block_cols + 1, dtype=torch.long, device=crow.device)
        t_crow[1:] = torch.cumsum(t_counts, 0)
        derived = {
            "row": row, "t_crow": t_crow, "t_row": row[t_index], "t_index": t_index,
        }
        for name, tensor in derived.items():
            self.register_buffer(name, tensor.to(torch.int32), persistent=False)
        self._layouts: dict[str, dict] = {}
        self._cast_layouts: dict[torch.dtype, dict] = {}  # the layouts of `cast` views, per dtype

    def layout(self, key: str, build: Callable[["BlockSparseWeight"], dict]) -> dict:
        """A backend's derived layout of this weight: `build(self)` runs once per key,
        device and dtype; the hot path is one dict look-up (it runs on every op call).
        The structure buffers change only through `load_state_dict` (which rebuilds
        the weight and empties the layouts) and `.to()`."""
        found = self._layouts.get(key)
        if found is None:
            found = self._layouts[key] = _build_layout(self, build)
        return found

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() move the buffers: the layouts derived from them are
        # rebuilt on first use where the weight now lives (a no-op move keeps them).
        before = (self.values.device, self.values.dtype)
        result = super()._apply(fn, recurse)
        if (self.values.device, self.values.dtype) != before:
            self._layouts, self._cast_layouts = {}, {}
        return result

    def cast(self, dtype: torch.dtype) -> "BlockSparseWeight":
        """This weight with its values cast to `dtype`, for one op call (how autocast runs a
        linear in its lower precision): the structure buffers are shared, the layouts kept
        per dtype, and the cast is an autograd op, so trained values get their gradient in
        their own dtype. The view is not a module to train or save."""
        if dtype == self.values.dtype:
            return self
        view = copy.copy(self)
        view._parameters, view._buffers = {}, dict(self._buffers)  # nothing done to the view reaches self
        view.__dict__["values"] = self.values.to(dtype)
        view._layouts = self._cast_layouts.setdefault(dtype, {})
        return view

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_dense(cls, weight: torch.Tensor, block_mask: torch.Tensor | None = None,
                   block_size: int | None = None, *, row_perm: torch.Tensor | None = None,
                   row_group: int = 1) -> "BlockSparseWeight":
        """Keep the blocks of `weight` [N, K] where `block_mask` [N/b, K/b] is True.

        The block size is read from the mask's shape (b = N / mask rows); with no
        mask, every block that holds a nonzero is kept (b defaults to 16).
        row_perm / row_group: the row grouping (see the module docstring); the
        blocks are stored with the block rows in row_perm order.
        """
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        n, k = weight.shape
        if block_mask is None:
            block_size = check_block_size(block_size or DEFAULT_BLOCK_SIZE)
            check_divisible((n, k), block_size)
            tiles = weight.detach().reshape(n // block_size, block_size, k // block_size, block_size)
            block_mask = tiles.ne(0).any(dim=3).any(dim=1)
        else:
            if block_mask.dim() != 2 or block_mask.dtype != torch.bool:
                raise ValueError(
                    f"block_mask must be a 2-D bool tensor [N/b, K/b], got dtype "
                    f"{block_mask.dtype} and shape {tuple(block_mask.shape)}"
                )
            rows = block_mask.shape[0]
            inferred = n // rows if rows and n % rows == 0 else None
            if block_size is None:
                block_size = inferred
            if (block_size is None or block_size not in SUPPORTED_BLOCK_SIZES
                    or block_mask.shape != (n // block_size, k // block_size)
                    or n % block_size or k % block_size):
                raise ValueError(
                    f"block_mask shape {tuple(block_mask.shape)} does not fit weight shape "
                    f"({n}, {k}): expected [N/b, K/b] for a block size b in "
                    f"{SUPPORTED_BLOCK_SIZES} dividing both dimensions"
                    + (f" (got block_size={block_size})" if block_size else "")
                )
        b = block_size
        if row_perm is None:
            row_perm = torch.arange(n // b)
        _validate_grouping(row_perm, row_group, n // b)
        row_perm = row_perm.to(device=weight.device, dtype=torch.long)
        stored = block_mask.to(weight.device)[row_perm]  # block rows in storage order
        tiles = weight.detach().reshape(n // b, b, k // b, b).permute(0, 2, 3, 1)  # [R, C, c, j]
        rows, cols = torch.nonzero(stored, as_tuple=True)  # row-major: sorted
        values = tiles[row_perm[rows], cols].contiguous()
        crow = torch.zeros(n // b + 1, dtype=torch.int32, device=weight.device)
        crow[1:] = torch.cumsum(stored.sum(dim=1), 0)
        return cls(crow, cols.to(torch.int32), values, (n, k), row_perm=row_perm, row_group=row_group,
                   validate=False)

    def blocks_of(self, dense: torch.Tensor) -> torch.Tensor:
        """The tiles of a dense [N, K] matrix at this weight's blocks, in its storage
        order and tile layout: what `values` would be for `dense` ([nnz, b, b])."""
        if tuple(dense.shape) != self.shape:
            raise ValueError(f"dense must have this weight's shape {self.shape}, got {tuple(dense.shape)}")
        rows, cols = self.block_grid
        b = self.block_size
        tiles = dense.reshape(rows, b, cols, b).permute(0, 2, 3, 1)
        return tiles[self.row.long(), self.col.long()]

    @classmethod
    def from_bsr(cls, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                 shape: tuple[int, int], row_perm: torch.Tensor | None = None,
                 row_group: int = 1) -> "BlockSparseWeight":
        """Build from (possibly untrusted) BSR arrays, e.g. a checkpoint; validated."""
        return cls(crow, col, values, shape, row_perm=row_perm, row_group=row_group, validate=True)

    # --------------------------------------------------------------- properties
    @property
    def nnz_blocks(self) -> int:
        return self.values.shape[0]

    @property
    def block_grid(self) -> tuple[int, int]:
        return self.shape[0] // self.block_size, self.shape[1] // self.block_size

    @property
    def density(self) -> float:
        rows, cols = self.block_grid
        return self.nnz_blocks / (rows * cols) if rows * cols else 0.0

    @property
    def block_mask(self) -> torch.Tensor:
        mask = torch.zeros(self.block_grid, dtype=torch.bool, device=self.values.device)
        mask[self.row.long(), self.col.long()] = True
        return mask

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to_dense(self) -> torch.Tensor:
        """W [N, K] with zeros in the absent blocks."""
        rows, cols = self.block_grid
        b = self.block_size
        dense = self.values.new_zeros(self.shape)
        # Scatter the tiles through a [R, C, c, j] view of the output: no extra copy.
        dense.view(rows, b, cols, b).permute(0, 2, 3, 1)[self.row.long(), self.col.long()] = self.values
        return dense

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "row_group"] = torch.tensor(self.row_group, dtype=torch.int32)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A checkpoint's structure has its own number of blocks: the weight is rebuilt
        # from the saved arrays, validated like `from_bsr`, never copied into the old
        # buffers (whose derived tables would then be stale). Nothing changes on an error.
        keys = {name: prefix + name for name in ("crow", "col", "values", "row_perm", "row_group")}
        if not any(keys[name] in state_dict for name in ("crow", "col", "values")):
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        unexpected_keys.extend(key for key in state_dict if key.startswith(prefix) and key not in keys.values())
        missing = [keys[name] for name in ("crow", "col", "values") if keys[name] not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        try:
            loaded = self._validated(state_dict, keys)
        except ValueError as err:
            error_msgs.append(f"{prefix[:-1]}: malformed block-sparse checkpoint: {err}")
            return
        crow, col, values, row_perm, row_group = loaded
        device, dtype = self.values.device, self.values.dtype
        # Copies: the loaded weight never shares memory with the state dict it came from,
        # unless the caller asked for that (load_state_dict(..., assign=True)).
        copy = not local_metadata.get("assign_to_params_buffers", False)
        self.register_buffer("crow", crow.to(device=device, dtype=torch.int32, copy=copy))
        self.register_buffer("col", col.to(device=device, dtype=torch.int32, copy=copy))
        # The same Parameter, new storage (its number of blocks may differ): an optimizer
        # holding it, and its requires_grad, stay valid.
        self.values.data = values.detach().to(device=device, dtype=dtype, copy=copy).contiguous()
        self.register_buffer("row_perm", row_perm.to(device=device, dtype=torch.int32, copy=copy))
        self.row_group = row_group
        self._register_derived(self.crow.long(), self.col.long(), self.row_perm.long(), self.block_grid[1])

    def _validated(self, state_dict, keys) -> tuple:
        """(crow, col, values, row_perm, row_group) of a state dict, or ValueError."""
        crow, col, values = (state_dict[keys[name]] for name in ("crow", "col", "values"))
        b = self.block_size
        if values.dim() != 3 or tuple(values.shape[1:]) != (b, b) or not values.is_floating_point():
            raise ValueError(f"values: expected [nnz, {b}, {b}] blocks, got {values.dtype} of shape "
                             f"{tuple(values.shape)}")
        rows, cols = self.block_grid
        # Written before row groupings existed: neither key, ungrouped.
        row_perm = state_dict.get(keys["row_perm"], torch.arange(rows))
        row_group = state_dict.get(keys["row_group"], torch.tensor(1))
        if row_group.numel() != 1 or row_group.dtype.is_floating_point or row_group.dtype == torch.bool:
            raise ValueError(f"row_group: expected an integer scalar, got {row_group.dtype} of shape "
                             f"{tuple(row_group.shape)}")
        row_group = int(row_group)
        _validate_structure(crow, col, rows, cols, values.shape[0])
        _validate_grouping(row_perm, row_group, rows)
        return crow, col, values, row_perm, row_group

    def extra_repr(self) -> str:
        grouping = f", row_group={self.row_group}" if self.row_group > 1 else ""
        return (f"shape={self.shape}, block_size={self.block_size}, "
                f"density={self.density:.3f}, dtype={self.dtype}{grouping}")
