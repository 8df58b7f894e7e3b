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

Time of each kernel = max(HBM bytes / (HBM bandwidth x memory efficiency),
L2->SM bytes / L2 bandwidth, FLOPs / (peak x compute efficiency)) + one launch gap;
a call sums its kernels. Assumptions (all in `Device` and the functions below):

- Efficiency factors: on the H200 here cuBLAS bf16 reached ~790 of the 989 TFLOP/s
  datasheet peak (0.80) and a device copy ~4.3 of 4.8 TB/s (0.90); we apply the same
  factors to every kernel, ours included, and to every device. Ratios are thus
  *ideal* speedups: a Triton kernel that reaches a lower fraction of peak than cuBLAS
  loses that fraction.
- L2->SM bandwidth 10 TB/s on H100/H200 (6 TB/s A100): not a datasheet number, an
  estimate consistent with cuBLAS reaching 0.80 of peak with 128x256 tiles. It is what
  makes narrow tiles lose: a program of BM x BN loads its X slab for every BN columns,
  so X moves M K (N / BN) x union_density bytes from L2 (we count every re-read; L1
  gives no reuse across programs).
- HBM traffic: every operand once, provided the smaller of X and W fits in half the
  L2 (the grid is ordered so that it stays resident while the larger streams past);
  otherwise the larger is streamed once per L2-sized chunk of the smaller.
- Launch gap 2 us per kernel (back-to-back kernels in one stream, as under CUDA graphs;
  Python dispatch is not counted).
- fp32 inputs run on TF32 tensor cores (Triton's default for tl.dot).
- Decode (M <= 64): the MMA pads tokens to 16 rows; FLOPs count that padding.
- Metadata: the schedule's int32 tables (kernels/schedule.py): a column index per
  block (decode), a column index and G block indices per (group, union column)
  (grouped).

Union densities default to the clustered ones measured on the embedded model's Wanda
16x16 masks (`benchmarks/union_density.py`), interpolated linearly in density.

`python -m blocksparse.kernels.roofline` prints the Llama-2-7B table.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field

from ..dtypes import short_name
from ..format import DEFAULT_BLOCK_SIZE
from .configs import DECODE_MAX_M, GROUP_SIZES

__all__ = ["Device", "DEVICES", "KernelCost", "Prediction", "PROVIDERS", "predict",
           "default_union_density", "llama2_7b_table"]

PROVIDERS = ("dense", "dense_lora", "sparse", "sparse_lora")
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


@dataclass(frozen=True)
class Device:
    name: str
    peak_tflops: dict          # dtype name -> dense tensor-core TFLOP/s (datasheet, no sparsity)
    hbm_tbps: float            # datasheet HBM bandwidth, TB/s
    l2_mb: float
    l2_tbps: float             # assumed L2 -> SM bandwidth, TB/s (see module docstring)
    compute_efficiency: float = 0.80
    memory_efficiency: float = 0.90
    launch_us: float = 2.0

    def peak_flops(self, dtype: str) -> float:
        return self.peak_tflops[dtype] * 1e12 * self.compute_efficiency

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_tbps * 1e12 * self.memory_efficiency


DEVICES = {
    "h100": Device("H100 SXM", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}, hbm_tbps=3.35, l2_mb=50, l2_tbps=10.0),
    "h200": Device("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}, hbm_tbps=4.8, l2_mb=50, l2_tbps=10.0),
    "a100": Device("A100 SXM 80GB", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}, hbm_tbps=2.039, l2_mb=40,
                   l2_tbps=6.0),
}

_ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class KernelCost:
    """One kernel launch: HBM bytes, L2->SM bytes, executed FLOPs."""
    name: str
    hbm_bytes: float
    l2_bytes: float
    flops: float

    def time_s(self, device: Device, dtype: str) -> float:
        return self.launch_free_time_s(device, dtype) + device.launch_us * 1e-6

    def launch_free_time_s(self, device: Device, dtype: str) -> float:
        return max(self.hbm_bytes / device.hbm_bytes_per_s, self.l2_bytes / (device.l2_tbps * 1e12),
                   self.flops / device.peak_flops(dtype))

    def bound(self, device: Device, dtype: str) -> str:
        times = {"memory": self.hbm_bytes / device.hbm_bytes_per_s, "l2": self.l2_bytes / (device.l2_tbps * 1e12),
                 "compute": self.flops / device.peak_flops(dtype)}
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


