"""Layer refinement: Adam on the kept weights of one pruned decoder layer, fitted to the dense layer.

The per-linear closed-form fits cannot see the nonlinearities (softmax, SiLU gate)
between a layer's linears; this fits the layer as a whole, with its block pattern fixed.
"""

from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import torch
from torch import nn

from .calibration import layer_output, slice_kwargs

# The dtype the refinement steps' matmuls run in (None: as the weights, fp32).
REFINE_PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}


def refine_layer(layer: nn.Module, weights: Mapping[str, tuple[nn.Parameter, torch.Tensor]],
                 hidden: Sequence[torch.Tensor], kwargs: Sequence[dict], targets: Sequence[torch.Tensor],
                 steps: int, lr: float, micro_batch: int = 2,
                 sink: tuple[torch.Tensor, dict, torch.Tensor] | None = None,
                 sink_micro_batch: int = 256, precision: torch.dtype | None = None) -> tuple[float, float]:
    """Adam on the kept weights of one pruned decoder layer so that its output matches `targets`.

    weights: {name: (weight parameter, boolean element mask)}; the mask is re-applied after every
    step, so the block pattern is unchanged; lr is relative to each matrix's RMS weight.
    The loss is each token's squared error relative to its target's squared norm,
    averaged over tokens: the sink token's norm is ~100x the others, so an absolute
    error would fit nothing else. sink: (hidden, kwargs, targets) of the one-token sink
    probes (`sink_probe_ids`); each step adds their mean loss (a micro-batch of
    `sink_micro_batch` of them) to the windows', so the sink counts as much as all the
    other tokens: a refinement fitted to the windows alone broke the sink for first tokens
    it had not seen. precision: the steps' forward and backward run under autocast to it
    (e.g. torch.bfloat16), all but the last fifth, which settle in fp32; the weights, Adam
    and the loss stay fp32. Returns the mean loss over the calibration data before and
    after, in fp32; a refinement that does not lower it is undone.
    """
    def split(h, kw, t, size):
        return [(h[s:s + size], slice_kwargs(kw, h.shape[0], s, s + size, float32=True), t[s:s + size])
                for s in range(0, h.shape[0], size)]

    chunks = [chunk for h, kw, t in zip(hidden, kwargs, targets) for chunk in split(h, kw, t, micro_batch)]
    sink_chunks = [] if sink is None else split(*sink, sink_micro_batch)

    def loss_of(h, kw, t, autocast=None):
        h, t = h.float(), t.float()
        with torch.autocast(h.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            out = layer_output(layer(h, **kw)).float()
        err = (out - t).square().sum(-1) / t.square().sum(-1).clamp_min(1e-12)
        return err.mean()

    def mean_loss():
        def mean(parts):
            return sum(loss_of(*c).item() * c[0].shape[0] for c in parts) / sum(c[0].shape[0] for c in parts)
        with torch.no_grad():
            return mean(chunks) + (mean(sink_chunks) if sink_chunks else 0.0)

    params = [p for p, _ in weights.values()]
    masks = [mask.float() for _, mask in weights.values()]  # multiplied into fp32 weights
    trainable = {p: p.requires_grad for p in layer.parameters()}
    dtypes = {name: t.dtype for name, t in itertools.chain(layer.named_parameters(), layer.named_buffers())}
    try:
        # Adam's moments and steps of ~1% of a weight need fp32: a half-precision layer
        # is refined in fp32 and cast back.
        layer.float()
        for p in layer.parameters():
            p.requires_grad_(any(p is q for q in params))
        before = mean_loss()
        saved = [p.detach().clone() for p in params]
        # Adam moves every weight by ~lr per step whatever its gradient's scale, so the step
        # is set relative to each matrix's RMS weight (0.02 in a fresh model, 0.2 in SmolLM2).
        optimizer = torch.optim.Adam([{"params": [p], "lr": lr * float(p.detach()[m.bool()].square().mean().sqrt())}
                                      for p, m in zip(params, masks)], fused=True)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        # bf16 throughout lost one-shot quality on the demo; the last fifth in fp32 won it
        # back (docs/DESIGN.md, section 6).
        low_precision_steps = steps - (steps + 4) // 5 if precision is not None else 0  # fp32: at least one
        with torch.enable_grad():
            for step in range(steps):
                autocast = precision if step < low_precision_steps else None
                loss = loss_of(*chunks[step % len(chunks)], autocast=autocast)
                if sink_chunks:
                    loss = loss + loss_of(*sink_chunks[step % len(sink_chunks)], autocast=autocast)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                with torch.no_grad():
                    for p, m in zip(params, masks):
                        p.mul_(m)
        after = mean_loss()
        if not after < before:  # never leave a layer worse than its closed-form fit
            with torch.no_grad():
                for p, old in zip(params, saved):
                    p.copy_(old)
            after = before
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
            p.grad = None
        # One by one: a layer may mix dtypes on purpose (fp32 norms or rotary tables).
        for name, t in itertools.chain(layer.named_parameters(), layer.named_buffers()):
            t.data = t.data.to(dtypes[name])
    return before, after
