"""Compile every Triton kernel and config ahead of time for sm_80 and sm_90, with no GPU.

For each entry of `compile_specs(dtype, arch)` (kernel, regime,
jit fn, signature, constexprs, attrs, num_warps, num_stages) this runs
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32), options=...)`,
then reads from the result:

- registers, spill stores/loads and stack: the `-v` report of the ptxas that Triton
  itself uses for that arch, run again on the generated PTX with Triton's flags;
- shared memory: the compiled kernel's metadata (`shared`), checked against the
  arch's per-block opt-in limit;
- MMA instructions in the PTX: `wgmma.mma_async` (Hopper, and the widest N) or `mma.sync`;
  the 16-byte async copies (`cp.async.cg`) that pipeline tile loads.

It prints a markdown table, writes it as JSON with `--json FILE`, and exits 1 if any
config fails to compile, spills (the "repair" regime excepted: the grouped
schedules' second pass, run only for tiles that met NaN or inf), exceeds shared
memory, or, in a prefill or backward config (the compute-bound regimes), fits
fewer than 2 CTAs per SM (registers, shared memory, warps; 1 for the sm_90 wide
tile, `min_ctas`) or (sm_90, BM >= 64) lacks wgmma; the grouped kernel's compute-bound
configs also fail without 16-byte cp.async or when their widest wgmma is narrower than
the group tile (BS * G columns). Identical
entries (same kernel, regime, constexprs, warps, stages) are compiled once.

    python -m blocksparse.kernels.aot --json runs/compile_report.json   (= benchmarks/compile_report.py)
    python -m blocksparse.kernels.aot --arch 90 --regime prefill --max-per-regime 1

TRITON_INTERPRET=1 turns @triton.jit functions into interpreted ones that cannot be
compiled, so `main` removes it from the environment before the kernels are imported (`compile_specs`
imports them when called): run this as a script (or in a subprocess), not from a process
that already imported them.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from ..dtypes import SHORT_NAMES, short_name, to_dtype
from . import roofline
from .configs import (DECODE_MAX_M, GROUP_SIZES, NUM_SMS, SMEM_BYTES, WIDE_TILE_BM, dot_precision, grad_a_config,
                      matmul_candidates, matmul_config, matmul_constexprs, matmul_plan, nonfinite_passes,
                      sdd_config, shrink_config)

ARCHS = (80, 90)
LLAMA2_7B_SHAPES = tuple((n, k) for _, n, k in roofline.LLAMA2_7B_SHAPES)  # (N, K)
LAUNCH_M = (1, 16, 32, 64, 96, 256, 2048, 4096)  # every decode BM, prefill's BM = 64 and 128
LAUNCH_DENSITY = 0.5
# Compute-bound regimes: on Hopper their configs with BM >= 64 token rows (one
# warpgroup's wgmma tile) must use wgmma. Smaller BM (a decode-sized backward) cannot.
WGMMA_REGIMES = ("prefill", "backward")
WGMMA_MIN_BM = 64
WGMMA_MAX_N = 256


# --------------------------------------------------------------------------
# what to compile: every kernel x config the launchers use
# --------------------------------------------------------------------------
def _matmul_signature(kernel, dt: str) -> dict:
    sig = {name: f"*{dt}" for name in ("X", "VALUES", "Y", "BIAS", "LORA_E")}
    sig.update({name: "*i32" for name in ("GROUP_PTR", "UNION_COL", "UNION_BLOCK", "GROUP_ROWS", "COUNTER",
                                         "NONFINITE")})
    sig.update({"LORA_T": f"*{dt}", "PARTIAL": "*fp32", "KEEP_BITS": "*i32"})
    sig.update({name: "i32" for name in ("M", "N_OUT", "num_groups", "stride_xm", "stride_ym", "stride_keep",
                                          "stride_e_out", "stride_e_r", "lora_rank")})
    sig.update({"scaling": "fp32", "dropout_p": "fp32"})
    sig.update({name: "constexpr" for name in (
        "BS", "G", "KC", "BM", "SPLIT_K", "TRANS_W", "DIRECT_W", "HAS_BIAS", "HAS_LORA", "RP",
        "LORA_OUT_DROPOUT", "DOT_PRECISION", "NONFINITE_PASS")})
    return {name: sig[name] for name in kernel.arg_names}


def _lora_signature(kernel, dt: str, ones: tuple[str, ...] = ()) -> dict:
    """Signature of the LoRA kernels; `ones` are int strides the JIT specializes to 1."""
    types = {"X": f"*{dt}", "A": f"*{dt}", "GS": f"*{dt}", "T": f"*{dt}", "PARTIAL": "*fp32",
             "COUNTER": "*i32", "SEED": "*i64", "KEEP_BITS": "*i32", "dropout_p": "fp32"}
    constexprs = ("BM", "BK", "RP", "SPLITS", "HAS_DROPOUT", "DOT_PRECISION") + ones
    return {name: "constexpr" if name in constexprs else types.get(name, "i32")
            for name in kernel.arg_names}


def compile_specs(dtype: torch.dtype = torch.bfloat16, arch: int = 90) -> list[dict]:
    """Every kernel x config the launchers pick on Llama-2-7B's shapes, for AOT compilation:
    planned by the launchers' own functions (configs.py) over LAUNCH_M tokens.

    Each entry: kernel name, regime, the jit function `fn`, `signature`
    (argument name -> Triton type, "constexpr" for constexprs), `constexprs`,
    `attrs` (the 16-byte alignment the JIT would infer; without it no load
    is vectorized or pipelined), `num_warps`, `num_stages`. Compile with
    `triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
    options={"num_warps": ..., "num_stages": ...})`.
    """
    # Imported here: the caller must have cleared TRITON_INTERPRET first (see `main`).
    from .block_sparse_linear import (_bsl_matmul_kernel, _dropout_keep_kernel, _lora_grad_a_kernel,
                                      _lora_shrink_kernel, _sdd_kernel)

    dt = short_name(dtype)
    elt = torch.empty((), dtype=dtype).element_size()
    smem = SMEM_BYTES[arch]
    precision = dot_precision(dtype)
    specs = []

    def add_matmul(regime: str, cfg, constexprs: dict) -> None:
        specs.append({"kernel": "_bsl_matmul_kernel", "regime": regime, "fn": _bsl_matmul_kernel,
                      "signature": _matmul_signature(_bsl_matmul_kernel, dt), "constexprs": constexprs,
                      "num_warps": cfg.num_warps, "num_stages": cfg.num_stages})

    # What the launchers pick (`matmul_plan`, `matmul_constexprs`, and the autotuner's candidates
    # under BLOCKSPARSE_AUTOTUNE=1) for Llama-2-7B's shapes at LAUNCH_DENSITY, every M of
    # LAUNCH_M, every G the schedule may choose, forward (with and without bias) and dX, without
    # LoRA and with rank-16 LoRA (dropout or not); the grouped schedules' repair pass as "repair".
    for (n, k), m, transposed in itertools.product(LLAMA2_7B_SHAPES, LAUNCH_M, (False, True)):
        n_out, k_in = (k, n) if transposed else (n, k)
        for g, has_bias, lora in itertools.product((1,) if m <= DECODE_MAX_M else GROUP_SIZES,
                                                   (False,) if transposed else (False, True),
                                                   (None, "lora", "lora_dropout")):
            groups = -(-n_out // (16 * g))
            entries = round(groups * LAUNCH_DENSITY * (k_in // 16))
            out_dropout = transposed and lora == "lora_dropout"
            cfg, split_k, steps = matmul_plan(m, 16, g, elt, groups, entries, out_dropout=out_dropout,
                                              smem_bytes=smem, num_sms=NUM_SMS[arch], arch=arch)
            plans = (matmul_candidates(cfg, split_k, steps, elt, smem, m=m, arch=arch) if groups
                     else [(cfg, split_k)])
            for (plan, split), npass in itertools.product(plans, nonfinite_passes(g)):
                regime = "repair" if npass == 2 else "backward" if transposed else plan.regime
                add_matmul(regime, plan, matmul_constexprs(
                    plan, split_k=split, transposed=transposed, has_bias=has_bias, has_lora=lora is not None,
                    rank_padded=16, out_dropout=out_dropout, precision=precision, nonfinite_pass=npass))
    for bs, g in ((32, 2), (64, 1)):  # the other block edges the kernels take, at prefill
        cfg = matmul_config(2048, bs, g, elt, smem_bytes=smem, arch=arch)
        add_matmul("prefill", cfg, matmul_constexprs(
            cfg, split_k=1, transposed=False, has_bias=False, has_lora=False, rank_padded=16, out_dropout=False,
            precision=precision, nonfinite_pass=nonfinite_passes(g)[0]))
    # The shrink runs on X with A [r, K] (stride_a_k = 1) and, in backward, on dY with B^T
    # (B [N, r]: stride_a_r = 1); dA with dropout reads the shrink's keep bits over X [M, K].
    feature_dims = sorted({d for shape in LLAMA2_7B_SHAPES for d in shape})
    for m, k in itertools.product(LAUNCH_M, feature_dims):
        cfg, _ = shrink_config(m, k, 16, NUM_SMS[arch])
        for unit_stride, dropout in (("stride_a_k", False), ("stride_a_k", True), ("stride_a_r", False)):
            specs.append({"kernel": "_lora_shrink_kernel", "regime": "lora_shrink",
                          "fn": _lora_shrink_kernel,
                          "signature": _lora_signature(_lora_shrink_kernel, dt, (unit_stride,)),
                          "constexprs": dict(cfg.constexprs, HAS_DROPOUT=dropout, DOT_PRECISION=precision,
                                             **{unit_stride: 1}),
                          "num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        cfg = grad_a_config(m, k, 16, NUM_SMS[arch], elt)
        specs.append({"kernel": "_lora_grad_a_kernel", "regime": "lora_grad_a", "fn": _lora_grad_a_kernel,
                      "signature": _lora_signature(_lora_grad_a_kernel, dt),
                      "constexprs": dict(cfg.constexprs, DOT_PRECISION=precision),
                      "num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    # dW at the stored blocks (training the kept values), b = 16 at every M, and b = 32.
    for m, bs in [(m, 16) for m in LAUNCH_M] + [(2048, 32)]:
        cfg = sdd_config(m, bs)
        specs.append({"kernel": "_sdd_kernel", "regime": "sdd", "fn": _sdd_kernel,
                      "signature": {name: "constexpr" if name in ("BS", "KB", "BM", "DOT_PRECISION") else
                                    f"*{dt}" if name in ("X", "GRAD_Y", "GRAD_V") else
                                    "*i32" if name in ("CROW", "COL", "ROW_PERM") else "i32"
                                    for name in _sdd_kernel.arg_names},
                      "constexprs": dict(cfg.constexprs, BS=bs, DOT_PRECISION=precision),
                      "num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    specs.append({"kernel": "_dropout_keep_kernel", "regime": "dropout_mask", "fn": _dropout_keep_kernel,
                  "signature": {"SEED": "*i64", "KEEP": f"*{dt}", "numel": "i32", "dropout_p": "fp32",
                                "BLOCK": "constexpr"},
                  "constexprs": {"BLOCK": 1024}, "num_warps": 4, "num_stages": 1})
    for spec in specs:
        spec["attrs"] = _aligned_attrs(spec["fn"], spec["signature"])
    return specs


# What the JIT infers at run time for our launches: 16-byte aligned tensors, and
# feature dims / row strides that are multiples of 16 (block-sparse dims always
# are). Without it no load is vectorized, so none is pipelined with cp.async.
_ALIGNED_INTS = ("stride_xm", "stride_ym", "stride_gm", "K", "N_OUT")


def _aligned_attrs(fn, signature: dict) -> dict:
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if signature[name].startswith("*") or name in _ALIGNED_INTS}


# --------------------------------------------------------------------------
# compiling and reading what came out
# --------------------------------------------------------------------------
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def load_specs_function(path: str):
    """'package.module:function' -> the function (default blocksparse.kernels.aot:compile_specs)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"--specs must look like 'package.module:function', got {path!r}")
    return getattr(importlib.import_module(module_name), attr)


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers, spills and stack of the PTX's (single) entry, from Triton's own ptxas -v."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
               src, "-o", os.path.join(tmp, "kernel.cubin")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    regs = _PTXAS_REGS.findall(log)
    spills = _PTXAS_SPILLS.findall(log)
    if len(regs) != 1 or len(spills) != 1:
        raise RuntimeError(f"cannot parse the ptxas -v report (expected one entry function):\n{log}")
    stack, stores, loads = map(int, spills[0])
    return {"registers": int(regs[0]), "spill_stores": stores, "spill_loads": loads, "stack_bytes": stack}


