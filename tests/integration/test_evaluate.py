"""Perplexity with the Wanda convention, against a token-by-token computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from blocksparse.integration.evaluate import count_windows, perplexity


def reference_nll(model, tokens, seqlen, windows):
    """Window by window, token by token: -log p(t_i | t_<i) summed."""
    total = 0.0
    with torch.no_grad():
        for w in range(windows):
            window = tokens[w * seqlen:(w + 1) * seqlen]
            logprobs = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            total -= sum(logprobs[i - 1, window[i]].item() for i in range(1, seqlen))
    return total


def test_count_windows_drops_the_tail():
    assert count_windows(100, 32) == 3
    assert count_windows(96, 32) == 3
    assert count_windows(100, 32, max_windows=2) == 2
    assert count_windows(100, 32, max_windows=10) == 3
    with pytest.raises(ValueError, match="text has 31 tokens, fewer than one window of seqlen 32"):
        count_windows(31, 32)
    with pytest.raises(ValueError, match="seqlen must be >= 2"):
        count_windows(100, 1)


def test_perplexity_matches_hand_computation(tiny_llama):
    tokens = torch.randint(0, 256, (1, 3 * 24 + 10))
    result = perplexity(tiny_llama, tokens, seqlen=24, progress=False)
    assert (result["windows"], result["tokens"]) == (3, 3 * 23)
    expected = reference_nll(tiny_llama, tokens[0], 24, 3)
    assert result["nll"] == pytest.approx(expected, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(expected / 69), rel=1e-5)
    # The tail (10 tokens) is dropped: changing it changes nothing.
    tokens[0, -10:] = (tokens[0, -10:] + 1) % 256
    assert perplexity(tiny_llama, tokens, seqlen=24, progress=False) == result


def test_perplexity_batching_and_max_windows(tiny_llama):
    tokens = torch.randint(0, 256, (5 * 16,))
    one = perplexity(tiny_llama, tokens, seqlen=16, progress=False)
    batched = perplexity(tiny_llama, tokens, seqlen=16, batch_size=2, progress=False)
    assert batched["windows"] == 5 and batched["nll"] == pytest.approx(one["nll"], rel=1e-5)
    first_two = perplexity(tiny_llama, tokens, seqlen=16, max_windows=2, progress=False)
    assert (first_two["windows"], first_two["tokens"]) == (2, 30)
    assert first_two["nll"] == pytest.approx(reference_nll(tiny_llama, tokens, 16, 2), rel=1e-5)


def test_uniform_model_has_perplexity_vocab_size(tiny_llama):
    with torch.no_grad():
        tiny_llama.lm_head.weight.zero_()
    result = perplexity(tiny_llama, torch.randint(0, 256, (1, 64)), seqlen=32, progress=False)
    assert result["ppl"] == pytest.approx(256, rel=1e-6)


def test_perplexity_restores_training_mode_and_validates(tiny_llama):
    tiny_llama.train()
    perplexity(tiny_llama, torch.randint(0, 256, (40,)), seqlen=20, progress=False)
    assert tiny_llama.training
    with pytest.raises(ValueError, match=r"LongTensor \[1, T\] or \[T\], got torch.float32 \[2, 8\]"):
        perplexity(tiny_llama, torch.zeros(2, 8), seqlen=4, progress=False)
    with pytest.raises(ValueError, match="text has 10 tokens, fewer than one window of seqlen 20"):
        perplexity(tiny_llama, torch.randint(0, 256, (10,)), seqlen=20, progress=False)
