"""Kernel benchmark: block-sparse linear (with and without fused LoRA) against dense, side by side.

One run times every provider on the same inputs:

- dense        F.linear(x, W): cuBLAS on a GPU, the CPU BLAS otherwise
- dense+lora   F.linear then out.addmm_(x A^T, B^T, alpha=s): the unfused LoRA pattern
- torch_bsr    W.to_sparse_bsr((b, b)) through F.linear, where the platform supports it
- ours         block_sparse_linear (Triton on a GPU, the torch backend on a CPU)
- ours+lora    block_sparse_linear with the LoRA path fused
- ours[G4]     forced Triton schedules (`--schedules G1,G2,G4,G8,G4nc`: G block rows per
               program, nc = natural row order instead of clustered), GPU, M > 64

Speedups are against the best dense time of the same run (dense for the
providers without LoRA, dense+lora for those with it). Beside each measured time
sits the roofline-modeled time of `blocksparse.kernels.roofline` (GPUs it models).
The weights use block masks that are either "structured" (Wanda-like, block rows
share important columns, which the grouped schedule exploits; the default) or
"random" (each block row independent).

    python benchmarks/bench_kernels.py --quick --out runs/bench_kernels          # ~1 min on 2 CPU cores
    python benchmarks/bench_kernels.py --out runs/bench_kernels                  # full sweep, GPU
    python benchmarks/bench_kernels.py --shapes 4096x4096 --m 1,256 --sparsity 0.5 --dtype fp32
    python benchmarks/bench_kernels.py --modeled-only --out runs/modeled_h200         # roofline only, any machine

Timers: on a GPU triton.testing.do_bench (median, p20, p80). Forward calls are timed as
a CUDA graph of 8 calls on 8 distinct copies of the weights (replay time / 8): no launch
overhead, as under CUDA graphs in a decoder, and every weight comes from HBM, as in a model
whose next layer has other weights. On a CPU, the median of --reps samples after --warmup
calls. The Triton interpreter is never timed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import BlockSparseWeight, block_sparse_linear
from ..kernels import roofline
from ..ops import torch_schedule
from . import common


LLAMA2_7B_SHAPES = tuple((n, k) for _, n, k in roofline.LLAMA2_7B_SHAPES)  # (N, K): q/k/v/o, gate/up, down
FULL_M = (1, 16, 64, 256, 1024, 2048, 4096)
FULL_SPARSITY = (0.5, 0.75, 0.9)
MODES = ("fwd", "fwd+bwd")
BASE_PROVIDERS = ("dense", "dense+lora", "torch_bsr", "ours", "ours+lora")
DENSE_BASELINE = {False: "dense", True: "dense+lora"}  # keyed by "has LoRA"
# Modeled names for the roofline: our providers map onto the model's kernels.
ROOFLINE_PROVIDER = {"dense": "dense", "dense+lora": "dense_lora", "ours": "sparse", "ours+lora": "sparse_lora"}

# Relative (Frobenius) error against the fp32 reference above which a result is flagged:
# a few units of the dtype's rounding over a K-long reduction.
MAX_REL_ERR = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
MODELED_ONLY = "modeled only"
# Forward calls captured per CUDA graph, each on its own copy of the weights.
GRAPH_CALLS = 8

COLUMNS = ("variant", "provider", "backend", "schedule", "shape", "N", "K", "M", "sparsity", "density",
           "union_density", "mask", "dtype", "mode", "lora_rank", "ms", "p20_ms", "p80_ms",
           "baseline", "baseline_ms", "speedup", "modeled_ms", "modeled_speedup", "rel_err",
           "status", "timer", "device_name", "torch", "triton", "python", "cuda", "config")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        try:
            n, k = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes wants NxK[,NxK...] (out x in), got {item!r}") from None
        shapes.append((n, k))
    return shapes


def parse_list(text: str, kind=float) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


# --------------------------------------------------------------------------
# Triton schedules (GPU)
# --------------------------------------------------------------------------
def parse_schedules(text: str) -> list[tuple[str, dict]]:
    """'G1,G2,G4nc' -> [(label, launcher kwargs)]: G = group size, suffix nc = natural row order."""
    variants = []
    for label in (t.strip() for t in text.split(",") if t.strip()):
        body, natural = (label[:-2], True) if label.endswith("nc") else (label, False)
        if not body.startswith("G") or not body[1:].isdigit():
            raise SystemExit(f"--schedules wants labels like G1,G2,G4,G8,G4nc; got {label!r}")
        variants.append((label, {"group_size": int(body[1:]), "cluster": not natural}))
    return variants


def kernel_schedule(case: "Case", m: int) -> tuple[str, int | None, float | None]:
    """The Triton launcher's default schedule for this M: (label, G, union density it
    computes over); G and the union are None for the decode schedule (plain BSR)."""
    try:
        from ..kernels import choose_group_size
        from ..kernels.configs import DECODE_MAX_M
    except ImportError:
        return "default", None, None
    if m <= DECODE_MAX_M:
        return "auto(G1)", None, None
    g = choose_group_size(case.sparse)
    return f"auto(G{g})", g, schedule_union(case, {"group_size": g, "cluster": True})


# --------------------------------------------------------------------------
# one case: a weight, an input, every provider
# --------------------------------------------------------------------------
class Case:
    """Operands for one (shape, sparsity, dtype): dense W, its block-sparse twin, LoRA factors."""

    def __init__(self, n, k, sparsity, dtype, device, mask_kind, block_size, lora_rank, seed):
        gen = torch.Generator().manual_seed(seed)
        self.n, self.k, self.sparsity = n, k, sparsity
        weight = (torch.randn(n, k, generator=gen) * k ** -0.5).to(device=device, dtype=dtype)
        self.mask, perm, row_group = common.mask_row_grouping(mask_kind, n // block_size, k // block_size,
                                                              sparsity, seed)
        self.sparse = BlockSparseWeight.from_dense(weight, self.mask.to(device), row_perm=perm, row_group=row_group)
        self.dense = weight  # the dense original: what an unpruned model multiplies
        self.masked_dense = self.sparse.to_dense()
        self.block_size = block_size
        self.lora_a = (torch.randn(lora_rank, k, generator=gen) * k ** -0.5).to(device=device, dtype=dtype)
        self.lora_b = (torch.randn(n, lora_rank, generator=gen) * 0.1).to(device=device, dtype=dtype)
        self.scaling = 2.0
        self._bsr = None
        self._bsr_error = None
        self.cache: dict = {}  # per-case memo (union densities)

    def replica(self) -> "Case":
        """The same operands with their own copy of the weights (for CUDA-graph timing)."""
        twin = copy.copy(self)
        twin.dense = self.dense.clone()
        twin.sparse = copy.deepcopy(self.sparse)  # with the kernels' look-up tables, if built
        return twin

    def bsr(self):
        if self._bsr is None and self._bsr_error is None:
            try:
                self._bsr = self.masked_dense.to_sparse_bsr((self.block_size, self.block_size))
            except (RuntimeError, NotImplementedError, TypeError) as err:
                self._bsr_error = err
        if self._bsr_error is not None:
            raise self._bsr_error
        return self._bsr


def forward_fn(provider: str, case: Case, x: torch.Tensor, backend: str, schedule_kwargs: dict | None):
    """A closure computing the provider's output for input x."""
    a, b, s = case.lora_a, case.lora_b, case.scaling
    if provider == "dense":
        return lambda: F.linear(x, case.dense)
    if provider == "dense+lora":
        def dense_lora():
            out = F.linear(x, case.dense)
            return out.addmm_(x @ a.t(), b.t(), alpha=s)
        return dense_lora
    if provider == "torch_bsr":
        w = case.bsr()
        return lambda: F.linear(x, w)
    lora = provider.startswith("ours+lora")
    if schedule_kwargs:
        from ..kernels import block_sparse_linear_triton

        if lora:
            return lambda: block_sparse_linear_triton(x, case.sparse, None, a, b, s, 0.0, **schedule_kwargs)
        return lambda: block_sparse_linear_triton(x, case.sparse, None, None, None, 1.0, 0.0, **schedule_kwargs)
    if lora:
        return lambda: block_sparse_linear(x, case.sparse, lora_a=a, lora_b=b, scaling=s, backend=backend)
    return lambda: block_sparse_linear(x, case.sparse, backend=backend)


