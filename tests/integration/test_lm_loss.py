import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

import blocksparse.integration.lm_loss as lm_loss
from blocksparse.integration.lm_loss import IGNORE_INDEX, linear_cross_entropy


def operands(dtype=torch.float64, batch=2, length=9, hidden=16, vocab=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, hidden, generator=gen, dtype=dtype).requires_grad_()
    w = torch.randn(vocab, hidden, generator=gen, dtype=dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[0, 3] = labels[1, :4] = IGNORE_INDEX
    return h, w, labels


@pytest.mark.parametrize("chunk_rows", [None, 1, 5])
@pytest.mark.parametrize("num_items", [None, 11])
def test_loss_and_gradients_equal_hugging_faces_on_the_logits(monkeypatch, chunk_rows, num_items):
    h, w, labels = operands()
    if chunk_rows is not None:  # the 18 positions in chunks of chunk_rows
        monkeypatch.setattr(lm_loss, "CHUNK_BYTES", 4 * w.shape[0] * chunk_rows)
    # fp64 logits (Hugging Face's loss takes .float(), which would round them to fp32).
    logits = h @ w.T
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    reference = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), reduction="sum")
    reference = reference / (num_items if num_items is not None else (shifted != IGNORE_INDEX).sum())
    hf = ForCausalLMLoss(logits, labels, w.shape[0], num_items_in_batch=num_items)
    torch.testing.assert_close(hf.double(), reference, rtol=1e-6, atol=0)  # the reference is theirs
    ours = linear_cross_entropy(h, w, labels, num_items)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=0)
    grads = torch.autograd.grad(3.0 * reference, (h, w))
    for got, want in zip(torch.autograd.grad(3.0 * ours, (h, w)), grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_a_frozen_weight_gets_no_gradient_and_ignored_positions_none():
    h, w, labels = operands()
    w.requires_grad_(False)
    labels[:, 1:] = IGNORE_INDEX  # only position 0 predicts a label (labels[:, 1])
    labels[:, 1] = 7
    loss = linear_cross_entropy(h, w, labels)
    (grad,) = torch.autograd.grad(loss, (h,))
    assert w.grad is None
    assert grad[:, 1:].abs().sum() == 0 and grad[:, 0].abs().sum() > 0


def test_under_autocast_it_is_the_bf16_head_and_the_fp32_loss():
    h, w, labels = operands(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(h, w)  # what the model's head computes under autocast
        reference = ForCausalLMLoss(logits, labels, w.shape[0])
        ours = linear_cross_entropy(h, w, labels)
    assert logits.dtype == torch.bfloat16 and ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)  # the same bf16 logits, in fp32
    for got, want in zip(torch.autograd.grad(ours, (h, w)), torch.autograd.grad(reference, (h, w))):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-3)  # bf16 products, rounded in another order


def test_bad_shapes_and_dtypes_are_refused():
    h, w, labels = operands()
    with pytest.raises(ValueError, match=r"expected hidden \[B, L, H\].*labels \[2, 8\]"):
        linear_cross_entropy(h, w, labels[:, :8])
    with pytest.raises(ValueError, match="hidden is torch.float64, weight torch.float32"):
        linear_cross_entropy(h, w.float(), labels)
