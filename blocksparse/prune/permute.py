"""Channel permutations before block pruning: reorder the channels of the dense model so that
channels of like importance share a b-wide block, and a block row's kept blocks hold more of
its score. `channel_orders` chooses the orders, `permute_outside` and `permute_layer` apply
them (`prune_model(..., permute_channels=True)` does both, one decoder layer at a time).

Only reorderings the model cannot tell apart are used: the permuted model computes what the
dense one did (up to the rounding of reordered sums) and stays a plain model of its family,
so nothing at run time pays for it.

- hidden: the residual stream's channels, one order for the whole model: the columns of
  every layer's q/k/v/gate/up, the rows of o/down (and their biases), every RMSNorm weight
  (a norm over all channels does not depend on their order), the embeddings and the head's
  columns. The hidden states of the permuted model are the dense model's taken in this
  order, which a hidden-state teacher must follow (prune_report.json records it).
- mlp: each layer's MLP channels: the rows of gate/up, the columns of down.
- value: each layer's value channels inside every key-value head: the rows of v, and the
  columns of o of every query head that reads that value head.

Query and key rows stay as they are: RoPE rotates channel pair (i, i + d/2) by the pair's
fixed frequency, so their order is part of the function.

The order is by descending importance: a channel's share of the score mass |W_ij| ||X_j|| of
the pruned matrices, summed over them. Hidden channels count every pruned matrix that reads
them (their column) or writes them (their row, summed over the row's inputs); value channels
the o columns and v rows; MLP channels only down's columns, the matrix that reads them (a row
order does not move score between a block row's blocks, and so the MLP keeps its order when
down is not pruned). For a score matrix close to rank one (row scale x column scale, as
activation outliers make it) sorting the columns puts the heavy ones in the same blocks.
Channel permutations for N:M sparsity: Pool & Yu, NeurIPS 2021; Zhang et al. (RIA), ICLR
2024. Measured gains are in docs/DESIGN.md, section 6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from ..families import Family


@dataclass
class ChannelOrders:
    """New position k holds old channel order[k] (None: unchanged)."""

    hidden: torch.Tensor | None
    mlp: list[torch.Tensor | None]
    value: list[torch.Tensor | None]


def channel_orders(model: nn.Module, family: Family, linears_by_layer: list[Mapping[str, nn.Linear]],
                   sq_norms: Mapping[str, torch.Tensor], pruned: set[str]) -> ChannelOrders:
    """The orders, from the dense model's weights and the input norms ||X_j||^2 of every target
    linear (`calibration.dense_sq_norms`). Only the linears named in `pruned` count; a
    dimension that none of them reads or writes keeps its order."""
    config = model.config
    hidden_importance = None
    mlp, value = [], []
    for linears in linears_by_layer:
        # role -> (columns' shares, rows' shares) of the pruned linears of this layer
        shares = {name.rpartition(".")[2]: _score_shares(lin.weight, sq_norms[name])
                  for name, lin in linears.items() if name in pruned}
        writers = (family.output_projection, family.down_projection)
        readers = [role for role in family.projections if role not in writers]
        parts = [shares[r][0] for r in readers if r in shares] + [shares[w][1] for w in writers if w in shares]
        for part in parts:
            hidden_importance = part if hidden_importance is None else hidden_importance + part
        down = shares.get(family.down_projection)
        mlp.append(None if down is None else _descending(down[0]))
        value.append(_value_order(shares.get(family.output_projection, (None,))[0],
                                  shares.get(family.value_projection, (None, None))[1], config))
    hidden = None if hidden_importance is None else _descending(hidden_importance)
    return ChannelOrders(hidden, mlp, value)


def _score_shares(weight: torch.Tensor, sq_norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each column's and each row's share of the score mass |W_ij| ||X_j|| (float64, on the CPU):
    sums of |W| only, never the score matrix itself."""
    magnitude = weight.detach().abs().float()
    norms = sq_norms.to(magnitude.device).sqrt()
    columns = magnitude.sum(0).double().cpu() * norms.double().cpu()
    total = columns.sum().clamp_min(torch.finfo(torch.float64).tiny)
    return columns / total, (magnitude @ norms.float()).double().cpu() / total