def ptx_instructions(ptx: str) -> dict:
    """MMA instructions (wgmma, mma.sync), the widest wgmma's N, and the 16-byte async copies
    (cp.async.cg moves 16 bytes or nothing) that pipeline the tile loads."""
    wgmma_n = re.findall(r"\bwgmma\.mma_async\.sync\.aligned\.m\d+n(\d+)k\d+", ptx)
    return {"wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)), "wgmma_n": max(map(int, wgmma_n), default=0),
            "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
            "cp_async_16": len(re.findall(r"\bcp\.async\.cg\.shared\.global\b", ptx))}


def config_label(spec: dict) -> str:
    flags = ",".join(f"{k}={v}" for k, v in spec["constexprs"].items()
                     if not isinstance(v, bool) or v)
    return f"{flags} w{spec['num_warps']} s{spec['num_stages']}"


def compile_one(spec: dict, arch: int, dtype: str) -> dict:
    """Compile one spec for one arch; a row of the report (status 'ok' or the error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"kernel": spec["kernel"], "regime": spec["regime"], "dtype": dtype, "arch": f"sm_{arch}",
           "config": config_label(spec), "constexprs": {k: v for k, v in spec["constexprs"].items()},
           "num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
    start = time.perf_counter()
    try:
        source = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"],
                           attrs=spec.get("attrs"))
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
        ptx = compiled.asm["ptx"]
        row.update(ptxas_usage(ptx, arch))
        row.update(ptx_instructions(ptx))
        row["shared_bytes"] = int(compiled.metadata.shared)
        row["status"] = "ok"
    except Exception as err:  # a config that does not compile is a reported failure, not a crash
        row["status"] = f"error: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    row["compile_s"] = round(time.perf_counter() - start, 2)
    return row


# Per-SM limits (CUDA occupancy calculator: A100 = sm_80, H100/H200 = sm_90).
SM_SHARED_BYTES = {80: 167936, 90: 233472}
SM_REGISTERS, SM_MAX_WARPS, SM_MAX_CTAS = 65536, 64, 32
CTA_RESERVED_SHARED = 1024
MIN_CTAS_COMPUTE_BOUND = 2  # one CTA per SM leaves no other block to hide a barrier or a load


def ctas_per_sm(row: dict) -> int:
    """Resident blocks per SM: the least of what registers (8 per thread granules, 256 per warp),
    shared memory (1 KB reserved per block) and warps allow."""
    arch = int(row["arch"][3:])
    regs_per_warp = -(-(-(-row["registers"] // 8) * 8 * 32) // 256) * 256
    by_regs = SM_REGISTERS // (regs_per_warp * row["num_warps"])
    by_smem = SM_SHARED_BYTES[arch] // (row["shared_bytes"] + CTA_RESERVED_SHARED)
    return min(by_regs, by_smem, SM_MAX_WARPS // row["num_warps"], SM_MAX_CTAS)


def min_ctas(row: dict) -> int:
    """CTAs per SM a compute-bound row needs: MIN_CTAS_COMPUTE_BOUND, but one for the sm_90 wide
    tile (configs.WIDE_TILE_BM rows, 8 warps): its accumulator alone is 128 registers per
    thread, one CTA by design, whose two warpgroups each run their own 128 x 128 wgmma chain.
    Whether that hides the per-step barrier as a second CTA would is for gpu_check to measure
    (it is an autotune candidate, never the heuristic's pick)."""
    if int(row["arch"][3:]) == 90 and row["constexprs"].get("BM") == WIDE_TILE_BM and row["num_warps"] == 8:
        return 1
    return MIN_CTAS_COMPUTE_BOUND


def failures(row: dict) -> list[str]:
    """Why a row fails the report's requirements (empty list: it passes)."""
    if row["status"] != "ok":
        return [row["status"]]
    arch = int(row["arch"][3:])
    problems = []
    if (row["spill_stores"] or row["spill_loads"]) and row["regime"] != "repair":
        problems.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads")
    if row["shared_bytes"] > SMEM_BYTES[arch]:
        problems.append(f"shared memory {row['shared_bytes']} B > {SMEM_BYTES[arch]} B")
    if (arch >= 90 and row["regime"] in WGMMA_REGIMES and row["constexprs"].get("BM", WGMMA_MIN_BM) >= WGMMA_MIN_BM
            and not row["wgmma"]):
        problems.append("no wgmma in a compute-bound config on sm_90")
    cx = row["constexprs"]
    if row["regime"] in WGMMA_REGIMES and "G" in cx:  # the grouped kernel's main loop
        tile_n = min(cx["BS"] * cx["G"], WGMMA_MAX_N)
        if arch >= 90 and row["wgmma"] and row.get("wgmma_n") != tile_n:
            problems.append(f"widest wgmma N={row.get('wgmma_n')}, the group tile is {tile_n} wide")
        if not row.get("cp_async_16"):
            problems.append("no 16-byte cp.async: the tile loads are not pipelined")
    if (row["regime"] in WGMMA_REGIMES and row["shared_bytes"] <= SMEM_BYTES[arch]
            and ctas_per_sm(row) < min_ctas(row)):
        problems.append(f"{ctas_per_sm(row)} CTA/SM in a compute-bound config ({row['registers']} registers x "
                        f"{row['num_warps']} warps, {row['shared_bytes']} B shared)")
    return problems


def markdown(rows: list[dict]) -> str:
    lines = ["| kernel | regime | dtype | config | arch | regs | spills (st/ld B) | smem B | CTAs/SM "
             "| wgmma (widest N) | mma.sync | cp.async 16 B | compile s | result |", "|---" * 14 + "|"]
    for r in rows:
        ok = r["status"] == "ok"
        problems = failures(r)
        cell = (lambda key: str(r.get(key, "-")) if ok else "-")
        lines.append(f"| {r['kernel']} | {r['regime']} | {r['dtype']} | {r['config']} | {r['arch']} | {cell('registers')} "
                     f"| {cell('spill_stores')}/{cell('spill_loads')} | {cell('shared_bytes')} "
                     f"| {ctas_per_sm(r) if ok else '-'} | {cell('wgmma')}"
                     + (f" (n{r['wgmma_n']})" if ok and r.get("wgmma_n") else "")
                     + f" | {cell('mma_sync')} | {cell('cp_async_16')} | {r['compile_s']} "
                     f"| {'; '.join(problems) if problems else 'pass'} |")
    return "\n".join(lines)


_JOBS: list = []


def _run_job(index: int) -> dict:
    spec, arch, dtype = _JOBS[index]
    return compile_one(spec, arch, dtype)


def select(specs: list[dict], regimes, max_per_regime: int | None) -> list[dict]:
    """The specs of the wanted regimes, duplicates dropped, at most max_per_regime per (kernel, regime)."""
    chosen, seen, identities = [], {}, set()
    for spec in specs:
        if regimes and spec["regime"] not in regimes:
            continue
        identity = (spec["kernel"], spec["regime"], repr(sorted(spec["constexprs"].items())),
                    spec["num_warps"], spec["num_stages"])
        if identity in identities:
            continue
        identities.add(identity)
        key = (spec["kernel"], spec["regime"])
        if max_per_regime is not None and seen.get(key, 0) >= max_per_regime:
            continue
        seen[key] = seen.get(key, 0) + 1
        chosen.append(spec)
    return chosen


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Ahead-of-time compile report of the Triton kernels (no GPU).")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS,
                        help="compute capabilities to compile for (80 = A100, 90 = H100/H200)")
    parser.add_argument("--dtype", nargs="+", default=["bf16"], choices=sorted(SHORT_NAMES.values()))
    parser.add_argument("--regime", nargs="+", default=None, help="only these regimes (default: all)")
    parser.add_argument("--max-per-regime", "--max_per_regime", type=int, default=None,
                        help="compile at most this many configs per (kernel, regime), for quick checks")
    parser.add_argument("--specs", default="blocksparse.kernels.aot:compile_specs",
                        help="'module:function' returning the specs, called as f(dtype=..., arch=...)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel compile processes")
    parser.add_argument("--json", default=None, help="write the rows and the verdict to this file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Must happen before the kernels module is imported (jit decorators read it then).
    os.environ.pop("TRITON_INTERPRET", None)
    specs_fn = load_specs_function(args.specs)
    for dtype in args.dtype:
        for arch in args.arch:
            specs = select(specs_fn(dtype=to_dtype(dtype), arch=arch), args.regime, args.max_per_regime)
            _JOBS.extend((spec, arch, dtype) for spec in specs)
    if not _JOBS:
        print("no kernel configs selected", file=sys.stderr)
        return 1
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety
        def tqdm(iterable, **_):
            return iterable
    indices = range(len(_JOBS))
    if args.jobs > 1:
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            rows = list(tqdm(pool.imap(_run_job, indices), total=len(_JOBS), desc="compile", file=sys.stderr))
    else:
        rows = [_run_job(i) for i in tqdm(indices, desc="compile", file=sys.stderr)]
    failed = [r for r in rows if failures(r)]
    print(markdown(rows))
    import triton

    verdict = (f"{len(rows) - len(failed)}/{len(rows)} configs pass "
               f"(triton {triton.__version__}, archs {', '.join(f'sm_{a}' for a in args.arch)})")
    print("\n" + verdict)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "passed": not failed, "summary": verdict,
                       "rows": [dict(r, failures=failures(r)) for r in rows]}, f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
