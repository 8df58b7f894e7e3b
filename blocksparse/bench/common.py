"""Shared plumbing of the benchmarks: environment record, timers, masks, roofline, output files.

Both benchmarks write the same three files into `--out DIR`: a CSV with one
row per measurement (appended as it is measured, so a run cut short by a
timeout still leaves its rows), a PNG plot and a markdown summary. Every CSV
row carries the device name and the torch / triton / python versions.

Run as a script it prints the headline speedups of finished runs:

    python -m blocksparse.bench.common headline runs/gpu_check
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from ..dtypes import SHORT_NAMES, short_name, to_dtype

QUANTILES = (0.5, 0.2, 0.8)


# --------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------
def main(build_parser, resolve_defaults, run, argv=None) -> int:
    """A benchmark script's entry point: parse, fill defaults, run; --threads never leaks."""
    args = build_parser().parse_args(argv)
    resolve_defaults(args)
    warnings.filterwarnings("ignore", message=".*Sparse BSR tensor support is in beta.*")
    threads = torch.get_num_threads()
    try:
        torch.manual_seed(getattr(args, "seed", 0))
        run(args)
    finally:  # --threads must not leak into a caller (tests, `blocksparse bench`)
        torch.set_num_threads(threads)
    return 0


def package_version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except Exception:  # a missing or broken optional package is recorded, not fatal
        return "missing"
    return str(getattr(module, "__version__", "unknown"))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, str]:
    """Device and versions, stored in every CSV row and the markdown header."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        name = f"{cpu_name()} ({threads} thread{'' if threads == 1 else 's'})"
    return {
        "device": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "python": platform.python_version(),
        "cuda": str(torch.version.cuda) if device.type == "cuda" else "",
        # Other processes on a shared CPU slow every timing: recorded beside the numbers.
        "load_avg": " ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "",
    }


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but torch sees no CUDA device")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on a GPU and fp32 on a CPU (CPU bf16 GEMMs are slow paths)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in SHORT_NAMES.values():
        raise SystemExit(f"--dtype must be one of auto, {', '.join(SHORT_NAMES.values())}; got {name!r}")
    return to_dtype(name)


def dtype_name(dtype: torch.dtype) -> str:
    return short_name(dtype)


def check_not_interpreted() -> None:
    """The Triton interpreter is a correctness tool; timing it would be meaningless."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("note: TRITON_INTERPRET is set; benchmarks time the torch backend on CPU and "
              "never the interpreter", file=sys.stderr)


# --------------------------------------------------------------------------
# timers: (median, p20, p80) in milliseconds
# --------------------------------------------------------------------------
def time_cpu(fn: Callable[[], object], reps: int = 10, warmup: int = 2,
             min_sample_s: float = 2e-3, grad_to_none: Sequence[torch.Tensor] = (),
             clock: Callable[[], float] = time.perf_counter) -> tuple[float, float, float]:
    """Median and 20/80 % quantiles (ms) of `reps` samples after `warmup` calls.

    Calls shorter than `min_sample_s` are repeated inside a sample so that the
    clock's resolution and Python overhead do not dominate. `clock` may be
    time.process_time: with one thread, the CPU time a call used, which other
    processes on a shared machine do not inflate (waiting for memory still counts).
    """
    def call():
        for t in grad_to_none:
            t.grad = None
        fn()

    start = clock()
    for _ in range(max(1, warmup)):
        call()
    once = (clock() - start) / max(1, warmup)
    inner = max(1, math.ceil(min_sample_s / max(once, 1e-9)))
    samples = []
    for _ in range(max(1, reps)):
        t0 = clock()
        for _ in range(inner):
            call()
        samples.append((clock() - t0) / inner * 1e3)
    return quantiles(samples)


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0], ordered[0], ordered[0]
    cuts = statistics.quantiles(ordered, n=10, method="inclusive")  # deciles
    return statistics.median(ordered), cuts[1], cuts[7]


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (xs, ys) (>= 2 distinct xs)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


