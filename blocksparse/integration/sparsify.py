"""Swap a model's nn.Linear layers for BlockSparseLinear per instance, and back."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from ..format import DEFAULT_BLOCK_SIZE
from ..nn import BlockSparseLinear

# The projections of a Llama decoder layer (attention and MLP); lm_head is never touched.
LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def target_linears(model: nn.Module, target_modules=LLAMA_TARGET_MODULES,
                   filter_fn: Callable[[nn.Module, str], bool] | None = None) -> dict[str, nn.Linear]:
    """The nn.Linear layers that sparsification acts on, by qualified name."""
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


@torch.no_grad()
def sparsify_model(model: nn.Module, block_masks: Mapping[str, torch.Tensor] | None = None,
                   sparsity: float | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                   target_modules=LLAMA_TARGET_MODULES,
                   filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Replace target nn.Linear layers of `model` in place with BlockSparseLinear.

    block_masks: {qualified linear name: bool [out/b, in/b]}; exactly those layers
    are converted. Otherwise every linear chosen by `filter_fn(module, name)` (or,
    by default, whose name ends in one of `target_modules`) is converted with a
    per-block-row magnitude mask at `sparsity` (all blocks kept when None).
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
        chosen = target_linears(model, target_modules, filter_fn)
        if not chosen:
            raise ValueError(
                f"no nn.Linear in the model matches target_modules={tuple(target_modules)}"
                + (" / filter_fn" if filter_fn is not None else "")
            )
    for name, linear in chosen.items():
        mask = block_masks[name] if block_masks is not None else None
        try:
            new = BlockSparseLinear.from_linear(
                linear, block_mask=mask, sparsity=None if mask is not None else sparsity,
                block_size=block_size)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
        _replace(model, name, new)
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
            _replace(model, name, dense)
    return model
