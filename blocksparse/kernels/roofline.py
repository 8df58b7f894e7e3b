"""Roofline model of one linear call: bytes, FLOPs and predicted time, dense vs block-sparse.

    from blocksparse.kernels.roofline import predict
    p = predict("sparse", M=2048, N=4096, K=4096, density=0.5, device="h200")
    p.time_s, p.hbm_bytes, p.flops, p.group_size

Providers (Y = X W^T, X [M, K], W [N, K], LoRA A [r, K], B [N, r]):

- "dense":        cuBLAS GEMM.
- "dense_lora":   cuBLAS, then T = X A^T, then `Y.addmm_(T, B^T)` (unfused: a second pass over Y).
- "sparse":       our block-sparse kernel. Decode (M <= 64) streams the present blocks once;
                  prefill uses the grouped schedule (G block rows per program, BN = 16 G) and
                  executes union_density x dense FLOPs.
- "sparse_lora":  our kernel with fused LoRA: a shrink kernel T = drop(X) A^T, then the
                  main kernel whose accumulator starts at the expand T B^T (one more MMA,
                  rank padded to 16, before its main loop).

`backward=True` adds the backward of a frozen W (LoRA fine-tuning): dX = dY W (the same
kernel over the transposed mask, union density `union_density_bwd`) plus the LoRA
gradients dT = s dY B, dB = s dY^T T, dA = dT^T drop(X) as skinny GEMMs; unfused, dX
gets the LoRA term as a second pass (`dX.addmm_(dT, A)`), fused it is the MMA the accumulator starts from.

Two models (`model=`), side by side in `--compare`:

"ideal" (the first model, kept for comparison). Time of each kernel = max(HBM bytes /
(HBM bandwidth x memory efficiency), L2->SM bytes / L2 bandwidth, FLOPs / (peak x
compute efficiency)) + one launch gap; a call sums its kernels.

- Efficiency factors: on the H200 here cuBLAS bf16 reached ~790 of the 989 TFLOP/s
  datasheet peak (0.80) and a device copy ~4.3 of 4.8 TB/s (0.90), applied to every
  kernel, ours included.
- L2->SM bandwidth 10 TB/s on H100/H200 (6 TB/s A100): back-solved from cuBLAS
  reaching 0.80 of peak with 128x256 tiles, not a measurement. A program of BM x BN
  loads its X slab for every BN columns, so X moves M K (N / BN) x union_density bytes
  from L2 (every re-read counted; L1 gives no reuse across programs).
- HBM traffic: every operand once, provided the smaller of X and W fits in half the
  L2; otherwise the larger is streamed once per L2-sized chunk of the smaller.
- Launch gap 2 us per kernel (back-to-back in one stream, as under CUDA graphs).
- fp32 inputs run on TF32 tensor cores; decode pads tokens to 16 MMA rows.
- Metadata: the schedule's int32 tables (kernels/schedule.py).
- Union densities: the clustered ones of the embedded model's Wanda masks
  (36-96 block columns; `benchmarks/union_density.py`).

"honest" (the default) keeps the bytes and FLOPs and changes what they cost:

- Our kernels run at `triton_efficiency` = 0.62 of peak, cuBLAS at 0.80: Triton code
  of this shape (non-persistent, cp.async, a barrier per pipeline stage) typically
  reaches 0.55-0.65 (an independent reading of the sm_90 code).
- Narrow MMA tiles lose: the main kernel's compute runs at configs.TILE_EFFICIENCY of
  its N = 16 G (0.45 at n16, 0.7 at n32, 0.9 at n64), the factor the schedule already
  chooses G with.
- L2->SM bandwidth from a measurement: 5.5 TB/s on an H100 PCIe (114 SMs; Chips and
  Cheese, "Nvidia's H100: Funny L2, and Tons of Bandwidth", 2023), scaled by SM count
  to 6.4 TB/s for the 132-SM H100 SXM / H200; A100 4.5 TB/s (assumed, not measured).
- Dropout's Philox is ALU work: PHILOX_OPS_PER_ELEMENT integer instructions per
  element (counted in the sm_90 PTX of `_dropout_keep_kernel`) at 64 per clock per SM,
  over M x K once on both paths: our shrink stores the keep bits (M K / 8 bytes, read
  back by dX's LoRA term and dA), PyTorch's dropout kernel writes a bool mask and
  drop(X). The ALU overlaps memory (max).
- cuBLAS keeps its measured 0.80 with no L2 term of its own: that measurement holds
  its L2 traffic (Hopper's cuBLAS multicasts tiles across CTA clusters, which our
  kernels do not; with our L2 accounting and no multicast it would be L2-bound).
- Waves: programs = M tiles x groups over SMs x 2 CTA slots (the compile report's
  floor for compute-bound configs, which every launched config meets), modeled as
  equal programs: groups launch largest union first (kernels/schedule.py), so the
  last wave holds the shortest ones (without that order, the transposed grouped
  masks' largest union, ~1.8x the mean, would stretch the last wave by as much).
  cuBLAS: 128x256 tiles, one per SM.
- Union densities measured on Llama-2-7B-shaped masks (256 / 688 block columns,
  synthetic Wanda-like scores; `blocksparse.bench.llama_union`): "free" masks
  (clustered) and "grouped" masks (G rows sharing their block columns, `prune
  --row-group G`: the forward union is the density; the transposed mask, which dX
  walks, is not grouped).

Both are models, not measurements: no GPU has run these kernels.

`python -m blocksparse.kernels.roofline` prints the Llama-2-7B table; `--compare` the two
models side by side; `--tiles` the honest model's prefill for grouped-kernel tiles larger
than the launched one.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field

from ..dtypes import short_name
from ..format import DEFAULT_BLOCK_SIZE
from .configs import DECODE_MAX_M, GROUP_SIZES, TILE_EFFICIENCY

__all__ = ["Device", "DEVICES", "KernelCost", "MODELS", "MASKS", "Prediction", "PROVIDERS", "predict",
           "default_union_density", "llama2_7b_table", "compare_table", "tile_table"]

PROVIDERS = ("dense", "dense_lora", "sparse", "sparse_lora")
MODELS = ("honest", "ideal")
MASKS = ("free", "grouped")
BLOCK = DEFAULT_BLOCK_SIZE

# Clustered union density (mean over groups of |union of block columns| / C) of the
# embedded model's Wanda 16x16 per-block-row masks, all linears weighted by N*K:
# forward (groups of block rows) and backward (the dX kernel: groups of block columns).
# Keys: density -> {G: union density}. Source: benchmarks/union_density.py.
MEASURED_UNION_DENSITY = {
    0.50: {1: 0.50, 2: 0.559, 4: 0.617, 8: 0.668},
    0.25: {1: 0.25, 2: 0.274, 4: 0.305, 8: 0.338},
}
MEASURED_UNION_DENSITY_BWD = {
    0.50: {1: 0.50, 2: 0.591, 4: 0.679, 8: 0.728},
    0.25: {1: 0.25, 2: 0.305, 4: 0.366, 8: 0.417},
}

# Llama-2-7B-shaped 16x16 masks (`python -m blocksparse.bench.llama_union`, seed 0; the
# three linear shapes weighted by N*K; docs/results/llama_union.md): masks -> density ->
# {G: (union density, union density of the transposed mask)}.
LLAMA_UNION = {
    "free": {
        0.50: {1: (0.5, 0.5), 2: (0.533, 0.543), 4: (0.562, 0.579), 8: (0.586, 0.611)},
        0.25: {1: (0.25, 0.25), 2: (0.276, 0.285), 4: (0.301, 0.319), 8: (0.323, 0.35)},
    },
    "grouped": {
        0.50: {1: (0.5, 0.5), 2: (0.5, 0.532), 4: (0.5, 0.545), 8: (0.5, 0.548)},
        0.25: {1: (0.25, 0.25), 2: (0.25, 0.277), 4: (0.25, 0.287), 8: (0.25, 0.288)},
    },
}
# Integer instructions per element of the dropout keep bits (`_dropout_keep`: one randint4x
# per four neighbours, the uniform conversion and compare), counted in the sm_90 PTX of
# `_dropout_keep_kernel` (BLOCK 1024 / 4096: 45.3 / 47.1).
PHILOX_OPS_PER_ELEMENT = 46
CTA_SLOTS_PER_SM = 2


def llama_union(masks: str, density: float, group_size: int, backward: bool = False) -> float:
    """Union density of Llama-2-7B-shaped masks, interpolated linearly in density between
    the measured points (0 -> 0, 1 -> 1)."""
    table = LLAMA_UNION[masks]
    points = sorted([(0.0, 0.0), (1.0, 1.0)] + [(d, t[group_size][int(backward)]) for d, t in table.items()])
    for (d0, u0), (d1, u1) in zip(points, points[1:]):
        if d0 <= density <= d1:
            return u0 + (u1 - u0) * (density - d0) / (d1 - d0)
    raise ValueError(f"density must lie in [0, 1], got {density}")


@dataclass(frozen=True)
class Device:
    name: str
    peak_tflops: dict          # dtype name -> dense tensor-core TFLOP/s (datasheet, no sparsity)
    hbm_tbps: float            # datasheet HBM bandwidth, TB/s
    l2_mb: float
    l2_tbps: float             # "ideal": L2 -> SM bandwidth back-solved from cuBLAS, TB/s
    l2_measured_tbps: float    # "honest": from a published measurement (module docstring)
    sms: int
    clock_ghz: float           # boost clock
    compute_efficiency: float = 0.80   # cuBLAS
    triton_efficiency: float = 0.62    # our kernels ("honest")
    memory_efficiency: float = 0.90
    launch_us: float = 2.0
    int_ops_per_clock_per_sm: int = 64

    def peak_flops(self, dtype: str) -> float:
        return self.peak_tflops[dtype] * 1e12 * self.compute_efficiency

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_tbps * 1e12 * self.memory_efficiency

    @property
    def int_ops_per_s(self) -> float:
        return self.sms * self.int_ops_per_clock_per_sm * self.clock_ghz * 1e9


DEVICES = {
    "h100": Device("H100 SXM", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}, hbm_tbps=3.35, l2_mb=50, l2_tbps=10.0,
                   l2_measured_tbps=5.5 * 132 / 114, sms=132, clock_ghz=1.98),
    "h200": Device("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}, hbm_tbps=4.8, l2_mb=50, l2_tbps=10.0,
                   l2_measured_tbps=5.5 * 132 / 114, sms=132, clock_ghz=1.98),
    "a100": Device("A100 SXM 80GB", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}, hbm_tbps=2.039, l2_mb=40,
                   l2_tbps=6.0, l2_measured_tbps=4.5, sms=108, clock_ghz=1.41),
}

_ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class KernelCost:
    """One kernel launch: HBM bytes, L2->SM bytes, executed FLOPs, and what the honest model
    adds: whose kernel it is (Triton or cuBLAS), its MMA N, integer ALU work (dropout), and
    the wave factor (>= 1) its compute time is stretched by."""
    name: str
    hbm_bytes: float
    l2_bytes: float
    flops: float
    triton: bool = False
    mma_n: int = 128
    alu_ops: float = 0.0
    waves: float = 1.0
    measured: bool = False     # cuBLAS's GEMM: its measured efficiency already holds its L2 traffic

    def times(self, device: Device, dtype: str, model: str = "honest") -> dict:
        """Seconds per resource: memory, l2, compute (and alu in the honest model)."""
        if model == "ideal":
            return {"memory": self.hbm_bytes / device.hbm_bytes_per_s,
                    "l2": self.l2_bytes / (device.l2_tbps * 1e12),
                    "compute": self.flops / device.peak_flops(dtype)}
        eff = (device.triton_efficiency / device.compute_efficiency if self.triton else 1.0)
        eff *= TILE_EFFICIENCY.get(min(self.mma_n, 128), 1.0)
        alu = self.alu_ops / device.int_ops_per_s
        compute = self.flops / (device.peak_flops(dtype) * eff) * self.waves
        times = {"memory": self.hbm_bytes / device.hbm_bytes_per_s,
                 "compute": compute}
        if not self.measured:
            times["l2"] = self.l2_bytes / (device.l2_measured_tbps * 1e12)
        if alu:
            times["alu"] = alu
        return times

    def time_s(self, device: Device, dtype: str, model: str = "honest") -> float:
        return self.launch_free_time_s(device, dtype, model) + device.launch_us * 1e-6

    def launch_free_time_s(self, device: Device, dtype: str, model: str = "honest") -> float:
        return max(self.times(device, dtype, model).values())

    def bound(self, device: Device, dtype: str, model: str = "honest") -> str:
        times = self.times(device, dtype, model)
        return max(times, key=times.get)


@dataclass(frozen=True)
class Prediction:
    provider: str
    device: str
    dtype: str
    time_s: float
    hbm_bytes: float
    l2_bytes: float
    flops: float              # executed FLOPs (padding and union waste included)
    useful_flops: float       # 2 M N K density (+ LoRA)
    group_size: int | None    # grouped schedule G of the sparse forward, None for dense/decode
    union_density: float | None
    kernels: tuple = field(default=(), repr=False)
    bound: str = ""           # what limits the longest kernel: memory | l2 | compute

    @property
    def bytes(self) -> float:
        return self.hbm_bytes

    def speedup_over(self, other: "Prediction") -> float:
        return other.time_s / self.time_s


def _dtype_name(dtype) -> str:
    return short_name(dtype)


def default_union_density(density: float, group_size: int, backward: bool = False) -> float:
    """Clustered union density for `group_size` at `density` (of the transposed mask if
    `backward`), interpolated linearly between the measured densities (0 -> 0, 1 -> 1)."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES} for the measured union densities, got {group_size}")
    measured = MEASURED_UNION_DENSITY_BWD if backward else MEASURED_UNION_DENSITY
    points = sorted([(0.0, 0.0), (1.0, 1.0)] + [(d, t[group_size]) for d, t in measured.items()])
    for (d0, u0), (d1, u1) in zip(points, points[1:]):
        if d0 <= density <= d1:
            return u0 + (u1 - u0) * (density - d0) / (d1 - d0)
    raise ValueError(f"density must lie in [0, 1], got {density}")