CPU_CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def check_cpu_clock(name: str, threads: int) -> None:
    if name not in CPU_CLOCKS:
        raise SystemExit(f"--cpu-clock must be one of {', '.join(CPU_CLOCKS)}, got {name!r}")
    if name == "process" and threads != 1:
        raise SystemExit("--cpu-clock process measures CPU time, which equals elapsed time only "
                         "with one thread: add --threads 1")


def start_run(args) -> torch.device:
    """Checks and settings every benchmark run shares; returns the device to time on."""
    check_not_interpreted()
    check_cpu_clock(args.cpu_clock, args.threads)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if device.type == "cuda" and args.cpu_clock != "wall":
        raise SystemExit("--cpu-clock process measures CPU time; drop it when timing on a GPU")
    return device


def time_gpu(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] = (),
             graph_calls: Sequence[Callable[[], object]] = (), rep_ms: int = 100
             ) -> tuple[tuple[float, float, float], str]:
    """triton.testing.do_bench quantiles in ms. Returns ((p50, p20, p80), timer name).

    With `graph_calls` (the same call on distinct copies of the weights), they are
    captured back to back in one CUDA graph and the time is replay / len(graph_calls):
    no launch overhead, as in a decoder run under CUDA graphs, and every weight read
    from HBM (do_bench flushes L2 before each replay; the copies are distinct).
    Falls back to plain do_bench of `fn` when capture fails.
    """
    from triton.testing import do_bench

    if graph_calls:
        try:
            return _time_cuda_graph(graph_calls, rep_ms), f"cuda_graph x{len(graph_calls)}"
        except Exception as err:  # not capturable (host sync, allocator): plain timing
            print(f"  cuda graph capture failed ({type(err).__name__}: {str(err)[:120]}); "
                  f"timing without it", file=sys.stderr)
            torch.cuda.synchronize()
    result = do_bench(fn, rep=rep_ms, grad_to_none=list(grad_to_none) or None, quantiles=list(QUANTILES))
    return tuple(float(v) for v in result), "do_bench"


def _time_cuda_graph(calls: Sequence[Callable[[], object]], rep_ms: int) -> tuple[float, float, float]:
    from triton.testing import do_bench

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (autotuning, allocations) outside the graph
        for _ in range(2):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    result = do_bench(graph.replay, rep=rep_ms, quantiles=list(QUANTILES))
    return tuple(float(v) / len(calls) for v in result)


# --------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------
MASK_KINDS = ("structured", "random", "grouped")
# Rows per group of the "grouped" masks (a fully shared row grouping, as `prune --row-group 8`).
GROUPED_ROW_GROUP = 8
# Column-importance spread of the structured masks, in units of the per-block
# noise: with 1.6, 50 % masks of a 256 x 256 block grid have natural-order union
# densities ~0.63 / 0.74 / 0.81 for G = 2 / 4 / 8, close to real Wanda masks of
# the embedded model (0.62 / 0.73 / 0.81, DESIGN.md section 5).
STRUCTURED_COLUMN_SPREAD = 1.6


