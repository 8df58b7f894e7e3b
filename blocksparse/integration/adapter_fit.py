"""The adapter fit: a LoRA adapter fitted to the dense model layer by layer before training.

    fit_adapter(peft_model, dense_teacher, calibration_ids, hidden_order=order)

A fresh adapter starts as zero (B = 0), so training first spends its tokens on what
pruning removed. Fitted, each decoder layer's adapter is trained so that the pruned
layer, on the inputs the pruned model gives it (through the layers fitted before it),
reproduces the dense layer's output on the dense model's inputs: the pruner's layer
refinement (`prune.refine`) with the adapter trained instead of the kept blocks, which stay
as the pruner left them (so the model without its adapter is unchanged). ApiQ (Liao et al.,
2024) initialises LoRA for quantized models the same way. What it buys per token and per
minute: README, "Recovery, measured".
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..families import decoder_layers
from ..prune.calibration import advance, calibration_batches, layer0_inputs, layer_output
from ..prune.refine import REFINE_PRECISIONS, relative_error


def lora_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """The LoRA weights (PEFT's lora_A / lora_B) inside `layer`."""
    return [p for name, p in layer.named_parameters() if ".lora_A." in name or ".lora_B." in name]


def fit_adapter(model: nn.Module, teacher: nn.Module, calib_inputs: torch.Tensor, steps: int = 64,
                lr: float = 1e-2, hidden_order: torch.Tensor | None = None, micro_batch: int = 2,
                precision: str = "bfloat16", progress: bool = True) -> dict:
    """Fit the LoRA adapter of `model` (a PeftModel of a pruned model) to `teacher` (the dense
    model it was pruned from, on the same device), one decoder layer after the other, in place.

    calib_inputs: token ids [nsamples, seqlen]; steps: Adam steps per layer on `micro_batch`
    samples each, cosine-annealed from `lr` (absolute: B starts at zero); hidden_order: the
    student's hidden channel k is the teacher's channel hidden_order[k]
    (`checkpoint.hidden_channel_order`). precision: as the pruner's refinement
    (`prune.refine.REFINE_PRECISIONS`: the last fifth of the steps in fp32). The loss is each
    token's squared error relative to its target's squared norm; a layer whose loss does not
    fall keeps its adapter as it was. Dropout is off during the fit. Returns {"steps", "lr",
    "calibration", "layer_loss_before_after", "seconds"}.
    """
    if steps < 1 or not lr > 0:
        raise ValueError(f"fit_adapter needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    if precision not in REFINE_PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(REFINE_PRECISIONS)}, got {precision!r}")
    student = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers, teacher_layers = decoder_layers(student), decoder_layers(teacher)
    if len(layers) != len(teacher_layers):
        raise ValueError(f"the teacher has {len(teacher_layers)} decoder layers, the model {len(layers)}")
    if not lora_parameters(student):
        raise ValueError("fit_adapter: the model has no LoRA adapter (wrap it with get_peft_model first)")
    autocast_dtype = REFINE_PRECISIONS[precision]
    low_precision_steps = steps - (steps + 4) // 5 if autocast_dtype is not None else 0
    device = next(student.parameters()).device
    started = time.perf_counter()
    batches = calibration_batches(calib_inputs, micro_batch)
    modes = {m: m.training for m in (*student.modules(), *teacher.modules())}
    student.eval()
    teacher.eval()
    losses: dict[str, list[float]] = {}
    try:
        with torch.no_grad():
            hidden, kwargs = layer0_inputs(student, layers, batches, device)
            teacher_hidden, teacher_kwargs = layer0_inputs(teacher, teacher_layers, batches, device)
        iterator = range(len(layers))
        if progress:
            from tqdm.auto import tqdm
            iterator = tqdm(iterator, desc="fitting the adapter", unit="layer")
        for i in iterator:
            with torch.no_grad():
                advance(teacher_layers[i], teacher_hidden, teacher_kwargs)
            targets = [t if hidden_order is None else t.index_select(-1, hidden_order.to(t.device))
                       for t in teacher_hidden]
            params = lora_parameters(layers[i])
            if params:
                losses[str(i)] = list(_fit_layer(layers[i], params, hidden, kwargs, targets, steps, lr,
                                                 low_precision_steps, autocast_dtype))
            with torch.no_grad():
                advance(layers[i], hidden, kwargs)
    finally:
        for module, mode in modes.items():
            module.train(mode)
    return {"steps": steps, "lr": lr, "calibration": list(calib_inputs.shape), "layer_loss_before_after": losses,
            "seconds": round(time.perf_counter() - started, 1)}


def _fit_layer(layer, params, hidden, kwargs, targets, steps, lr, low_precision_steps, autocast_dtype):
    """Adam on `params` so that layer(hidden) matches targets; returns the mean loss before and after."""
    def loss_of(j: int, autocast=None) -> torch.Tensor:
        with torch.autocast(hidden[j].device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            out = layer_output(layer(hidden[j], **kwargs[j]))
        return relative_error(out.float(), targets[j].float())

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(loss_of(j).item() * h.shape[0] for j, h in enumerate(hidden)) / sum(h.shape[0] for h in hidden)

    before = mean_loss()
    saved = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    with torch.enable_grad():
        for step in range(steps):
            loss = loss_of(step % len(hidden), autocast_dtype if step < low_precision_steps else None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    for p in params:
        p.grad = None
    after = mean_loss()
    if not after < before:  # never leave a layer worse than it was
        with torch.no_grad():
            for p, old in zip(params, saved):
                p.copy_(old)
        after = before
    return before, after
