"""Launch configs of the Triton kernels: constants and one function per kernel and regime.

Plain Python (no Triton import), so the roofline model and the ahead-of-time
compile report use the very tiles the launchers pick, on machines without
Triton or a GPU. Nothing here queries a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TRITON_BLOCK_SIZES = (16, 32, 64)
# Up to this many tokens the decode schedule runs (memory-bound on W).
DECODE_MAX_M = 64
GROUP_SIZES = (1, 2, 4, 8)
# Relative MMA efficiency of a [BM, BN] tile vs BN=128, a rough model used only
# to choose G: cost(G) ~ union_density(G) / efficiency(b * G).
TILE_EFFICIENCY = {16: 0.45, 32: 0.7, 64: 0.9, 128: 1.0}
NUM_SMS = {80: 108, 90: 132}  # A100, H100 / H200
# Used when no GPU can be asked (the interpreter): an H100's SMs and compute capability.
DEFAULT_ARCH = 90
DEFAULT_NUM_SMS = NUM_SMS[DEFAULT_ARCH]


def next_pow2(value: int) -> int:
    """The smallest power of two >= value (1 for value <= 1)."""
    return 1 << max(0, int(value) - 1).bit_length()


SMEM_BYTES = {80: 166912, 90: 232448}  # opt-in shared memory per block (A100, H100/H200)


@dataclass(frozen=True)
class KernelConfig:
    """A launch config: regime name, the kernel's tile constexprs, warps and stages."""

    regime: str
    constexprs: dict
    num_warps: int
    num_stages: int


def pow2_at_most(value: int, cap: int) -> int:
    value = max(1, min(int(value), cap))
    return 1 << (value.bit_length() - 1)


def fit_stages(stage_bytes: int, smem_bytes: int, wanted: int) -> int:
    """The most pipeline stages (<= wanted, >= 3) whose tile buffers fit shared memory.

    The LUT loads feeding the tile addresses take one stage of the software
    pipeline, so `stages` holds stages - 2 buffers of the X and W tiles
    (Triton 3.9's TTGIR for this kernel; 5 stages = triple buffering).
    """
    for stages in range(wanted, 3, -1):
        if (stages - 2) * stage_bytes <= smem_bytes:
            return stages
    return 3


def one_warpgroup_tile(bm: int, element_size: int, arch: int) -> bool:
    """On sm_90 a 64-row 16-bit tile runs 4 warps: one warpgroup's wgmma spans its 64 rows, and
    8 warps would split the tile's N between two warpgroups (narrower wgmma)."""
    return arch == 90 and bm == 64 and element_size == 2