def block_mask(kind: str, rows: int, cols: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    """bool [rows, cols], every block row keeping round((1 - sparsity) * cols) blocks.

    grouped:    the structured scores, masked with GROUPED_ROW_GROUP rows per group
                sharing their columns (`grouped_block_mask`; its row permutation comes
                from `mask_row_grouping`).
    random:     each block row picks its blocks uniformly at random.
    structured: Wanda-like. A block's score is a shared per-column importance
                (the ||X_j|| factor of Wanda) times per-block noise, and each block
                row keeps its top blocks; block rows therefore agree on the
                important columns, as real Wanda masks do, which is what the
                grouped (G > 1) kernel schedule exploits.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"mask kind must be one of {MASK_KINDS}, got {kind!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if kind == "grouped":
        return mask_row_grouping(kind, rows, cols, sparsity, seed)[0]
    gen = torch.Generator().manual_seed(seed)
    score = torch.randn(rows, cols, generator=gen)
    if kind == "structured":
        score = score + STRUCTURED_COLUMN_SPREAD * torch.randn(cols, generator=gen)[None, :]
    keep = max(1, cols - int(round(sparsity * cols)))
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    mask.scatter_(1, score.topk(keep, dim=1).indices, True)
    return mask


def mask_row_grouping(kind: str, rows: int, cols: int, sparsity: float, seed: int = 0):
    """(mask, row_perm, row_group) of a mask kind; ungrouped kinds: (mask, None, 1)."""
    if kind != "grouped":
        return block_mask(kind, rows, cols, sparsity, seed), None, 1
    from ..masks import grouped_block_mask

    gen = torch.Generator().manual_seed(seed)
    score = torch.randn(rows, cols, generator=gen) + STRUCTURED_COLUMN_SPREAD * torch.randn(cols, generator=gen)
    keep = max(1, cols - int(round(sparsity * cols)))
    group = min(GROUPED_ROW_GROUP, rows)
    mask, perm = grouped_block_mask(score.exp(), keep, group, keep)  # a positive, Wanda-like score
    return mask, perm, group


def union_densities(mask: torch.Tensor, groups: Iterable[int] = (2, 4, 8)) -> dict[int, float]:
    """{G: union density in natural block-row order}: the compute fraction of the grouped
    schedule with G block rows per program before clustering (cheap; clustering only lowers
    it). Empty if the kernels' clustering module is unavailable."""
    try:
        from ..grouping import union_density
    except ImportError:
        return {}
    return {g: union_density(mask, g) for g in groups}


# --------------------------------------------------------------------------
# roofline (blocksparse/kernels/roofline.py)
# --------------------------------------------------------------------------
ROOFLINE_DEVICES = ("h100", "h200", "a100")


def roofline_device(device_name: str) -> str | None:
    """The roofline model's name for a GPU, or None (CPUs and unknown GPUs)."""
    lowered = device_name.lower()
    return next((d for d in ROOFLINE_DEVICES if d in lowered), None)


def modeled_ms(provider: str, m: int, n: int, k: int, *, density: float, group_size: int | None,
               union_density: float | None, dtype: torch.dtype, lora_rank: int, device: str | None,
               backward: bool) -> float:
    """Roofline-predicted time in ms (`blocksparse.kernels.roofline.predict`), NaN where there is no model.

    provider: the roofline's name (dense, dense_lora, sparse, sparse_lora). group_size and
    union_density describe the grouped schedule actually run (None: the model picks G and
    uses its measured union densities).
    """
    if device is None:
        return math.nan
    try:
        from ..kernels.roofline import predict
    except ImportError:
        return math.nan
    kwargs = dict(density=density, dtype=dtype, lora_rank=lora_rank, device=device, backward=backward)
    if group_size is not None:
        kwargs.update(group_size=group_size, union_density=union_density)
    try:
        return float(predict(provider, m, n, k, **kwargs).time_s) * 1e3
    except (ValueError, KeyError):  # a case the model does not cover
        return math.nan


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------
class CsvLog:
    """Append rows to `path` as they are measured; the header is the first row's keys."""

    def __init__(self, path: Path, columns: Sequence[str]):
        self.path = Path(path)
        self.columns = list(columns)
        self.rows: list[dict] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writeheader()

    def append(self, row: dict) -> None:
        missing = set(self.columns) - set(row)
        if missing:
            raise KeyError(f"CSV row lacks columns {sorted(missing)}")
        self.rows.append(row)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(
                {key: _cell(row[key]) for key in self.columns})


def _cell(value):
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return value


def write_json(path: str | os.PathLike, data) -> None:
    """Write `data` as JSON to a temporary file beside `path`, then rename it over `path`:
    an interrupted write leaves the earlier file (or none), never half of one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}g}"


def fmt_speedup(value: float) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.3f}x"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def environment_markdown(env: dict[str, str], config: str) -> str:
    lines = [f"- device: **{env['device_name']}**",
             f"- torch {env['torch']}, triton {env['triton']}, python {env['python']}"
             + (f", CUDA {env['cuda']}" if env.get("cuda") else "")]
    if env.get("device") == "cpu" and env.get("load_avg"):
        lines.append(f"- load average at start (1/5/15 min): {env['load_avg']}")
    lines.append(f"- config: `{config}`")
    return "\n".join(lines) + "\n"


def plot(path: Path, draw: Callable, nrows: int = 1, ncols: int = 1, width: float = 5.0,
         height: float = 3.6) -> bool:
    """Draw `draw(fig, axes)` into a PNG with matplotlib's Agg backend; skipped (with a
    warning) where matplotlib is missing, so the CSV and markdown still get written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"warning: matplotlib is missing; {Path(path).name} not drawn", file=sys.stderr)
        return False
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    try:
        draw(fig, axes)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return True