def _hbm(x_bytes: float, w_bytes: float, other_bytes: float, device: Device) -> float:
    """Compulsory traffic plus re-streaming when neither X nor W fits in half the L2."""
    small, large = sorted((x_bytes, w_bytes))
    chunks = max(1, math.ceil(small / (device.l2_mb * 1e6 / 2)))
    return small + large * chunks + other_bytes


def _wave_factor(programs: int, slots: int) -> float:
    """How much longer than perfectly balanced work `programs` equal programs take on
    `slots` concurrent CTAs (the last wave runs part full)."""
    if programs <= 0:
        return 1.0
    return math.ceil(programs / slots) * slots / programs


def _dense_gemm(name: str, M: int, N: int, K: int, e: int, device: Device) -> KernelCost:
    """cuBLAS: 128 x 256 tiles for prefill, one CTA per SM; for M <= 64 one M tile and
    128-wide N tiles."""
    bm, bn = (128, 256) if M > DECODE_MAX_M else (max(M, 1), 128)
    m_tiles = math.ceil(M / bm)
    x, w, y = M * K * e, N * K * e, M * N * e
    l2 = x * math.ceil(N / bn) + w * m_tiles + y
    waves = _wave_factor(m_tiles * math.ceil(N / bn), device.sms) if M > DECODE_MAX_M else 1.0
    return KernelCost(name, _hbm(x, w, y, device), l2, 2.0 * M * N * K, mma_n=bn, waves=waves, measured=True)


