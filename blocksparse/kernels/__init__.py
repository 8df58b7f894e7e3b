"""Triton kernels of blocksparse (CUDA, or the CPU under TRITON_INTERPRET=1).

    block_sparse_linear.py  the kernels, their launchers and torch.library ops
    schedule.py             host-side look-up tables per weight and row group G
    configs.py              tile configs, one function per kernel and regime
    aot.py                  ahead-of-time compile report (sm_80 / sm_90, no GPU)
    roofline.py             the performance model, from the kernels' own configs

Only block_sparse_linear.py imports Triton; its names load on first use, so the
schedules, configs and the roofline work where Triton is not installed.
"""

from .configs import TRITON_BLOCK_SIZES
from .schedule import choose_group_size, get_schedule

_TRITON_NAMES = ("block_sparse_linear_triton", "new_dropout_seed", "philox_keep_mask")

__all__ = ["TRITON_BLOCK_SIZES", "choose_group_size", "get_schedule", *_TRITON_NAMES]


def __getattr__(name: str):
    if name in _TRITON_NAMES:
        from . import block_sparse_linear

        return getattr(block_sparse_linear, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
