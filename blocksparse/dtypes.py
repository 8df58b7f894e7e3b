"""Dtype names, in one place: long names (CLIs, checkpoints) and short ones (benchmarks, Triton)."""

from __future__ import annotations

import torch

# name -> dtype; the long names are what `--dtype` flags and checkpoints spell.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_ALIASES = {**DTYPES, **{short: dtype for dtype, short in SHORT_NAMES.items()},
            "float": torch.float32, "half": torch.float16}


def to_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a long or short name ("bfloat16", "bf16") or of a dtype."""
    if isinstance(name, torch.dtype):
        if name not in SHORT_NAMES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name}")
        return name
    if name not in _ALIASES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} (or {sorted(SHORT_NAMES.values())}), "
                         f"got {name!r}")
    return _ALIASES[name]


def long_name(dtype: str | torch.dtype) -> str:
    return str(to_dtype(dtype)).removeprefix("torch.")


def short_name(dtype: str | torch.dtype) -> str:
    return SHORT_NAMES[to_dtype(dtype)]


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether `device` computes bf16 natively (an NVIDIA GPU from Ampere on, a ROCm GPU with
    bf16; a CPU with AVX512-BF16 or AMX), so bf16 autocast trains faster than fp32 there.
    Asks the device when called, never at import."""
    device = torch.device(device)
    if device.type == "cuda":  # emulated bf16 (NVIDIA before Ampere) trains slower than fp32
        if not torch.cuda.is_available():
            return False
        if torch.version.hip:
            return torch.cuda.is_bf16_supported()
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":  # private probes (torch >= 2.5 names, then the older ones)
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_cpu_support_avx512bf16",
                  "_is_cpu_support_amx_tile")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False