def no_grad(fn):
    def call():
        with torch.no_grad():
            return fn()
    return call


@torch.no_grad()
def reference(provider: str, case: Case, x: torch.Tensor) -> torch.Tensor:
    """fp32 result the sparse providers must reproduce (masked W, LoRA if any)."""
    xf = x.detach().float()
    y = xf @ case.masked_dense.float().t()
    if "lora" in provider:
        y = y + case.scaling * (xf @ case.lora_a.float().t()) @ case.lora_b.float().t()
    return y


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.detach().float() - ref).norm() / ref.norm().clamp_min(1e-30))


def measure(provider, case, m, mode, backend, device, args, schedule_kwargs=None):
    """Time one provider; returns (ms triple, timer, rel_err, status)."""
    backward = mode == "fwd+bwd"
    gen = torch.Generator().manual_seed(args.seed + m)
    x = torch.randn(m, case.k, generator=gen).to(device=device, dtype=case.dense.dtype)
    lora = "lora" in provider
    grads: list[torch.Tensor] = []
    if backward:
        x.requires_grad_(True)
        grads.append(x)
        if lora:
            case.lora_a.requires_grad_(True)
            case.lora_b.requires_grad_(True)
            grads += [case.lora_a, case.lora_b]
    try:
        fwd = forward_fn(provider, case, x, backend, schedule_kwargs)
        if backward:
            y = fwd()
            grad_out = torch.randn_like(y)

            def fn():
                fwd().backward(grad_out)
            fn()  # the backward must also work before it is timed
        else:
            fn = no_grad(fwd)  # inference: no autograd bookkeeping
            y = fn()
        rel_err = math.nan if provider.startswith("dense") else relative_error(y, reference(provider, case, x))
        status = "ok"
        if not provider.startswith("dense") and not rel_err <= MAX_REL_ERR[case.dense.dtype]:  # NaN too
            status = f"MISMATCH: relative error {rel_err:.2e} against the fp32 reference"
            print(f"warning: {provider} {status}", file=sys.stderr)
        if device.type == "cuda":
            graph_calls = []
            # torch.sparse syncs with the host inside its kernels: never captured.
            if args.cuda_graph == "auto" and not backward and provider != "torch_bsr":
                graph_calls = [fn] + [no_grad(forward_fn(provider, case.replica(), x, backend, schedule_kwargs))
                                      for _ in range(GRAPH_CALLS - 1)]
            triple, timer = common.time_gpu(fn, grad_to_none=grads, graph_calls=graph_calls, rep_ms=args.rep_ms)
        else:
            triple = common.time_cpu(fn, reps=args.reps, warmup=args.warmup, grad_to_none=grads,
                                     clock=common.CPU_CLOCKS[args.cpu_clock])
            timer = f"cpu_{args.cpu_clock}"
    except Exception as err:  # report, keep sweeping: one provider failing must not stop the run
        first_line = (str(err).strip().splitlines() or [""])[0][:160]
        triple, timer, rel_err = (math.nan,) * 3, "", math.nan
        # torch.sparse lacking a kernel is a platform limit; our providers failing is a bug.
        kind = "unsupported" if provider == "torch_bsr" else "FAILED"
        status = f"{kind}: {type(err).__name__}: {first_line}"
    finally:
        for t in (case.lora_a, case.lora_b):
            t.requires_grad_(False)
            t.grad = None
    return triple, timer, rel_err, status


