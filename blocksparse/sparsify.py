"""Swap a model's nn.Linear layers for BlockSparseLinear per instance, and back.

    sparsify_model(model, sparsity=0.5)              # the family's projections, magnitude masks
    sparsify_model(model, block_masks={name: mask})  # exactly these linears
    densify_model(model)                             # BlockSparseLinear -> nn.Linear
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .families import family_of
from .nn import BlockSparseLinear

FilterFn = Callable[[nn.Module, str], bool]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at the qualified name `name` inside `model`; returns what was there."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def target_linears(model: nn.Module, target_modules: Sequence[str] | None = None,
                   filter_fn: FilterFn | None = None) -> dict[str, nn.Linear]:
    """The nn.Linear layers that sparsification acts on, by qualified name.

    filter_fn(module, name) chooses them if given; else the linears whose name ends
    in one of `target_modules`, by default the projections of the model's family
    (`blocksparse.families`). lm_head is never among them by default.
    """
    if filter_fn is None and target_modules is None:
        target_modules = family_of(model).projections
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if filter_fn is not None:
            if filter_fn(module, name):
                found[name] = module
        elif name.rpartition(".")[2] in target_modules:
            found[name] = module
    return found


def check_block_divisible(linears: Mapping[str, nn.Linear], block_size: int) -> None:
    """Raise ValueError naming every linear whose out/in dims do not divide by block_size."""
    bad = [f"{name} [{lin.out_features}, {lin.in_features}]" for name, lin in linears.items()
           if lin.out_features % block_size or lin.in_features % block_size]
    if bad:
        raise ValueError(f"linear dims must divide by block size {block_size}; not divisible: "
                         + ", ".join(bad[:8]) + (f" (+{len(bad) - 8} more)" if len(bad) > 8 else ""))


@torch.no_grad()
def sparsify_model(model: nn.Module, block_masks: Mapping[str, torch.Tensor] | None = None,
                   sparsity: float | None = None, block_size: int | None = None,
                   target_modules: Sequence[str] | None = None,
                   filter_fn: FilterFn | None = None, *,
                   row_perms: Mapping[str, torch.Tensor] | None = None, row_group: int = 1,
                   whole_stays_dense: bool = False) -> nn.Module:
    """Replace target nn.Linear layers of `model` in place with BlockSparseLinear.

    block_masks: {qualified linear name: bool [out/b, in/b]}; exactly those layers
    are converted. Otherwise the linears of `target_linears(model, target_modules,
    filter_fn)` are converted with a per-block-row magnitude mask at `sparsity`
    (all blocks kept when None). block_size: b (default 16; with masks, read from
    their shapes and checked against them when given). row_perms ({name: row permutation}) with row_group:
    the masks' row groupings (`prune_model(row_group=G)` converts with its own).
    whole_stays_dense: a linear whose mask keeps every block stays nn.Linear (dense
    BLAS / cuBLAS beats a block-sparse op at density 1; `prune_model` asks for it).
    Returns the model; undo with `densify_model`.
    """
    if block_masks is not None:
        if sparsity is not None:
            raise ValueError("give either block_masks or sparsity, not both")
        modules = dict(model.named_modules())
        for name in block_masks:
            if not isinstance(modules.get(name), nn.Linear):
                found = type(modules[name]).__name__ if name in modules else "nothing"
                raise ValueError(f"block_masks names {name!r}, expected an nn.Linear there, found {found}")
        chosen = {name: modules[name] for name in block_masks}
    else:
        if filter_fn is None and target_modules is None:
            target_modules = family_of(model).projections
        chosen = target_linears(model, target_modules, filter_fn)
        if not chosen:
            raise ValueError(
                f"no nn.Linear in the model matches target_modules={tuple(target_modules or ())}"
                + (" / filter_fn" if filter_fn is not None else "")
            )
    for name, linear in chosen.items():
        mask = block_masks[name] if block_masks is not None else None
        if whole_stays_dense and mask is not None and bool(mask.all()):
            continue
        perm = row_perms.get(name) if row_perms is not None else None
        try:
            new = BlockSparseLinear.from_linear(
                linear, block_mask=mask, sparsity=None if mask is not None else sparsity,
                block_size=block_size, row_perm=perm, row_group=row_group if perm is not None else 1)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
        replace_module(model, name, new)
    return model


@torch.no_grad()
def densify_model(model: nn.Module) -> nn.Module:
    """Revert `sparsify_model`: every BlockSparseLinear becomes an nn.Linear (pruned blocks zero)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BlockSparseLinear):
            values = module.sparse_weight.values
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              device=values.device, dtype=values.dtype)
            dense.weight.copy_(module.to_dense())
            if module.bias is not None:
                dense.bias.copy_(module.bias)
            replace_module(model, name, dense)
    return model