# --------------------------------------------------------------------------
# headline numbers of a finished gpu_check run
# --------------------------------------------------------------------------
def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def headline(folder: Path) -> str:
    """Decode M=1/16, prefill M=2048 and fwd+bwd speedups at 50 % from the kernel CSVs under
    `folder`, the autotuned tiles' times, and every sparse-vs-dense row of the model CSVs."""
    folder = Path(folder)
    lines = []
    for path in sorted(folder.rglob("bench_kernels.csv")):
        rows = [r for r in read_csv(path) if abs(_float(r["sparsity"]) - 0.5) < 1e-9]
        found = []
        for label, mode, m, provider in (("decode M=1", "fwd", 1, "ours"),
                                         ("decode M=16", "fwd", 16, "ours"),
                                         ("prefill M=2048", "fwd", 2048, "ours"),
                                         ("fwd+bwd M=2048, LoRA", "fwd+bwd", 2048, "ours+lora")):
            for r in rows:
                if r["mode"] == mode and int(r["M"]) == m and r["provider"] == provider:
                    found.append([label, r["shape"], r["dtype"], fmt(_float(r["ms"])),
                                  fmt(_float(r["baseline_ms"])), fmt_speedup(_float(r["speedup"])),
                                  fmt_speedup(_float(r["modeled_speedup"]))])
        if found:
            lines.append(f"kernels ({path.relative_to(folder)}), sparsity 0.5, ours vs dense (with LoRA: vs dense+lora):")
            lines.append(markdown_table(["case", "shape", "dtype", "ours ms", "baseline ms", "speedup",
                                         "modeled"], found))
    for path in sorted(folder.rglob("autotune.md")):  # the tiles the autotuner timed (GPU)
        lines.append(f"autotuned tiles ({path.relative_to(folder)}):")
        lines.append(path.read_text().split("\n", 2)[2].strip())
    for path in sorted(folder.rglob("bench_model.csv")):
        found = [[r["metric"], r["mode"], r["batch"], r["tokens"], r["unit"], fmt(_float(r["dense_value"]), 4),
                  fmt(_float(r["value"]), 4), fmt_speedup(_float(r["speedup"]))]
                 for r in read_csv(path) if r["variant"] != "dense"]
        if found:
            lines.append(f"model ({path.relative_to(folder)}), sparse vs dense:")
            lines.append(markdown_table(["metric", "mode", "batch", "tokens", "unit", "dense", "sparse", "speedup"],
                                        found))
    return "\n".join(lines) if lines else "no benchmark CSV found under " + str(folder)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "headline":
        raise SystemExit("usage: python -m blocksparse.bench.common headline FOLDER")
    print(headline(Path(sys.argv[2])))
