"""recipes.recover: the one training entry of the demo and the recovery benchmarks."""

import pytest
import torch

import blocksparse.ops as ops
from blocksparse import sparsify_model
from blocksparse.dtypes import native_bf16
from blocksparse.integration.recipes import recover
from helpers import byte_tokenizer, make_tiny_llama


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_recover_trains_in_the_precision_asked(corpus_file, tmp_path, monkeypatch, precision, dtype):
    model = sparsify_model(make_tiny_llama(), sparsity=0.5, block_size=16)
    seen, linear = set(), ops.linear_torch

    def recording(x2d, *args, **kwargs):
        seen.add(x2d.dtype)
        return linear(x2d, *args, **kwargs)

    monkeypatch.setattr(ops, "linear_torch", recording)
    trained, info = recover(model, byte_tokenizer(), str(corpus_file), tmp_path, "lora16", steps=2,
                            train_seqlen=32, lora_r=4, progress=False, precision=precision)
    assert seen == {dtype}  # every call of the block-sparse op ran in the precision asked
    assert info["precision"] == precision and info["train_tokens"] == 2 * 32
    lora = [p for name, p in trained.named_parameters() if "lora_" in name]
    assert lora and all(p.dtype == torch.float32 for p in lora)  # the adapter and its optimizer stay fp32


def test_recover_rejects_an_unknown_precision(tmp_path):
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16'\), got 'fp16'"):
        recover(make_tiny_llama(), byte_tokenizer(), "unused", tmp_path, "lora16", steps=1, precision="fp16")


def test_native_bf16_asks_the_cpu_probes_and_passes_over_emulated_gpu_bf16(monkeypatch):
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_cpu_support_avx512bf16",
              "_is_cpu_support_amx_tile")
    for found, expected in (((), False), (("_is_amx_tile_supported",), True), (("_is_cpu_support_avx512bf16",), True)):
        for name in probes:
            monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
        monkeypatch.delattr(torch.cpu, probes[0])  # a torch without the newer name
        for name in found:
            monkeypatch.setattr(torch.cpu, name, lambda: True, raising=False)
        assert native_bf16("cpu") is expected
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, expected in (((7, 0), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert native_bf16("cuda") is expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert native_bf16("cuda") is False and native_bf16("meta") is False
