"""Triton kernels of blocksparse (CUDA, or the CPU under TRITON_INTERPRET=1).

`block_sparse_linear_triton` is what `blocksparse.block_sparse_linear(...,
backend="triton")` calls; `compile_specs` lists every kernel and config for
ahead-of-time compilation (benchmarks/compile_report.py).
"""

from .block_sparse_linear import (
    TRITON_BLOCK_SIZES,
    block_sparse_linear_triton,
    choose_group_size,
    compile_specs,
    get_schedule,
    lora_dropout_keep_mask,
    new_dropout_seed,
)

__all__ = [
    "TRITON_BLOCK_SIZES",
    "block_sparse_linear_triton",
    "choose_group_size",
    "compile_specs",
    "get_schedule",
    "lora_dropout_keep_mask",
    "new_dropout_seed",
]