def _skinny(name: str, rows: int, cols: int, inner: int, e: int, extra_bytes: float = 0.0, *,
            triton: bool = False, alu_ops: float = 0.0) -> KernelCost:
    """A GEMM with one tiny dimension (LoRA rank): every operand moves once."""
    moved = (rows * inner + inner * cols + rows * cols) * e + extra_bytes
    return KernelCost(name, moved, moved, 2.0 * rows * cols * inner, triton=triton, alu_ops=alu_ops)


def _sparse_kernel(name: str, M: int, N: int, K: int, e: int, density: float, union: float, group_size: int,
                   rank_pad: int, device: Device, block_m: int, extra_bytes: float = 0.0,
                   cta_slots: int = CTA_SLOTS_PER_SM) -> KernelCost:
    """Our kernel computing M x N outputs over K with `density` of the blocks present.

    Decode (M <= 64): every present block once, the X slab of each block re-read per
    block row from L2 (the M real token rows: padding rows are masked loads). Grouped
    (M > 64): programs of block_m x 16G walk the union.
    rank_pad > 0 adds the fused LoRA expand (T [M, rank_pad] and B [N, rank_pad], input dtype).
    extra_bytes: the dX LoRA term's dropout keep bits.
    """
    nnz = density * (N // BLOCK) * (K // BLOCK)
    w = nnz * BLOCK * BLOCK * e
    x, y = M * K * e, M * N * e
    lora = (M + N) * rank_pad * e + extra_bytes
    if M <= DECODE_MAX_M:
        m_pad = math.ceil(M / BLOCK) * BLOCK
        meta = nnz * 4 + (N // BLOCK + 1) * 4
        # The X slab is re-read per block row; the MMA's padding rows are masked loads (no traffic).
        l2 = w + meta + (N // BLOCK) * (density * K + rank_pad) * e * M + y + N * rank_pad * e + extra_bytes
        flops = 2.0 * m_pad * N * K * density + 2.0 * m_pad * N * rank_pad
        return KernelCost(name, _hbm(x, w, y + meta + lora, device), l2, flops, triton=True, mma_n=BLOCK)
    bn = BLOCK * group_size
    groups = math.ceil(N / bn)
    m_tiles = math.ceil(M / block_m)
    m_pad = m_tiles * block_m
    meta = groups * union * (K // BLOCK) * 4 * (1 + group_size)  # union_col + union_block[U, G], int32
    l2 = (m_pad * union * K * e * groups                 # X slab per union column, per group
          + m_tiles * (w + meta)                           # present blocks per M tile
          + y + m_tiles * N * rank_pad * e + m_pad * rank_pad * e * groups + extra_bytes)
    flops = 2.0 * m_pad * N * K * union + 2.0 * m_pad * N * rank_pad
    waves = _wave_factor(m_tiles * groups, device.sms * cta_slots)
    return KernelCost(name, _hbm(x, w, y + meta + lora, device), l2, flops, triton=True, mma_n=bn, waves=waves)


def predict(provider: str, M: int, N: int, K: int, *, density: float = 1.0, union_density: float | None = None,
            union_density_bwd: float | None = None, group_size: int | None = None, dtype="bf16",
            lora_rank: int = 0, dropout: bool = False, device: str = "h200", backward: bool = False,
            block_m: int = 128, model: str = "honest", masks: str = "grouped",
            cta_slots: int = CTA_SLOTS_PER_SM) -> Prediction:
    """Predicted bytes, FLOPs and time of one call of `provider` (see the module docstring).

    density: fraction of 16x16 blocks present (sparse providers). union_density: the
    grouped forward's union density for `group_size`; if omitted, the measured one of
    `masks` ("free" | "grouped", Llama-2-7B-shaped) in the honest model, of the embedded
    model's free masks in the ideal one. group_size=None picks the fastest G in
    (1, 2, 4, 8) (what the autotuner would do). union_density_bwd: the same for the
    transposed mask (dX kernel), by default measured like union_density when that was
    omitted, else union_density. dropout: LoRA dropout on (its Philox and, unfused, its
    kernels). backward=True: forward + backward with W frozen. block_m, cta_slots: the
    grouped kernel's token tile and CTAs per SM (the launched configs: 128 and 2).
    """
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {tuple(DEVICES)}, got {device!r}")
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if masks not in MASKS:
        raise ValueError(f"masks must be one of {MASKS}, got {masks!r}")
    for dim_name, dim in (("M", M), ("N", N), ("K", K)):
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{dim_name} must be a positive int, got {dim!r}")
    if N % BLOCK or K % BLOCK:
        raise ValueError(f"N and K must divide by the block size {BLOCK}, got N={N}, K={K}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must lie in (0, 1], got {density}")
    if provider.endswith("_lora") and lora_rank < 1:
        raise ValueError(f"provider {provider!r} needs lora_rank >= 1, got {lora_rank}")
    if not provider.endswith("_lora"):
        lora_rank, dropout = 0, False
    if union_density is not None and group_size is None:
        raise ValueError("union_density is the union density of one group size: pass group_size too")
    dtype = _dtype_name(dtype)
    dev = DEVICES[device]
    e = _ELEMENT_BYTES[dtype]
    r = lora_rank
    options = dict(dtype=dtype, lora_rank=lora_rank, dropout=dropout, device=device, backward=backward,
                   block_m=block_m, model=model, masks=masks, cta_slots=cta_slots)

    if provider.startswith("sparse") and M > DECODE_MAX_M and group_size is None:
        candidates = [predict(provider, M, N, K, density=density, group_size=g,
                              union_density_bwd=union_density_bwd, **options) for g in GROUP_SIZES]
        return min(candidates, key=lambda p: p.time_s)

    philox = M * K * PHILOX_OPS_PER_ELEMENT if dropout else 0.0  # one pass of keep bits over X [M, K]
    keep_bits = M * K / 8 if dropout else 0.0                       # our stored keep mask, packed
    kernels: list[KernelCost] = []
    gemm = 2.0 * M * N * K * (density if provider.startswith("sparse") else 1.0)
    useful = gemm + 2.0 * M * r * (N + K) + (gemm + 4.0 * M * r * (N + K) if backward else 0.0)
    union = None
    if provider.startswith("dense"):
        kernels.append(_dense_gemm("Y = X W^T", M, N, K, e, dev))
        if r:
            if dropout:  # PyTorch's dropout: reads X, writes drop(X) and the bool mask
                kernels.append(KernelCost("drop(X)", M * K * (2 * e + 1), M * K * (2 * e + 1), 0.0,
                                          alu_ops=philox))
            kernels.append(_skinny("T = drop(X) A^T" if dropout else "T = X A^T", M, r, K, e))
            kernels.append(_skinny("Y += T B^T", M, N, r, e, extra_bytes=M * N * e))
        if backward:
            kernels.append(_dense_gemm("dX = dY W", M, K, N, e, dev))
    else:
        g = 1 if M <= DECODE_MAX_M else group_size
        if g not in GROUP_SIZES and union_density is None:
            raise ValueError(f"group_size must be one of {GROUP_SIZES} without union_density, got {group_size}")

        def measured(backward_mask: bool) -> float:
            if g == 1:
                return density
            if model == "ideal":
                return default_union_density(density, g, backward_mask)
            return llama_union(masks, density, g, backward_mask)

        union = union_density if union_density is not None else measured(False)
        if not density - 1e-9 <= union <= 1.0:
            raise ValueError(f"union_density must lie in [density, 1] = [{density}, 1], got {union}")
        rank_pad = math.ceil(r / BLOCK) * BLOCK
        if r:
            kernels.append(_skinny("T = drop(X) A^T", M, r, K, e, keep_bits, triton=True, alu_ops=philox))
        kernels.append(_sparse_kernel("Y = X W^T (+T B^T)", M, N, K, e, density, union, g, rank_pad, dev, block_m,
                                      cta_slots=cta_slots))
        if backward:
            if union_density_bwd is not None:
                union_bwd = union_density_bwd
            elif union_density is not None:
                union_bwd = union_density
            else:
                union_bwd = measured(True)
            kernels.append(_sparse_kernel("dX = dY W (+dT A)", M, K, N, e, density, union_bwd, g, rank_pad,
                                          dev, block_m, keep_bits, cta_slots))
    if backward and r:
        ours = provider == "sparse_lora"
        kernels.append(_skinny("dT = s dY B", M, r, N, e, triton=ours))
        kernels.append(_skinny("dB = s dY^T T", N, r, M, e))
        kernels.append(_skinny("dA = dT^T drop(X)", r, K, M, e, keep_bits if ours else 0.0,
                               triton=ours and dropout))
        if provider == "dense_lora":
            kernels.append(_skinny("dX += dT A", M, K, r, e, extra_bytes=M * K * e))
            if dropout:  # the mask applied to dT A before it joins dX
                kernels.append(KernelCost("dropout backward", M * K * (2 * e + 1), M * K * (2 * e + 1), 0.0))

    longest = max(kernels, key=lambda k: k.launch_free_time_s(dev, dtype, model))
    return Prediction(
        provider=provider, device=dev.name, dtype=dtype,
        time_s=sum(k.time_s(dev, dtype, model) for k in kernels),
        hbm_bytes=sum(k.hbm_bytes for k in kernels), l2_bytes=sum(k.l2_bytes for k in kernels),
        flops=sum(k.flops for k in kernels), useful_flops=useful,
        group_size=(group_size if provider.startswith("sparse") and M > DECODE_MAX_M else None),
        union_density=union, kernels=tuple(kernels), bound=longest.bound(dev, dtype, model))


LLAMA2_7B_SHAPES = (("q/k/v/o", 4096, 4096), ("gate/up", 11008, 4096), ("down", 4096, 11008))
REGIMES = (("decode M=1", 1, False), ("decode M=16", 16, False), ("prefill M=2048", 2048, False),
           ("fwd+bwd M=2048", 2048, True))


def llama2_7b_table(device: str = "h200", sparsities=(0.5, 0.75), lora_rank: int = 8, dtype="bf16",
                    model: str = "honest", masks: str = "grouped") -> str:
    """Markdown table of predicted times for the Llama-2-7B linears, dense beside sparse."""
    dev = DEVICES[device]
    kw = dict(dtype=dtype, device=device, model=model, masks=masks)
    ours = dev.triton_efficiency if model == "honest" else dev.compute_efficiency
    lines = [f"### {dev.name}, {_dtype_name(dtype)}, LoRA rank {lora_rank}, {model} model"
             + (f", {masks} masks" if model == "honest" else "")
             + f" (compute efficiency cuBLAS {dev.compute_efficiency:.2f} / ours {ours:.2f}, "
             f"HBM {dev.memory_efficiency:.2f}, launch {dev.launch_us:g} us)", "",
             "| shape N x K | regime | sparsity | G | union | dense us | sparse us | speedup | bound "
             "| dense+LoRA us | sparse+LoRA us | speedup | fused LoRA overhead |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, n, k in LLAMA2_7B_SHAPES:
        for regime, m, backward in REGIMES:
            dense = predict("dense", m, n, k, backward=backward, **kw)
            dense_lora = predict("dense_lora", m, n, k, lora_rank=lora_rank, backward=backward, **kw)
            for s in sparsities:
                sp = predict("sparse", m, n, k, density=1 - s, backward=backward, **kw)
                sp_lora = predict("sparse_lora", m, n, k, density=1 - s, lora_rank=lora_rank, backward=backward,
                                  group_size=sp.group_size, **kw)
                lines.append(
                    f"| {name} {n}x{k} | {regime} | {s:.0%} | {sp.group_size or '-'} | {sp.union_density:.3f} "
                    f"| {dense.time_s * 1e6:.1f} | {sp.time_s * 1e6:.1f} | {sp.speedup_over(dense):.2f}x | {sp.bound} "
                    f"| {dense_lora.time_s * 1e6:.1f} | {sp_lora.time_s * 1e6:.1f} "
                    f"| {sp_lora.speedup_over(dense_lora):.2f}x | {sp_lora.time_s / sp.time_s - 1:+.1%} |")
    return "\n".join(lines)


LAYER_COUNTS = {"q/k/v/o": 4, "gate/up": 2, "down": 1}
LORA_LINEARS = {"q/k/v/o": 2}  # q_proj and v_proj carry the adapter in a layer's LoRA runs


def layer_times(device: str, sparsity: float, m: int, backward: bool, *, lora_rank: int = 0,
                dropout: bool = False, model: str = "honest", masks: str = "grouped",
                dtype="bf16") -> tuple[float, float, float]:
    """(dense, sparse, sparse without LoRA) seconds of one Llama-2-7B decoder layer's seven
    linears; lora_rank > 0 puts LoRA on q_proj and v_proj."""
    dense = sparse = plain = 0.0
    for name, n, k in LLAMA2_7B_SHAPES:
        count = LAYER_COUNTS[name]
        with_lora = LORA_LINEARS.get(name, 0) if lora_rank else 0
        kw = dict(dtype=dtype, device=device, backward=backward, model=model, masks=masks)
        base = predict("sparse", m, n, k, density=1 - sparsity, **kw)
        plain += count * base.time_s
        for lora, c in ((True, with_lora), (False, count - with_lora)):
            if not c:
                continue
            extra = dict(lora_rank=lora_rank, dropout=dropout) if lora else {}
            dense += c * predict("dense_lora" if lora else "dense", m, n, k, **kw, **extra).time_s
            sparse += c * predict("sparse_lora" if lora else "sparse", m, n, k, density=1 - sparsity,
                                  group_size=base.group_size, **kw, **extra).time_s
    return dense, sparse, plain


def _layer_summary(device: str, sparsities, lora_rank: int, dtype, model: str = "honest",
                   masks: str = "grouped") -> str:
    """Per decoder layer (4 x q/k/v/o, 2 x gate/up, 1 x down), LoRA on q_proj and v_proj only."""
    lines = ["", f"Per Llama-2-7B decoder layer (7 linears; LoRA rank {lora_rank} on q_proj, v_proj):", "",
             "| regime | sparsity | dense us | sparse us | speedup |", "|---|---|---|---|---|"]
    for regime, m, backward in REGIMES:
        for s in sparsities:
            dense, sparse, _ = layer_times(device, s, m, backward, lora_rank=lora_rank, model=model, masks=masks,
                                           dtype=dtype)
            lines.append(f"| {regime} | {s:.0%} | {dense * 1e6:.1f} | {sparse * 1e6:.1f} | {dense / sparse:.2f}x |")
    return "\n".join(lines)


# What compare_table reports per decoder layer: (label, M, backward, LoRA dropout).
COMPARE_ROWS = (("decode M=1", 1, False, False), ("decode M=16", 16, False, False),
                ("prefill M=2048", 2048, False, False), ("fine-tune step M=2048", 2048, True, False),
                ("fine-tune step M=2048, dropout 0.05", 2048, True, True))


def compare_table(device: str = "h200", sparsities=(0.5, 0.75), lora_rank: int = 8, dtype="bf16") -> str:
    """Per-layer speedups over cuBLAS, the ideal model beside the honest one (free and grouped
    masks), and the fused LoRA's cost over the sparse-only layer."""
    lines = [f"### {DEVICES[device].name}, {_dtype_name(dtype)}: speedup over cuBLAS per Llama-2-7B decoder layer "
             f"(LoRA r={lora_rank} on q/v in the fine-tune rows)", "",
             "| regime | sparsity | ideal model (embedded-model free masks) | honest, free masks "
             "| honest, grouped masks |", "|---|---|---|---|---|"]
    for label, m, backward, dropout in COMPARE_ROWS:
        r = lora_rank if backward else 0
        for s in sparsities:
            cells = []
            for model, masks in (("ideal", "free"), ("honest", "free"), ("honest", "grouped")):
                dense, sparse, _ = layer_times(device, s, m, backward, lora_rank=r, dropout=dropout, model=model,
                                               masks=masks, dtype=dtype)
                cells.append(f"{dense / sparse:.2f}x")
            lines.append(f"| {label} | {s:.0%} | " + " | ".join(cells) + " |")
    lines += ["", "Fused LoRA (r=%d on q/v, no dropout) over the same sparse layer without LoRA:" % lora_rank, "",
              "| regime | sparsity | ideal | honest, grouped |", "|---|---|---|---|"]
    for label, m, backward, _ in COMPARE_ROWS[:4]:
        for s in sparsities:
            cells = []
            for model in ("ideal", "honest"):
                _, fused, plain = layer_times(device, s, m, backward, lora_rank=lora_rank, model=model, dtype=dtype)
                cells.append(f"{fused / plain - 1:+.1%}")
            lines.append(f"| {label} | {s:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Prefill tiles of the grouped kernel as (BM, G, CTAs per SM): the heuristic's first, then
# the larger tiles that fit one CTA per SM (an fp32 accumulator of 128 registers per thread
# at 8 warps): 256 x 128 is an sm_90 autotune candidate (configs.WIDE_TILE_BM), 128 x 256
# (G=16) no launcher picks. 256 x 256 would need 256 per thread.
TILE_OPTIONS = ((128, 8, 2), (256, 8, 1), (128, 16, 1))


def tile_table(device: str = "h200", sparsities=(0.5, 0.75), dtype="bf16") -> str:
    """Honest-model prefill (M=2048) per Llama-2-7B decoder layer on grouped masks (union =
    density: masks grouped G block rows deep, so the G=16 tile needs `prune --row-group 16`,
    not the demo's 8) for each of TILE_OPTIONS, and the ceiling where only compute counts:
    our kernels' FLOPs at Triton's efficiency against cuBLAS's dense ones at its own."""
    dev, m = DEVICES[device], 2048
    lines = [f"### {dev.name}, {_dtype_name(dtype)}: prefill M={m} per Llama-2-7B decoder layer, grouped masks, "
             "by the grouped kernel's tile (honest model; the first is the heuristic's, 256 x 128 an autotune "
             "candidate, BLOCKSPARSE_AUTOTUNE=1)", "",
             "| BM x BN (G) | CTAs/SM | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
             "|---|---|" + "---|" * len(sparsities)]
    for bm, g, slots in TILE_OPTIONS:
        cells = []
        for s in sparsities:
            dense = sparse = 0.0
            for name, n, k in LLAMA2_7B_SHAPES:
                dense += LAYER_COUNTS[name] * predict("dense", m, n, k, dtype=dtype, device=device).time_s
                sparse += LAYER_COUNTS[name] * predict("sparse", m, n, k, density=1 - s, union_density=1 - s,
                                                       group_size=g, block_m=bm, cta_slots=slots, dtype=dtype,
                                                       device=device).time_s
            cells.append(f"{dense / sparse:.2f}x")
        lines.append(f"| {bm} x {BLOCK * g} ({g}) | {slots} | " + " | ".join(cells) + " |")
    ceiling = dev.triton_efficiency / dev.compute_efficiency
    lines.append("| compute only (no memory, L2 or waves) | - | "
                 + " | ".join(f"{ceiling / (1 - s):.2f}x" for s in sparsities) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Roofline predictions for the Llama-2-7B linears, dense vs sparse.")
    parser.add_argument("--device", nargs="+", default=["h200", "h100"], choices=sorted(DEVICES))
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--lora-rank", "--lora_rank", type=int, default=8)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--model", default="honest", choices=MODELS)
    parser.add_argument("--masks", default="grouped", choices=MASKS)
    view = parser.add_mutually_exclusive_group()
    view.add_argument("--compare", action="store_true",
                      help="per-layer speedups of the ideal and the honest model side by side")
    view.add_argument("--tiles", action="store_true",
                      help="prefill per layer for larger grouped-kernel tiles at one CTA per SM (honest model, "
                           "grouped masks as deep as each tile's G)")
    args = parser.parse_args(argv)
    for device in args.device:
        if args.compare:
            print(compare_table(device, args.sparsity, args.lora_rank, args.dtype))
        elif args.tiles:
            print(tile_table(device, args.sparsity, args.dtype))
        else:
            print(llama2_7b_table(device, args.sparsity, args.lora_rank, args.dtype, args.model, args.masks))
            print(_layer_summary(device, args.sparsity, args.lora_rank, args.dtype, args.model, args.masks))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
