"""Calibration plumbing of sequential pruning: what reaches each decoder layer, and the
statistics of each linear's input (||X_j||^2, H = X^T X, X^T X_dense).

Hooks raise `_Stop` once the activations needed from a layer have been seen, so a
layer runs only as far as the linear being measured.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Iterator, Mapping

import torch
from torch import nn

DEFAULT_SINK_WEIGHT = 1000.0
DEFAULT_SINK_TOKENS = 1024


class _Stop(Exception):
    """Raised from a hook once the activations needed from a layer have been seen."""


class InputStats:
    """Running statistics of one linear input X: sum of X_j^2, H = X^T X, and X^T X_dense.

    Tokens can be weighted (sink_weight for position 0 of every window): a weight w
    counts the token w times in all three statistics.
    """

    def __init__(self, features: int, gram: bool, cross: bool, sink_weight: float = 1.0):
        self.sq_norms = torch.zeros(features, dtype=torch.float64)
        self.gram = torch.zeros(features, features, dtype=torch.float64) if gram else None
        self.cross = torch.zeros(features, features, dtype=torch.float64) if cross else None
        self.sink_weight = sink_weight
        self.tokens = 0

    def _weighted(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float()
        if self.sink_weight != 1.0 and x.dim() == 3:  # [batch, seq, features]
            scale = torch.ones(x.shape[1], 1, device=x.device)
            scale[0] = math.sqrt(self.sink_weight)
            x = x * scale
        return x.reshape(-1, x.shape[-1])

    def add(self, x: torch.Tensor, x_dense: torch.Tensor | None = None) -> None:
        self.tokens += x.numel() // x.shape[-1]
        x = self._weighted(x)
        self.sq_norms += x.square().sum(0).double().cpu()
        if self.gram is not None:
            self.gram += (x.T @ x).double().cpu()
        if self.cross is not None:
            self.cross += (x.T @ self._weighted(x_dense)).double().cpu()


def sink_probe_ids(calib_inputs: torch.Tensor, count: int, bos_token_id: int | None = None) -> torch.Tensor:
    """The `count` most frequent tokens of the calibration text (and BOS), as one-token sequences [n, 1].

    Position 0 attends only to itself, so its hidden state in every layer is a function of
    its token alone: fitting these sequences fits the attention sink for every first token
    a window can start with, where the calibration windows show only nsamples of them.
    """
    if count <= 0:
        return calib_inputs.new_zeros((0, 1))
    ids, counts = calib_inputs.flatten().unique(return_counts=True)
    probes = ids[counts.argsort(descending=True, stable=True)][:count]
    if isinstance(bos_token_id, int) and bos_token_id >= 0 and not (probes == bos_token_id).any():
        probes = torch.cat([probes.new_tensor([bos_token_id]), probes[:count - 1]])
    return probes[:, None]


def calibration_batches(calib_inputs: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if calib_inputs.dim() != 2 or calib_inputs.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"calib_inputs must be token ids [nsamples, seqlen] (int64), "
                         f"got {calib_inputs.dtype} of shape {tuple(calib_inputs.shape)}")
    return list(calib_inputs.split(batch_size))


@contextlib.contextmanager
def placed_on(module: nn.Module, device: torch.device, read_only: bool = False) -> Iterator[nn.Module]:
    """`module` on `device` inside the block and back where it was after (nothing moves if it
    is there): how a model larger than the execution device is pruned one layer at a time.
    read_only: the block changes nothing, so the module gets its own tensors back instead of
    copies of the device's (no copy back; a memory-mapped model stays mapped)."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    if first is None or first.device == device:
        yield module
        return
    home = first.device
    # (table, name, the tensor there, its data): `to` either re-points a parameter's data or
    # replaces the parameter (and always the buffer); both are undone.
    kept = [(table, name, t, t.data) for m in module.modules() for table in (m._parameters, m._buffers)
            for name, t in table.items() if t is not None] if read_only else []
    module.to(device)
    try:
        yield module
    finally:
        if read_only:
            for table, name, t, data in kept:
                table[name] = t
                t.data = data
        else:
            module.to(home)


def outside_layers(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    """The largest submodules of `model` that hold no decoder layer (embeddings, rotary
    tables, final norm, head): what the pass to layer 0 needs besides the layers."""
    inside = set(map(id, layers.modules()))
    out = []

    def walk(module):
        for child in module.children():
            if id(child) in inside:
                continue
            if any(id(m) in inside for m in child.modules()):
                walk(child)
            else:
                out.append(child)

    walk(model)
    return out


@torch.no_grad()
def layer0_inputs(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor], device: torch.device):
    """Hidden states and keyword arguments that reach decoder layer 0, per batch, on `device`
    (the modules outside the layers are placed there for the pass)."""
    captured = []

    def grab(module, args, kwargs):
        captured.append((args[0] if args else kwargs.pop("hidden_states"), kwargs))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with contextlib.ExitStack() as stack:
            for module in outside_layers(model, layers):
                stack.enter_context(placed_on(module, device, read_only=True))
            for ids in batches:
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    hidden = [h for h, _ in captured]
    kwargs = [{key: value for key, value in kw.items() if key not in ("cache", "past_key_values", "past_key_value")}
              for _, kw in captured]
    return hidden, kwargs