def matmul_config(m: int, block_size: int, group_size: int, element_size: int, *,
                  dropout_epilogue: bool = False, smem_bytes: int = SMEM_BYTES[80],
                  arch: int = DEFAULT_ARCH) -> KernelConfig:
    """Tile config of `_bsl_matmul_kernel` for M tokens (the regime follows from M) on compute
    capability `arch` (80 for 8.0, 90 for 9.0).

    `dropout_epilogue`: the backward's LoRA dropout (the stored keep bits applied
    to the LoRA term) takes 8 warps from a 128x64 tile on, and BM=64 above it, to
    keep two CTAs per SM (sm_90 compile report: G=8 at BM=128 took 143 registers
    at 8 warps, one CTA, and spilled at 4).
    On sm_90 a 64-row tile of 16-bit inputs takes 4 warps: one warpgroup's wgmma spans its 64
    rows, and 8 warps split the tile's N between two warpgroups (G=8: two m64n64
    wgmma instead of one m64n128; the dropout dX above: 141 registers at 4 warps,
    two CTAs per SM).
    Before Hopper (mma.sync, no wgmma) a 128-wide group tile takes BM=64: the
    128x128 tile compiled to 191-197 registers at 8 warps on sm_80, one CTA per
    SM; 64x128 at 4 warps is 168 and three.
    """
    bs = block_size
    if m <= DECODE_MAX_M:
        # Memory-bound: 256-deep K steps keep ~16 KB of W in flight per program
        # (two buffers), >= 32 KB per SM with the >= 2 programs per SM that
        # split_k_for ensures, about what HBM latency x bandwidth needs per SM.
        # From BM=64 on, the X slab would crowd shared memory: 128-deep steps.
        bm = max(16, next_pow2(m))
        regime, bk, warps, wanted_stages = "decode", 256 if bm <= 32 else 128, 4, 5
    else:
        regime, bm, bk, wanted_stages = "prefill", 128 if m >= 128 else 64, 64, 5
        if (dropout_epilogue or arch < 90) and bm * bs * group_size > 128 * 64:
            bm = 64
        tile = bm * bs * group_size
        # fp32 inputs take the ieee (FMA) dot: twice the registers per element.
        big = 128 * 64 if dropout_epilogue or element_size == 4 else 128 * 128
        warps = 8 if tile >= big and not one_warpgroup_tile(bm, element_size, arch) else 4
    kc = max(1, bk // bs)
    stage_bytes = (bm * kc * bs + kc * bs * bs * group_size) * element_size
    stages = fit_stages(stage_bytes, smem_bytes, wanted_stages)
    return KernelConfig(regime, {"BS": bs, "G": group_size, "KC": kc, "BM": bm}, warps, stages)


def matmul_plan(m: int, block_size: int, group_size: int, element_size: int, groups: int, union_entries: int, *,
                out_dropout: bool, smem_bytes: int, num_sms: int, arch: int = DEFAULT_ARCH,
                split_k: int = 0) -> tuple[KernelConfig, int, float]:
    """(config, split_k, union steps per group) of one `_bsl_matmul_kernel` call: M tokens over
    `groups` row groups whose unions hold `union_entries` (group, block column) pairs in all.
    split_k > 0 forces the split; else decode splits to fill the GPU. The launcher and the
    compile report both plan with this."""
    cfg = matmul_config(m, block_size, group_size, element_size, dropout_epilogue=out_dropout,
                        smem_bytes=smem_bytes, arch=arch)
    union_steps = union_entries / max(groups, 1) / cfg.constexprs["KC"]
    if split_k <= 0:
        split_k = 1
        if cfg.regime == "decode" and groups:
            split_k = split_k_for(-(-m // cfg.constexprs["BM"]), groups, union_steps, num_sms)
    return cfg, split_k, union_steps


def matmul_constexprs(cfg: KernelConfig, *, split_k: int, transposed: bool, has_bias: bool, has_lora: bool,
                      rank_padded: int, out_dropout: bool, precision: str, nonfinite_pass: int) -> dict:
    """Every constexpr of a `_bsl_matmul_kernel` launch (the launcher's and the compile report's)."""
    g = cfg.constexprs["G"]
    return dict(cfg.constexprs, SPLIT_K=split_k, TRANS_W=transposed, DIRECT_W=g == 1 and not transposed,
                HAS_BIAS=has_bias, HAS_LORA=has_lora, RP=rank_padded, LORA_OUT_DROPOUT=out_dropout,
                DOT_PRECISION=precision, NONFINITE_PASS=nonfinite_pass)


def nonfinite_passes(group_size: int) -> tuple[int, ...]:
    """The NONFINITE_PASS values of a call: grouped schedules flag, then repair (0: neither)."""
    return (1, 2) if group_size > 1 else (0,)


def split_k_for(m_tiles: int, groups: int, union_steps: float, num_sms: int) -> int:
    """Split the union so that decode launches >= 2 programs per SM, each with >= 1 step."""
    programs = max(1, m_tiles * groups)
    if programs >= 2 * num_sms:
        return 1
    return pow2_at_most(min(-(-2 * num_sms // programs), math.ceil(union_steps)), 8)


# The wide prefill tile, an autotune candidate on sm_90 for 16-bit inputs over M > 512 at b=16,
# G=8 (the configuration the compile report checks; the autotuner's keys round M up to a power
# of two, so every M of a key is offered it or none is): WIDE_TILE_BM x 128 at 8 warps, two
# warpgroups of 128 x 128 wgmma each. Its fp32 accumulator alone is 128 registers per thread,
# so it runs one CTA per SM; per token it reads the group's W tiles and look-up tables half as
# often as 128 x 128 (`roofline --tiles`).
WIDE_TILE_BM = 256
WIDE_TILE_MIN_M = 513


def matmul_candidates(cfg: KernelConfig, split_k: int, union_steps: float, element_size: int,
                      smem_bytes: int, *, m: int, arch: int = DEFAULT_ARCH) -> list[tuple[KernelConfig, int]]:
    """What autotuning tries around the heuristic `cfg` for M tokens on compute capability
    `arch`: few, so first calls stay short.

    Decode: the union split and a shallower K step. Prefill: warps and BM, and on sm_90
    the wide tile (WIDE_TILE_BM); there a 64-row 16-bit tile runs 4 warps only (one_warpgroup_tile).
    """
    cx = cfg.constexprs
    bs, g, kc, bm = cx["BS"], cx["G"], cx["KC"], cx["BM"]

    def make(bm: int, kc: int, warps: int) -> KernelConfig:
        stage_bytes = (bm * kc * bs + kc * bs * bs * g) * element_size
        stages = fit_stages(stage_bytes, smem_bytes, cfg.num_stages)
        return KernelConfig(cfg.regime, dict(cx, BM=bm, KC=kc), warps, stages)

    if cfg.regime == "decode":
        splits = sorted({max(1, split_k // 2), split_k, min(8, split_k * 2)})
        splits = [s for s in splits if s == 1 or s <= math.ceil(union_steps)]
        return [(make(bm, k, cfg.num_warps), s) for k in (kc, max(1, kc // 2)) for s in splits]
    shapes = {(bm, w) for w in ((4,) if one_warpgroup_tile(bm, element_size, arch) else (4, 8))}
    if bm == 128:
        shapes.add((64, 4))
        # bm = 128 at b=16, G=8: no dropout epilogue (that takes BM=64).
        if arch == 90 and element_size == 2 and (bs, g) == (16, 8) and m >= WIDE_TILE_MIN_M:
            shapes.add((WIDE_TILE_BM, 8))
    return [(make(b, kc, w), split_k) for b, w in sorted(shapes)]


def shrink_config(m: int, k: int, rank_padded: int, num_sms: int) -> tuple[KernelConfig, int]:
    """(config, number of K splits) of the shrink kernel."""
    # BK=64 throughout: at BM=16, BK=128 the backward shrink (B^T loaded with a
    # strided K axis) spilled on sm_90.
    bm, bk = (16 if m <= 16 else 64), 64
    m_tiles = -(-m // bm)
    splits = pow2_at_most(min(-(-2 * num_sms // m_tiles), -(-k // bk)), 16)
    regime = "lora_shrink"
    return KernelConfig(regime, {"BM": bm, "BK": bk, "RP": rank_padded, "SPLITS": splits}, 4, 3), splits


def grad_a_config(m: int, k: int, rank_padded: int, num_sms: int, element_size: int = 2) -> KernelConfig:
    """Config of the dA kernel: K tiles times M splits, >= 2 programs per SM."""
    bm, bk = 64, 64 if element_size < 4 else 32
    k_tiles = -(-k // bk)
    splits = pow2_at_most(min(-(-2 * num_sms // k_tiles), -(-m // bm)), 16)
    return KernelConfig("lora_grad_a", {"BM": bm, "BK": bk, "RP": rank_padded, "SPLITS": splits}, 4, 3)


def sdd_config(m: int, bs: int) -> KernelConfig:
    """Config of the dW-at-stored-blocks kernel: KB blocks of one row (a [KB*b, b] tile,
    128 rows of it) per program, BM tokens per step."""
    return KernelConfig("sdd", {"KB": max(1, 128 // bs), "BM": 64 if m > 16 else 16}, 4, 3)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to TF32: torch's fp32 matmul does not.
    return "ieee" if dtype == torch.float32 else "tf32"