def _dense_gemm(name: str, M: int, N: int, K: int, e: int, device: Device) -> KernelCost:
    """cuBLAS: 128 x 256 tiles for prefill; for M <= 64 one M tile and 128-wide N tiles."""
    bm, bn = (128, 256) if M > DECODE_MAX_M else (max(M, 1), 128)
    m_tiles = math.ceil(M / bm)
    x, w, y = M * K * e, N * K * e, M * N * e
    l2 = x * math.ceil(N / bn) + w * m_tiles + y
    return KernelCost(name, _hbm(x, w, y, device), l2, 2.0 * M * N * K)


def _skinny(name: str, rows: int, cols: int, inner: int, e: int, extra_bytes: float = 0.0) -> KernelCost:
    """A GEMM with one tiny dimension (LoRA rank): every operand moves once."""
    return KernelCost(name, (rows * inner + inner * cols + rows * cols) * e + extra_bytes,
                      (rows * inner + inner * cols + rows * cols) * e + extra_bytes, 2.0 * rows * cols * inner)


def _sparse_kernel(name: str, M: int, N: int, K: int, e: int, density: float, union: float, group_size: int,
                   rank_pad: int, device: Device, block_m: int) -> KernelCost:
    """Our kernel computing M x N outputs over K with `density` of the blocks present.

    Decode (M <= 64): every present block once, the X slab of each block re-read per
    block row from L2. Grouped (M > 64): programs of block_m x 16G walk the union.
    rank_pad > 0 adds the fused LoRA expand (T [M, rank_pad] and B [N, rank_pad], input dtype).
    """
    nnz = density * (N // BLOCK) * (K // BLOCK)
    w = nnz * BLOCK * BLOCK * e
    x, y = M * K * e, M * N * e
    lora = (M + N) * rank_pad * e
    if M <= DECODE_MAX_M:
        m_pad = math.ceil(M / BLOCK) * BLOCK
        meta = nnz * 4 + (N // BLOCK + 1) * 4
        l2 = w + meta + (N // BLOCK) * (density * K + rank_pad) * e * m_pad + y + N * rank_pad * e
        flops = 2.0 * m_pad * N * K * density + 2.0 * m_pad * N * rank_pad
        return KernelCost(name, _hbm(x, w, y + meta + lora, device), l2, flops)
    bn = BLOCK * group_size
    groups = math.ceil(N / bn)
    m_tiles = math.ceil(M / block_m)
    m_pad = m_tiles * block_m
    meta = groups * union * (K // BLOCK) * 4 * (1 + group_size)  # union_col + union_block[U, G], int32
    l2 = (m_pad * union * K * e * groups                 # X slab per union column, per group
          + m_tiles * (w + meta)                           # present blocks per M tile
          + y + m_tiles * N * rank_pad * e + m_pad * rank_pad * e * groups)
    flops = 2.0 * m_pad * N * K * union + 2.0 * m_pad * N * rank_pad
    return KernelCost(name, _hbm(x, w, y + meta + lora, device), l2, flops)


def predict(provider: str, M: int, N: int, K: int, *, density: float = 1.0, union_density: float | None = None,
            union_density_bwd: float | None = None, group_size: int | None = None, dtype="bf16",
            lora_rank: int = 0, device: str = "h200", backward: bool = False, block_m: int = 128) -> Prediction:
    """Predicted bytes, FLOPs and time of one call of `provider` (see the module docstring).

    density: fraction of 16x16 blocks present (sparse providers). union_density: the
    grouped forward's union density for `group_size`; if omitted, the measured clustered
    value. group_size=None picks the fastest G in (1, 2, 4, 8) (what the autotuner
    would do). union_density_bwd: the same for the transposed mask (dX kernel),
    default = the measured clustered value for the transposed mask if union_density was
    omitted, else union_density. backward=True: forward + backward with W frozen.
    """
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {tuple(DEVICES)}, got {device!r}")
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
        lora_rank = 0
    if union_density is not None and group_size is None:
        raise ValueError("union_density is the union density of one group size: pass group_size too")
    dtype = _dtype_name(dtype)
    dev = DEVICES[device]
    e = _ELEMENT_BYTES[dtype]
    r = lora_rank

    if provider.startswith("sparse") and M > DECODE_MAX_M and group_size is None:
        candidates = [predict(provider, M, N, K, density=density, group_size=g, dtype=dtype, lora_rank=lora_rank,
                              device=device, backward=backward, block_m=block_m,
                              union_density_bwd=union_density_bwd) for g in GROUP_SIZES]
        return min(candidates, key=lambda p: p.time_s)

    kernels: list[KernelCost] = []
    gemm = 2.0 * M * N * K * (density if provider.startswith("sparse") else 1.0)
    useful = gemm + 2.0 * M * r * (N + K) + (gemm + 4.0 * M * r * (N + K) if backward else 0.0)
    union = None
    if provider.startswith("dense"):
        kernels.append(_dense_gemm("Y = X W^T", M, N, K, e, dev))
        if r:
            kernels.append(_skinny("T = X A^T", M, r, K, e))
            kernels.append(_skinny("Y += T B^T", M, N, r, e, extra_bytes=M * N * e))
        if backward:
            kernels.append(_dense_gemm("dX = dY W", M, K, N, e, dev))
    else:
        g = 1 if M <= DECODE_MAX_M else group_size
        if g not in GROUP_SIZES and union_density is None:
            raise ValueError(f"group_size must be one of {GROUP_SIZES} without union_density, got {group_size}")
        union = density if g == 1 else (union_density if union_density is not None
                                         else default_union_density(density, g))
        if not density - 1e-9 <= union <= 1.0:
            raise ValueError(f"union_density must lie in [density, 1] = [{density}, 1], got {union}")
        rank_pad = math.ceil(r / BLOCK) * BLOCK
        if r:
            kernels.append(_skinny("T = drop(X) A^T", M, r, K, e))
        kernels.append(_sparse_kernel("Y = X W^T (+T B^T)", M, N, K, e, density, union, g, rank_pad, dev, block_m))
        if backward:
            if union_density_bwd is not None:
                union_bwd = union_density_bwd
            elif g == 1:
                union_bwd = density
            else:
                union_bwd = union_density if union_density is not None else default_union_density(density, g, True)
            kernels.append(_sparse_kernel("dX = dY W (+dT A)", M, K, N, e, density, union_bwd, g, rank_pad,
                                          dev, block_m))
    if backward and r:
        kernels.append(_skinny("dT = s dY B", M, r, N, e))
        kernels.append(_skinny("dB = s dY^T T", N, r, M, e))
        kernels.append(_skinny("dA = dT^T drop(X)", r, K, M, e))
        if provider == "dense_lora":
            kernels.append(_skinny("dX += dT A", M, K, r, e, extra_bytes=M * K * e))

    longest = max(kernels, key=lambda k: k.launch_free_time_s(dev, dtype))
    return Prediction(
        provider=provider, device=dev.name, dtype=dtype,
        time_s=sum(k.time_s(dev, dtype) for k in kernels),
        hbm_bytes=sum(k.hbm_bytes for k in kernels), l2_bytes=sum(k.l2_bytes for k in kernels),
        flops=sum(k.flops for k in kernels), useful_flops=useful,
        group_size=(group_size if provider.startswith("sparse") and M > DECODE_MAX_M else None),
        union_density=union, kernels=tuple(kernels), bound=longest.bound(dev, dtype))


LLAMA2_7B_SHAPES = (("q/k/v/o", 4096, 4096), ("gate/up", 11008, 4096), ("down", 4096, 11008))
REGIMES = (("decode M=1", 1, False), ("decode M=16", 16, False), ("prefill M=2048", 2048, False),
           ("fwd+bwd M=2048", 2048, True))


def llama2_7b_table(device: str = "h200", sparsities=(0.5, 0.75), lora_rank: int = 8, dtype="bf16") -> str:
    """Markdown table of predicted times for the Llama-2-7B linears, dense beside sparse."""
    dev = DEVICES[device]
    lines = [f"### {dev.name}, {_dtype_name(dtype)}, LoRA rank {lora_rank} "
             f"(efficiency {dev.compute_efficiency:.2f} compute / {dev.memory_efficiency:.2f} HBM, "
             f"launch {dev.launch_us:g} us)", "",
             "| shape N x K | regime | sparsity | G | union | dense us | sparse us | speedup | bound "
             "| dense+LoRA us | sparse+LoRA us | speedup | fused LoRA overhead |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, n, k in LLAMA2_7B_SHAPES:
        for regime, m, backward in REGIMES:
            dense = predict("dense", m, n, k, dtype=dtype, device=device, backward=backward)
            dense_lora = predict("dense_lora", m, n, k, dtype=dtype, lora_rank=lora_rank, device=device,
                                 backward=backward)
            for s in sparsities:
                sp = predict("sparse", m, n, k, density=1 - s, dtype=dtype, device=device, backward=backward)
                sp_lora = predict("sparse_lora", m, n, k, density=1 - s, dtype=dtype, lora_rank=lora_rank,
                                  device=device, backward=backward, group_size=sp.group_size)
                lines.append(
                    f"| {name} {n}x{k} | {regime} | {s:.0%} | {sp.group_size or '-'} | {sp.union_density:.3f} "
                    f"| {dense.time_s * 1e6:.1f} | {sp.time_s * 1e6:.1f} | {sp.speedup_over(dense):.2f}x | {sp.bound} "
                    f"| {dense_lora.time_s * 1e6:.1f} | {sp_lora.time_s * 1e6:.1f} "
                    f"| {sp_lora.speedup_over(dense_lora):.2f}x | {sp_lora.time_s / sp.time_s - 1:+.1%} |")
    return "\n".join(lines)


def _layer_summary(device: str, sparsities, lora_rank: int, dtype) -> str:
    """Per decoder layer (4 x q/k/v/o, 2 x gate/up, 1 x down), LoRA on q_proj and v_proj only."""
    counts = {"q/k/v/o": 4, "gate/up": 2, "down": 1}
    lines = ["", f"Per Llama-2-7B decoder layer (7 linears; LoRA rank {lora_rank} on q_proj, v_proj):", "",
             "| regime | sparsity | dense us | sparse us | speedup |", "|---|---|---|---|---|"]
    for regime, m, backward in REGIMES:
        for s in sparsities:
            dense = sparse = 0.0
            for name, n, k in LLAMA2_7B_SHAPES:
                count = counts[name]
                with_lora = 2 if name == "q/k/v/o" else 0
                for lora in (True, False):
                    c = with_lora if lora else count - with_lora
                    if not c:
                        continue
                    dp, sp = ("dense_lora", "sparse_lora") if lora else ("dense", "sparse")
                    kw = dict(dtype=dtype, device=device, backward=backward, lora_rank=lora_rank if lora else 0)
                    dense += c * predict(dp, m, n, k, **kw).time_s
                    sparse += c * predict(sp, m, n, k, density=1 - s, **kw).time_s
            lines.append(f"| {regime} | {s:.0%} | {dense * 1e6:.1f} | {sparse * 1e6:.1f} | {dense / sparse:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Roofline predictions for the Llama-2-7B linears, dense vs sparse.")
    parser.add_argument("--device", nargs="+", default=["h200", "h100"], choices=sorted(DEVICES))
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--lora-rank", "--lora_rank", type=int, default=8)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = parser.parse_args(argv)
    for device in args.device:
        print(llama2_7b_table(device, args.sparsity, args.lora_rank, args.dtype))
        print(_layer_summary(device, args.sparsity, args.lora_rank, args.dtype))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
