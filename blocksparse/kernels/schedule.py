"""Host-side schedules of the grouped kernel: look-up tables per weight orientation and G.

A program of `_bsl_matmul_kernel` owns G block rows (a row group) and walks the
union of their block columns; these tables say, per group, which columns the
union holds and which stored block (if any) each row has there. Built once per
weight, orientation and G (`get_schedule`), with the block rows clustered so a
group's rows share columns (`blocksparse.grouping`) and the groups in launch
order largest union first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..format import BlockSparseWeight
from ..grouping import cluster_block_rows, group_union_sizes
from .configs import GROUP_SIZES, TILE_EFFICIENCY

_SCHEDULE_TENSORS = ("group_ptr", "union_col", "union_block", "group_rows")


@dataclass
class Schedule:
    """What the main kernel needs for one weight orientation: its LUT tensors and G.

    Union entries are sorted by group, then column. For G=1 in BSR order
    (the forward decode schedule) union entry u is therefore block u, which
    lets that kernel stream `values` without the block-index table.
    """

    group_ptr: torch.Tensor    # int32 [groups + 1]: each group's slice of the union list
    union_col: torch.Tensor    # int32 [U]: block column of each union entry
    union_block: torch.Tensor  # int32 [U, G]: block index (into values) per row slot, -1 = absent
    group_rows: torch.Tensor   # int32 [groups, G]: true block row per slot, -1 = padding
    group_size: int

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self.group_ptr, self.union_col, self.union_block, self.group_rows]


def build_schedule(crow: torch.Tensor, col: torch.Tensor, block: torch.Tensor,
                   num_block_cols: int, group_size: int, perm: torch.Tensor | None = None,
                   true_rows: torch.Tensor | None = None) -> Schedule:
    """Group block rows (in `perm` order) by `group_size` and list each group's column union.

    crow [R+1], col [nnz] and block [nnz] (index into `values` of each entry)
    describe a BSR structure; for the transposed orientation pass (t_crow,
    t_row, t_index). true_rows [R]: the output block row each of those rows
    stands for (the weight's `row_perm`; None: the identity).
    """
    device = crow.device
    crow, col, block = crow.long(), col.long(), block.long()
    rows = crow.numel() - 1
    groups = -(-rows // group_size) if rows else 0
    if perm is None:
        perm = torch.arange(rows, device=device)
    perm = perm.to(device=device, dtype=torch.long)
    position = torch.empty_like(perm)
    position[perm] = torch.arange(rows, device=device)
    group_rows = torch.full((groups * group_size,), -1, dtype=torch.long, device=device)
    group_rows[:rows] = perm if true_rows is None else true_rows.to(device=device, dtype=torch.long)[perm]
    entry_row = torch.repeat_interleave(torch.arange(rows, device=device), crow[1:] - crow[:-1])
    entry_group = position[entry_row] // group_size
    entry_slot = position[entry_row] % group_size
    # One union entry per distinct (group, column); unique() sorts by group then column.
    keys, inverse = torch.unique(entry_group * num_block_cols + col, return_inverse=True)
    union_block = torch.full((keys.numel(), group_size), -1, dtype=torch.long, device=device)
    union_block[inverse, entry_slot] = block
    group_ptr = torch.zeros(groups + 1, dtype=torch.long, device=device)
    group_ptr[1:] = torch.cumsum(torch.bincount(keys // num_block_cols, minlength=groups), 0)
    return Schedule(
        group_ptr=group_ptr.to(torch.int32),
        # One padding entry keeps the tensors non-empty; group_ptr never points at it.
        union_col=torch.cat([keys % num_block_cols, keys.new_zeros(1)]).to(torch.int32),
        union_block=torch.cat([union_block, union_block.new_full((1, group_size), -1)]).to(torch.int32),
        group_rows=group_rows.view(groups, group_size).to(torch.int32),
        group_size=group_size,
    )


def _orientation(weight: BlockSparseWeight, transposed: bool):
    """(crow, col, block index, number of block columns, block mask, true rows) of W or W^T,
    rows in the order the structure lists them (W's storage order, W^T's block columns)."""
    rows, cols = weight.block_grid
    if transposed:
        return weight.t_crow, weight.t_row, weight.t_index, rows, weight.block_mask.t(), None
    block = torch.arange(weight.nnz_blocks, device=weight.device)
    perm = weight.row_perm.long()
    return weight.crow, weight.col, block, cols, weight.block_mask[perm], perm


def largest_unions_first(mask: torch.Tensor, perm: torch.Tensor, group_size: int) -> torch.Tensor:
    """`perm` with its full groups reordered by union size, largest first (a partial last group
    stays last). Programs launch in group order, so the GPU starts the longest ones first and
    the last wave holds the shortest: unequal unions then leave no long tail (on grouped masks
    the transposed orientation's largest union is ~1.8x its mean: docs/results/llama_union.md)."""
    full = perm.numel() // group_size
    sizes = group_union_sizes(mask, group_size, perm)[:full]
    order = torch.sort(sizes, descending=True, stable=True).indices
    head = perm[: full * group_size].view(full, group_size)[order].reshape(-1)
    return torch.cat([head, perm[full * group_size:]])


@torch.compiler.disable
def get_schedule(weight: BlockSparseWeight, group_size: int, transposed: bool = False,
                 cluster: bool = True) -> Schedule:
    """The schedule of `weight` (or W^T) for `group_size`, built on first use and kept
    as one of the weight's layouts (`BlockSparseWeight.layout`)."""
    cluster = cluster and group_size > 1
    key = f"schedule_{'t' if transposed else 'f'}{group_size}{'c' if cluster else 'n'}"

    def build(weight: BlockSparseWeight) -> dict:
        crow, col, block, num_block_cols, mask, true_rows = _orientation(weight, transposed)
        perm = largest_unions_first(mask, cluster_block_rows(mask, group_size), group_size) if cluster else None
        schedule = build_schedule(crow, col, block, num_block_cols, group_size, perm, true_rows)
        return dict(zip(_SCHEDULE_TENSORS, schedule.tensors))

    luts = weight.layout(key, build)
    return Schedule(*(luts[name] for name in _SCHEDULE_TENSORS), group_size=group_size)


@torch.compiler.disable
def choose_group_size(weight: BlockSparseWeight, transposed: bool = False) -> int:
    """G minimising union_density(G) / efficiency(b*G) on the natural-order unions.

    Clustering (applied afterwards to the chosen G) only lowers the unions, so
    the natural order is a cheap, conservative estimate.
    """
    def build(weight: BlockSparseWeight) -> dict:
        mask = _orientation(weight, transposed)[4]
        best, best_cost = 1, math.inf
        for g in GROUP_SIZES:
            width = weight.block_size * g
            if width > 128 or (g > 1 and g > mask.shape[0]):
                continue
            sizes = group_union_sizes(mask, g)
            density = float(sizes.double().mean()) / mask.shape[1] if sizes.numel() else 0.0
            cost = density / TILE_EFFICIENCY[width]
            if cost < best_cost - 1e-9:
                best, best_cost = g, cost
        return {"group_size": best}

    return weight.layout(f"group_size_{'t' if transposed else 'f'}", build)["group_size"]
