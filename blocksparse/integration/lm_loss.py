"""The causal-LM loss without the logits tensor: cross entropy of hidden @ W^T, in chunks.

    loss = linear_cross_entropy(hidden, lm_head.weight, labels, num_items_in_batch)

The same loss as Hugging Face's ForCausalLMLoss on `lm_head(hidden)` (labels shifted
inside, -100 ignored; summed and divided by num_items_in_batch, else the mean over the
counted labels), but the [tokens, vocabulary] logits never exist whole: each chunk's
logits are multiplied out, turned into its loss and its gradient (softmax - one-hot) at
once, and dropped. Liger-Kernel fuses the same product on GPUs (FusedLinearCrossEntropy).
With a 49k-token vocabulary and a 576-wide model, the logits' fp32 copy, its gradient
buffer and the casts between them cost more than the two products on a CPU, and for long
sequences of a 128k-vocabulary model they are gigabytes.

Under autocast the products run in the autocast dtype, the softmax in fp32, as
`lm_head` under autocast followed by the fp32 loss computes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# fp32 logits per chunk: 1,365 tokens of a 49,152-token vocabulary.
CHUNK_BYTES = 256 << 20


def chunk_rows(vocab: int) -> int:
    """Tokens per chunk: its fp32 logits within CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * vocab))


class _SummedCrossEntropy(torch.autograd.Function):
    """Summed cross entropy of hidden [T, H] @ weight [V, H]^T against labels [T]; its
    gradients are computed in the forward, chunk by chunk, and scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels):
        rows = chunk_rows(weight.shape[0])
        need_weight = ctx.needs_input_grad[1]
        exact = torch.promote_types(hidden.dtype, torch.float32)  # the softmax's dtype
        total = torch.zeros((), dtype=exact, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=exact, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], rows):
            h, label = hidden[start:start + rows], labels[start:start + rows]
            counted = label != IGNORE_INDEX
            target = torch.where(counted, label, 0).unsqueeze(1)
            z = (h @ weight.T).to(exact)
            picked = z.gather(1, target).squeeze(1)
            top = z.amax(dim=1, keepdim=True)
            z.sub_(top).exp_()
            norm = z.sum(dim=1, keepdim=True)
            total += torch.where(counted, (top + norm.log()).squeeze(1) - picked, 0.0).sum()
            z.div_(norm)  # softmax
            z.scatter_add_(1, target, torch.full_like(target, -1.0, dtype=z.dtype))
            z.mul_(counted.unsqueeze(1))
            g = z.to(hidden.dtype)
            grad_hidden[start:start + rows] = g @ weight
            if need_weight:
                grad_weight += g.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight if need_weight else None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = (grad_hidden.to(grad_total.dtype) * grad_total).to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """The causal-LM loss of logits = hidden [B, L, H] @ weight [V, H]^T for labels [B, L]
    (unshifted, as the model takes them; -100 is ignored): the sum over next-token positions
    divided by num_items_in_batch when given, else their mean. Gradients reach hidden, and
    weight when it requires them. Under autocast the products run in its dtype."""
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2] or weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"linear_cross_entropy: expected hidden [B, L, H], weight [V, H] and labels [B, L]; got "
                         f"hidden {list(hidden.shape)}, weight {list(weight.shape)}, labels {list(labels.shape)}")
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden.dtype:
        raise ValueError(f"linear_cross_entropy: hidden is {hidden.dtype}, weight {weight.dtype}")
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    with torch.autocast(device, enabled=False):
        total = _SummedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, shifted.reshape(-1))
    if num_items_in_batch is None:
        return total / (shifted != IGNORE_INDEX).sum()
    return total / num_items_in_batch