def linear_groups(layer: nn.Module, linears: Mapping[str, nn.Linear], hidden: torch.Tensor,
                   kwargs: dict) -> list[list[str]]:
    """Target linears of `layer` grouped by shared input, in the order they run."""
    order: list[tuple[str, int]] = []
    seen_inputs: list[torch.Tensor] = []

    def make_hook(name):
        def hook(module, args):
            x = args[0]
            for i, other in enumerate(seen_inputs):
                if other is x:
                    order.append((name, i))
                    return
            seen_inputs.append(x)
            order.append((name, len(seen_inputs) - 1))
        return hook

    handles = [lin.register_forward_pre_hook(make_hook(name)) for name, lin in linears.items()]
    try:
        layer(hidden[:1], **slice_kwargs(kwargs, hidden.shape[0], 0, 1))
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[int, list[str]] = {}
    for name, i in order:
        if name not in groups.setdefault(i, []):
            groups[i].append(name)
    missing = set(linears) - {name for name, _ in order}
    if missing:
        raise ValueError(f"target linears never ran during the layer's forward: {sorted(missing)}")
    return list(groups.values())


def slice_kwargs(kwargs: dict, batch: int, start: int, stop: int, float32: bool = False) -> dict:
    """Keyword arguments of a batch of `batch` samples cut to samples start:stop.

    Only tensors whose first dim is the batch are cut (a [1, T, d] rotary table serves
    every sample); with float32, floating tensors are also cast to fp32.
    """
    def cut(value):
        if value.dim() > 0 and value.shape[0] == batch:
            value = value[start:stop]
        return value.float() if float32 and value.is_floating_point() else value

    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            value = cut(value)
        elif isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
            value = tuple(cut(v) for v in value)
        out[key] = value
    return out


def collect_stats(layer, names, linears, hidden, kwargs, need_gram, sink_weight, dense_layer=None, dense_hidden=None):
    """Statistics of the inputs of `names` (one shared input) over all calibration batches.

    With a dense layer, also X^T X_dense, pairing each token's input in the pruned
    model with its input in the dense model.
    """
    first = linears[names[0]]
    stats = InputStats(first.in_features, gram=need_gram, cross=dense_layer is not None, sink_weight=sink_weight)
    dense_first = None if dense_layer is None else dict(dense_layer.named_modules())[_local(layer, first)]
    for i, (h, kw) in enumerate(zip(hidden, kwargs)):
        x_dense = None
        if dense_layer is not None:
            box = []

            def grab_dense(module, args):
                box.append(args[0])
                raise _Stop

            handle = dense_first.register_forward_pre_hook(grab_dense)
            try:
                dense_layer(dense_hidden[i], **kw)
            except _Stop:
                pass
            finally:
                handle.remove()
            x_dense = box[0]

        def grab(module, args):
            stats.add(args[0], x_dense)
            raise _Stop

        handle = first.register_forward_pre_hook(grab)
        try:
            layer(h, **kw)
        except _Stop:
            pass
        finally:
            handle.remove()
    return stats


def _local(layer: nn.Module, module: nn.Module) -> str:
    for name, m in layer.named_modules():
        if m is module:
            return name
    raise ValueError("module is not inside the layer")


def dense_sq_norms(layers, hidden, kwargs, linears_by_layer, device: torch.device) -> dict[str, torch.Tensor]:
    """||X_j||^2 of every target linear's input in the dense model (for OWL), the calibration
    batches (`hidden`, `kwargs`: what reaches layer 0) run through one layer at a time."""
    sq = {name: torch.zeros(lin.in_features, dtype=torch.float64)
          for per_layer in linears_by_layer for name, lin in per_layer.items()}

    def make_hook(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sq[name] += x.square().sum(0).double().cpu()
        return hook

    handles = [lin.register_forward_pre_hook(make_hook(name))
               for per_layer in linears_by_layer for name, lin in per_layer.items()]
    try:
        hidden = list(hidden)  # the caller's list keeps what reaches layer 0
        for layer in layers:
            with placed_on(layer, device, read_only=True):
                advance(layer, hidden, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return sq


def advance(layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> None:
    """Replace each batch's hidden states by `layer`'s output, one batch at a time, so that at
    most one batch exists twice (a whole new list would double the activations at the peak)."""
    for j, kw in enumerate(kwargs):
        hidden[j] = layer_output(layer(hidden[j], **kw))


def layer_output(out):
    """The hidden states of a decoder layer's output (a tensor, or a tuple led by one)."""
    return out[0] if isinstance(out, (tuple, list)) else out