# --------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------
def run(args) -> Path:
    device = common.start_run(args)
    # A modeled-only run describes a GPU: its "auto" dtype is the GPU's.
    dtype = common.pick_dtype(args.dtype, torch.device("cuda") if args.modeled_only else device)
    env = common.environment(device)
    backend = "triton" if device.type == "cuda" else "torch"
    roofline_dev = common.roofline_device(env["device_name"]) if args.modeled_device == "auto" else (
        None if args.modeled_device == "none" else args.modeled_device)
    if args.modeled_only:
        if args.modeled_device == "none":
            raise SystemExit("--modeled-only needs a roofline device (--modeled-device h100|h200|a100)")
        roofline_dev = roofline_dev or "h200"
    modes = MODES if args.mode == "both" else (args.mode,)
    providers = [p for p in args.providers.split(",") if p]
    unknown = set(providers) - set(BASE_PROVIDERS)
    if unknown:
        raise SystemExit(f"--providers: unknown {sorted(unknown)}; choose from {', '.join(BASE_PROVIDERS)}")
    if backend == "triton":
        try:
            import blocksparse.kernels as kernels
            kernels.block_sparse_linear_triton  # noqa: B018  (presence check)
        except (ImportError, AttributeError) as err:
            print(f"warning: Triton kernels unavailable ({err}); the 'ours' rows will read FAILED",
                  file=sys.stderr)
    schedules = parse_schedules(args.schedules) if args.schedules else []
    if schedules and device.type != "cuda":
        print("note: --schedules selects Triton schedules; ignored on a CPU", file=sys.stderr)
        schedules = []
    config = (f"shapes={args.shapes} M={args.m} sparsity={args.sparsity} mask={args.mask} "
              f"block={args.block_size} lora_rank={args.lora_rank} backend={backend} "
              f"schedules={args.schedules or 'auto'} "
              f"reps={args.reps if device.type == 'cpu' else str(args.rep_ms) + 'ms'} "
              + (f"threads={torch.get_num_threads()} clock={args.cpu_clock} " if device.type == "cpu" else "")
              + f"cuda_graph={args.cuda_graph} modeled_device={roofline_dev}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = common.CsvLog(out / "bench_kernels.csv", COLUMNS)
    print(f"# {env['device_name']} | torch {env['torch']} triton {env['triton']} | {common.dtype_name(dtype)}")
    print(f"# {config}")
    started = time.perf_counter()
    union_info = {}
    for sparsity in parse_list(args.sparsity):
        for n, k in parse_shapes(args.shapes):
            if n % args.block_size or k % args.block_size:
                raise SystemExit(f"shape {n}x{k} is not divisible by the block size {args.block_size}")
            case = Case(n, k, sparsity, dtype, device, args.mask, args.block_size, args.lora_rank, args.seed)
            if device.type == "cuda" or roofline_dev:
                # Natural order is the storage order of the weight's block rows.
                union_info[(n, k, sparsity)] = common.union_densities(case.sparse.block_mask[case.sparse.row_perm.long()])
            for m in parse_list(args.m, int):
                for mode in modes:
                    if args.time_budget and time.perf_counter() - started > args.time_budget:
                        print(f"time budget of {args.time_budget:.0f} s spent; stopping the sweep",
                              file=sys.stderr)
                        write_summary(out, log.rows, env, config, union_info)
                        return out
                    run_one(log, case, m, mode, providers, schedules, backend, device, dtype, env,
                            config, roofline_dev, args)
                    write_autotune(out)  # as it goes: a step cut short by its time limit keeps them
            del case
    write_summary(out, log.rows, env, config, union_info)
    print(f"wrote {out / 'bench_kernels.csv'}, {out / 'bench_kernels.png'}, {out / 'bench_kernels.md'}")
    return out


@dataclass
class Variant:
    """One provider run under one schedule, and what its measurement gave."""
    provider: str
    schedule: str = ""                 # schedule label ("auto(G4)", "G2", "torch"; "" for dense)
    group_size: int | None = None      # grouped schedule's G (None: decode schedule / not ours)
    union: float | None = None         # union density the schedule computes over
    forced: dict | None = None         # launcher kwargs of a forced schedule
    ms: tuple = (math.nan,) * 3
    timer: str = ""
    rel_err: float = math.nan
    status: str = ""

    @property
    def label(self) -> str:
        return self.provider if self.forced is None else f"{self.provider}[{self.schedule}]"


def run_one(log, case, m, mode, providers, schedules, backend, device, dtype, env, config,
            roofline_dev, args):
    """Every provider (and schedule variant) on one (case, M, mode); rows go to the log."""
    backward = mode == "fwd+bwd"
    schedule, g, union = kernel_schedule(case, m) if device.type == "cuda" or roofline_dev else ("", None, None)
    if device.type != "cuda":  # what runs here; g and union still describe the GPU schedule for the model
        schedule = f"torch:{torch_schedule(case.sparse, m)}"
    variants = [Variant(p, schedule, g, union) if p.startswith("ours") else Variant(p) for p in providers]
    decode_max_m = 64
    if schedules and "ours" in providers:
        from ..kernels.configs import DECODE_MAX_M as decode_max_m
    for label, kwargs in schedules:
        if m > decode_max_m:  # decode always runs G=1; the variants are prefill/training schedules
            variants.append(Variant("ours", label, kwargs["group_size"], schedule_union(case, kwargs), kwargs))
    for v in variants:
        if args.modeled_only:
            v.status = MODELED_ONLY
        else:
            v.ms, v.timer, v.rel_err, v.status = measure(v.provider, case, m, mode, backend, device, args, v.forced)
    best = {}
    for v in variants:
        if v.provider in DENSE_BASELINE.values() and not math.isnan(v.ms[0]):
            best[v.provider] = min(best.get(v.provider, math.inf), v.ms[0])
    for v in variants:
        lora = "lora" in v.provider
        dense = v.provider.startswith("dense")
        baseline = DENSE_BASELINE[lora]
        base_ms = best.get(baseline, math.nan)
        rank = args.lora_rank if lora else 0
        modeled = modeled_base = math.nan
        if v.provider in ROOFLINE_PROVIDER:
            shared = dict(dtype=dtype, lora_rank=rank, device=roofline_dev, backward=backward)
            modeled = common.modeled_ms(ROOFLINE_PROVIDER[v.provider], m, case.n, case.k,
                                        density=1.0 if dense else case.sparse.density,
                                        group_size=v.group_size, union_density=v.union, **shared)
            modeled_base = common.modeled_ms(ROOFLINE_PROVIDER[baseline], m, case.n, case.k, density=1.0,
                                             group_size=None, union_density=None, **shared)
        row = {
            "variant": v.label, "provider": v.provider,
            "backend": backend if v.provider.startswith("ours") else "torch", "schedule": v.schedule,
            "shape": f"{case.n}x{case.k}", "N": case.n, "K": case.k, "M": m,
            "sparsity": case.sparsity, "density": case.sparse.density,
            "union_density": math.nan if dense or v.union is None else v.union,
            "mask": args.mask, "dtype": common.dtype_name(dtype), "mode": mode, "lora_rank": rank,
            "ms": v.ms[0], "p20_ms": v.ms[1], "p80_ms": v.ms[2],
            "baseline": baseline, "baseline_ms": base_ms, "speedup": base_ms / v.ms[0],
            "modeled_ms": modeled, "modeled_speedup": modeled_base / modeled,
            "rel_err": v.rel_err, "status": v.status, "timer": v.timer,
            **{key: env[key] for key in ("device_name", "torch", "triton", "python", "cuda")},
            "config": config,
        }
        log.append(row)
        print(f"{case.n}x{case.k} s={case.sparsity:<4} M={m:<5} {mode:<7} {v.label:<16} "
              + (f"{v.ms[0]:9.4f} ms  {common.fmt_speedup(row['speedup'])}" if not math.isnan(v.ms[0]) else "")
              + ("" if v.status == "ok" else f"  {v.status}"), flush=True)


def schedule_union(case: "Case", kwargs: dict) -> float:
    """Union density of a Triton schedule: the fraction of dense FLOPs it computes.

    Read from the kernels' own (cached) look-up table, so the clustering is
    computed once, by the kernels; falls back to recomputing it."""
    g, cluster = kwargs["group_size"], kwargs.get("cluster", True)
    key = ("union", g, cluster)
    if key not in case.cache:
        try:
            from ..kernels import get_schedule

            schedule = get_schedule(case.sparse, g, transposed=False, cluster=cluster)
            groups = schedule.group_rows.shape[0]
            case.cache[key] = int(schedule.group_ptr[-1]) / (groups * case.sparse.block_grid[1])
        except (ImportError, AttributeError):
            from ..grouping import cluster_block_rows, union_density

            stored = case.sparse.block_mask[case.sparse.row_perm.long()]
            perm = cluster_block_rows(stored, g) if cluster and g > 1 else None
            case.cache[key] = union_density(stored, g, perm)
    return case.cache[key]


# --------------------------------------------------------------------------
# plot and markdown
# --------------------------------------------------------------------------
def write_summary(out: Path, rows: list[dict], env: dict, config: str, union_info: dict) -> None:
    modeled_view = bool(rows) and all(r["status"] == MODELED_ONLY for r in rows)
    if modeled_view:  # plot and tabulate the model's numbers in place of measurements
        rows = [{**r, "ms": r["modeled_ms"], "speedup": r["modeled_speedup"], "status": "ok"}
                for r in rows if not math.isnan(r["modeled_ms"])]
    ok = [r for r in rows if r["status"] == "ok"]
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)] or ["fwd"]
    sparsities = sorted({r["sparsity"] for r in ok}) or [0.5]
    shapes = list(dict.fromkeys(r["shape"] for r in ok))
    variants = []
    for r in rows:
        if r["variant"] not in variants:
            variants.append(r["variant"])
    styles = ["-", "--", ":", "-."]

    def draw(fig, axes):
        for i, mode in enumerate(modes):
            for j, sparsity in enumerate(sparsities):
                ax = axes[i][j]
                for color, variant in enumerate(v for v in variants if not v.startswith("dense")):
                    for s_idx, shape in enumerate(shapes):
                        pts = sorted((r["M"], r["speedup"]) for r in ok if r["mode"] == mode
                                     and r["sparsity"] == sparsity and r["variant"] == variant
                                     and r["shape"] == shape)
                        if pts:
                            ax.plot(*zip(*pts), marker="o", color=f"C{color % 10}",
                                    linestyle=styles[s_idx % len(styles)],
                                    label=f"{variant} {shape}" if len(shapes) > 1 else variant)
                ax.axhline(1.0, color="gray", linewidth=0.8)
                ax.axhline(1.0 / (1.0 - sparsity), color="gray", linewidth=0.8, linestyle=":")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log", base=2)
                ax.set_xlabel("M (tokens)")
                ax.set_ylabel("speedup vs best dense")
                ax.set_title(f"{mode}, sparsity {sparsity:g}")
                if ax.has_data():
                    ax.legend(fontsize=6)
        where = "roofline model" if modeled_view else env["device_name"]
        fig.suptitle(f"block-sparse linear vs dense ({rows[0]['dtype'] if rows else ''}), {where}", fontsize=9)

    common.plot(out / "bench_kernels.png", draw, len(modes), len(sparsities))

    title = ("# Kernel roofline model (no measurement): block-sparse linear vs dense\n" if modeled_view
             else "# Kernel benchmark: block-sparse linear vs dense\n")
    parts = [title, common.environment_markdown(env, config),
             ("Each cell: the roofline model's time in ms; for the sparse providers, in parentheses, its "
              "speedup against dense (dense+lora for the LoRA providers). Nothing here was measured. "
              if modeled_view else
              "Each cell: median ms; for the sparse providers, in parentheses, the speedup against dense "
              "(dense+lora for the LoRA providers) measured in the same run. `–`: not supported here. "
              "`modeled`: the roofline model's speedup for `ours`. ")
             + "Plot: speedup vs M; dotted line = 1/density.\n"]
    for (n, k, s), unions in union_info.items():
        if unions:
            parts.append(f"- union density of the {n}x{k} mask at sparsity {s:g}, natural row order: "
                         + ", ".join(f"G={g}: {u:.2f}" for g, u in unions.items())
                         + " (the CSV's union_density column: the schedule actually run, clustered)")
    for mode in MODES:
        mode_rows = [r for r in rows if r["mode"] == mode]
        if not mode_rows:
            continue
        by_key = {(r["shape"], r["sparsity"], r["M"], r["variant"]): r for r in mode_rows}
        shape_order = list(dict.fromkeys(r["shape"] for r in rows))  # as given on the command line
        keys = sorted({(r["shape"], r["sparsity"], r["M"]) for r in mode_rows},
                      key=lambda t: (t[1], shape_order.index(t[0]), t[2]))
        table = []
        for shape, sparsity, m in keys:
            cells = [shape, f"{sparsity:g}", str(m)]
            for variant in variants:
                r = by_key.get((shape, sparsity, m, variant))
                if r is None or r["status"] != "ok":
                    cells.append("–")
                elif variant.startswith("dense"):
                    cells.append(common.fmt(r["ms"]))
                else:
                    cells.append(f"{common.fmt(r['ms'])} ({common.fmt_speedup(r['speedup'])})")
            ours = by_key.get((shape, sparsity, m, "ours"))
            modeled = ours["modeled_speedup"] if ours else math.nan
            cells.append(common.fmt_speedup(modeled))
            table.append(cells)
        parts.append(f"\n## {mode} ({mode_rows[0]['dtype']})\n")
        parts.append(common.markdown_table(["shape", "sparsity", "M"] + variants + ["modeled"], table))
    failures = sorted({f"{r['variant']} ({r['mode']}): {r['status']}" for r in rows if r["status"] != "ok"})
    if failures:
        parts.append("\nProblems (not measured, or flagged):\n" + "\n".join(f"- {f}" for f in failures))
    (out / "bench_kernels.md").write_text("\n".join(parts) + "\n")