def check_order(order: torch.Tensor, what: str) -> None:
    """One line naming what came, unless `order` is a permutation of 0..n-1."""
    if order.dim() != 1 or order.is_floating_point() or not len(order):
        raise ValueError(f"{what} must be a non-empty 1-D list of channel indices, got {order.dtype} "
                         f"of shape {tuple(order.shape)}")
    if not torch.equal(order.sort().values, torch.arange(len(order), device=order.device)):
        raise ValueError(f"{what} must be a permutation of 0..n-1, got {len(order)} entries, "
                         f"{len(order.unique())} distinct, from {int(order.min())} to {int(order.max())}")


def _descending(importance: torch.Tensor) -> torch.Tensor:
    return torch.argsort(importance, descending=True, stable=True)


def _value_order(o_columns: torch.Tensor | None, v_rows: torch.Tensor | None, config) -> torch.Tensor | None:
    """One order per key-value head, the same for the o columns of every query head reading it."""
    if o_columns is None and v_rows is None:
        return None
    heads, kv_heads, head_dim = _attention_geometry(config)
    per_kv = torch.zeros(kv_heads, head_dim, dtype=torch.float64)
    if o_columns is not None:  # query head h reads value head h // (heads / kv_heads)
        per_kv += o_columns.reshape(kv_heads, heads // kv_heads, head_dim).sum(1)
    if v_rows is not None:
        per_kv += v_rows.reshape(kv_heads, head_dim)
    order = torch.argsort(per_kv, dim=1, descending=True, stable=True)
    return (order + torch.arange(kv_heads)[:, None] * head_dim).flatten()


def _attention_geometry(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def _take(param: torch.Tensor | None, order: torch.Tensor | None, dim: int) -> None:
    if param is not None and order is not None:
        param.data = param.data.index_select(dim, order.to(param.device))


@torch.no_grad()
def permute_outside(model: nn.Module, family: Family, hidden: torch.Tensor | None) -> dict[str, nn.Parameter]:
    """Reorder the hidden channels of what lies outside the decoder layers: the embeddings, the
    final norm and the head (nothing to do for a head tied to the embeddings). Returns the
    parameters it gave new tensors, by a name of their own."""
    if hidden is None:
        return {}
    embeddings = model.get_input_embeddings()
    changed = {"embeddings": embeddings.weight, "final_norm": model.get_submodule(family.final_norm).weight}
    head = model.get_output_embeddings()
    if head is not None and head.weight is not embeddings.weight:
        changed["head"] = head.weight
    for name, param in changed.items():
        _take(param, hidden, 0 if name == "final_norm" else 1)
    return changed


@torch.no_grad()
def permute_layer(layer: nn.Module, family: Family, orders: ChannelOrders, index: int, config) -> None:
    """Reorder decoder layer `index`'s channels (every order of `orders` that touches it)."""
    attention = layer.get_submodule(family.attention)
    mlp_module = layer.get_submodule(family.mlp)

    def lin(role: str) -> nn.Linear:
        return (attention if role in family.attention_projections else mlp_module).get_submodule(role)

    hidden, mlp, value = orders.hidden, orders.mlp[index], orders.value[index]
    for norm in family.layer_norms:
        _take(layer.get_submodule(norm).weight, hidden, 0)
    for role in family.projections:
        if role in (family.output_projection, family.down_projection):
            _take(lin(role).weight, hidden, 0)
            _take(lin(role).bias, hidden, 0)
        else:
            _take(lin(role).weight, hidden, 1)
    for role in family.mlp_projections:
        if role == family.down_projection:
            _take(lin(role).weight, mlp, 1)
        else:
            _take(lin(role).weight, mlp, 0)
            _take(lin(role).bias, mlp, 0)
    if value is not None:
        heads, kv_heads, head_dim = _attention_geometry(config)
        _take(lin(family.value_projection).weight, value, 0)
        _take(lin(family.value_projection).bias, value, 0)
        # Query head h's columns follow its value head's order.
        per_query = value.reshape(kv_heads, 1, head_dim) - torch.arange(kv_heads)[:, None, None] * head_dim
        per_query = per_query.expand(kv_heads, heads // kv_heads, head_dim).reshape(heads, head_dim)
        _take(lin(family.output_projection).weight,
              (per_query + torch.arange(heads)[:, None] * head_dim).flatten(), 1)
