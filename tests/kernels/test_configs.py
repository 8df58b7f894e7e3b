"""Launch configs (kernels/configs.py): plain Python, checked without Triton or a GPU."""

import pytest

from blocksparse.kernels.configs import SMEM_BYTES, matmul_config


@pytest.mark.parametrize("block_size,group_size", [(16, 8), (32, 4), (64, 2)])
def test_a_128_wide_group_tile_takes_64_token_rows_before_hopper(block_size, group_size):
    # sm_80 compiled the 128x128 tile to ~195 registers at 8 warps: one CTA per SM.
    a100 = matmul_config(2048, block_size, group_size, 2, smem_bytes=SMEM_BYTES[80], arch=80)
    h100 = matmul_config(2048, block_size, group_size, 2, smem_bytes=SMEM_BYTES[90], arch=90)
    assert (a100.constexprs["BM"], a100.num_warps) == (64, 4)
    assert (h100.constexprs["BM"], h100.num_warps) == (128, 8)
    narrow = matmul_config(2048, 16, 4, 2, smem_bytes=SMEM_BYTES[80], arch=80)
    assert narrow.constexprs["BM"] == 128