def write_autotune(out: Path) -> None:
    """Under BLOCKSPARSE_AUTOTUNE=1 on a GPU: every candidate tile's time per launch key, as the
    launcher's autotuner measured it, in autotune.md and autotune.json (nothing otherwise)."""
    try:
        from ..kernels.block_sparse_linear import AUTOTUNE_RECORDS
    except ImportError:
        return
    if not AUTOTUNE_RECORDS:
        return
    (out / "autotune.json").write_text(json.dumps(AUTOTUNE_RECORDS, indent=1) + "\n")
    rows = []
    for r in AUTOTUNE_RECORDS:
        best = min(c["ms"] for c in r["candidates"])
        for c in r["candidates"]:
            rows.append([r["regime"] + (" dX" if r["transposed"] else ""), str(r["m"]), f"{r['n']}x{r['k']}",
                         str(r["group_size"]), f"{r['union']:.2f}", r["dtype"],
                         "+".join(name for name in ("bias", "lora", "dropout") if r[name]) or "-",
                         c["config"], common.fmt(c["ms"]), f"{c['ms'] / best:.2f}"])
    (out / "autotune.md").write_text(
        "# Autotuned tiles (BLOCKSPARSE_AUTOTUNE=1): each candidate's time, relative to the fastest\n\n"
        + common.markdown_table(["call", "M", "N x K", "G", "union", "dtype", "fused", "tile", "ms", "vs best"],
                                rows) + "\n")


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_kernels", help="output folder (CSV, PNG, markdown)")
    p.add_argument("--quick", action="store_true",
                   help="small sweep (~1 min on 2 CPU cores): one shape, M 1/16/256, sparsity 0.5/0.9")
    p.add_argument("--shapes", default=None, help="NxK[,NxK...] weight shapes (out x in); "
                   "default: Llama-2-7B's 4096x4096,11008x4096,4096x11008")
    p.add_argument("--m", default=None, help="token counts M, comma-separated (default 1,16,64,256,1024,2048,4096)")
    p.add_argument("--sparsity", default=None, help="block sparsities, comma-separated (default 0.5,0.75,0.9)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32")
    p.add_argument("--mode", default="both", choices=("fwd", "fwd+bwd", "both"))
    p.add_argument("--mask", default="structured", choices=common.MASK_KINDS,
                   help="block masks: Wanda-like column-correlated (default), independent random rows, or "
                        f"grouped (structured, {common.GROUPED_ROW_GROUP} block rows per group sharing their columns)")
    p.add_argument("--providers", default=",".join(BASE_PROVIDERS),
                   help=f"comma-separated subset of {','.join(BASE_PROVIDERS)}")
    p.add_argument("--schedules", default="",
                   help="GPU, M > 64: also time forced schedules of 'ours', e.g. G1,G2,G4,G8,G4nc "
                        "(G = block rows per program; nc = natural row order, no clustering)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU: torch threads (0: torch's default). On a shared machine 1 avoids "
                        "OpenMP threads waiting on each other behind other processes")
    p.add_argument("--reps", type=int, default=10, help="CPU: timed samples per measurement")
    p.add_argument("--warmup", type=int, default=2, help="CPU: warm-up calls per measurement")
    p.add_argument("--cpu-clock", default="wall", choices=tuple(common.CPU_CLOCKS),
                   help="CPU: wall time (default) or, with --threads 1, the process's CPU time "
                        "(robust to other jobs on a shared machine)")
    p.add_argument("--rep-ms", type=int, default=100, help="GPU: do_bench repetition time in ms")
    p.add_argument("--cuda-graph", default="auto", choices=("auto", "off"),
                   help="GPU: time forward calls as CUDA graph replays over weight copies (no launch "
                        "overhead; falls back to plain do_bench where capture fails); off: plain do_bench")
    p.add_argument("--modeled-device", default="auto",
                   help="roofline model's device: auto (the GPU measured, if modeled) | h100 | h200 | a100 | none")
    p.add_argument("--modeled-only", action="store_true",
                   help="time nothing: fill the roofline-modeled columns for the sweep (h200 unless "
                        "--modeled-device says otherwise), with the masks' real schedules and unions")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="stop starting new measurements after this many seconds (0: no limit)")
    p.add_argument("--seed", type=int, default=0)
    return p


def resolve_defaults(args) -> None:
    on_gpu = common.pick_device(args.device).type == "cuda"
    if args.quick:
        args.shapes = args.shapes or ("4096x4096" if on_gpu else "2048x2048")
        args.m = args.m or ("1,16,256,2048" if on_gpu else "1,16,256")
        args.sparsity = args.sparsity or "0.5,0.9"
        args.reps = min(args.reps, 5)
        args.rep_ms = min(args.rep_ms, 50)
    args.shapes = args.shapes or ",".join(f"{n}x{k}" for n, k in LLAMA2_7B_SHAPES)
    args.m = args.m or ",".join(map(str, FULL_M))
    args.sparsity = args.sparsity or ",".join(map(str, FULL_SPARSITY))


def main(argv=None) -> int:
    return common.main(build_parser, resolve_defaults, run, argv)


if __name__ == "__main__":
    sys.exit(main())
