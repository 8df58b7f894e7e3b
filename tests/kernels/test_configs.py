"""Launch configs (kernels/configs.py): plain Python, checked without Triton or a GPU."""

import pytest

from blocksparse.kernels.configs import SMEM_BYTES, WIDE_TILE_BM, matmul_candidates, matmul_config


@pytest.mark.parametrize("block_size,group_size", [(16, 8), (32, 4), (64, 2)])
def test_a_128_wide_group_tile_takes_64_token_rows_before_hopper(block_size, group_size):
    # sm_80 compiled the 128x128 tile to ~195 registers at 8 warps: one CTA per SM.
    a100 = matmul_config(2048, block_size, group_size, 2, smem_bytes=SMEM_BYTES[80], arch=80)
    h100 = matmul_config(2048, block_size, group_size, 2, smem_bytes=SMEM_BYTES[90], arch=90)
    assert (a100.constexprs["BM"], a100.num_warps) == (64, 4)
    assert (h100.constexprs["BM"], h100.num_warps) == (128, 8)
    narrow = matmul_config(2048, 16, 4, 2, smem_bytes=SMEM_BYTES[80], arch=80)
    assert narrow.constexprs["BM"] == 128



def wide_offered(m, block_size=16, group_size=8, element_size=2, arch=90):
    smem = SMEM_BYTES.get(arch, SMEM_BYTES[90])
    cfg = matmul_config(m, block_size, group_size, element_size, smem_bytes=smem, arch=arch)
    return [(c.constexprs["BM"], c.num_warps, c.num_stages) for c, _ in
            matmul_candidates(cfg, 1, 64.0, element_size, smem, m=m, arch=arch)
            if c.constexprs["BM"] == WIDE_TILE_BM]


def test_the_wide_tile_is_an_sm90_16_bit_prefill_candidate():
    # 256 x 128 at 8 warps; 48 KiB per stage leaves room for three buffers (5 stages).
    assert wide_offered(2048) == [(WIDE_TILE_BM, 8, 5)]
    assert wide_offered(513)
    assert not wide_offered(600, 32, 4) and not wide_offered(600, 64, 2)  # b=16, G=8 is what the report compiles
    assert not wide_offered(512)                       # an autotune key's M rounds up to 512
    assert not wide_offered(2048, element_size=4)      # fp32's FMA dot: twice the registers
    assert not wide_offered(2048, arch=80)             # mma.sync: 128 rows already take one CTA
    assert not wide_offered(2048, arch=100)            # tuned for Hopper's wgmma only
    assert not wide_offered(2048, group_size=4)        # a 64-wide group tile


def test_a_64_row_16_bit_tile_is_one_warpgroup_on_sm90():
    # 8 warps would split the tile's N between two warpgroups: two m64n64 wgmma at G=8.
    smem = SMEM_BYTES[90]
    dropout_dx = matmul_config(2048, 16, 8, 2, dropout_epilogue=True, smem_bytes=smem, arch=90)
    assert (dropout_dx.constexprs["BM"], dropout_dx.num_warps) == (64, 4)
    assert matmul_config(2048, 16, 8, 2, dropout_epilogue=True, smem_bytes=SMEM_BYTES[80], arch=80).num_warps == 8
    assert matmul_config(2048, 16, 8, 4, dropout_epilogue=True, smem_bytes=smem, arch=90).num_warps == 8  # fp32: FMA
    short = matmul_config(96, 16, 8, 2, smem_bytes=smem, arch=90)
    candidates = matmul_candidates(short, 1, 64.0, 2, smem, m=96, arch=90)
    assert short.constexprs["BM"] == 64 and [(c.constexprs["BM"], c.num_warps) for c, _ in candidates] == [(64, 4)]
    wide_m = matmul_config(2048, 16, 8, 2, smem_bytes=smem, arch=90)
    candidates = matmul_candidates(wide_m, 1, 64.0, 2, smem, m=2048, arch=90)
    shapes = [(c.constexprs["BM"], c.num_warps) for c, _ in candidates]
    assert shapes == [(64, 4), (128, 4), (128, 8), (WIDE_TILE_BM, 8)]
