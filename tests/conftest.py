"""Shared fixtures: fixed seeds, the tiny model, its saved directory, and the tiny texts."""

import pytest
import torch

from helpers import byte_tokenizer, make_tiny_llama

CORPUS_WORDS = ("the river city trade market bridge north south people history music school "
                "garden winter summer station library museum harbor valley").split()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_dir(tmp_path):
    """The tiny Llama (seed 0, = `tiny_llama`) and the byte tokenizer saved as a model directory."""
    path = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    """A short eval text: 360 bytes = 360 tokens of the byte tokenizer."""
    path = tmp_path / "eval.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 8, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    """A longer word corpus (~30 kB) for calibration, training and evaluation."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    n = len(CORPUS_WORDS)
    path.write_text(" ".join(CORPUS_WORDS[(i * 7 + i // 3) % n] for i in range(4000)), encoding="utf-8")
    return path
