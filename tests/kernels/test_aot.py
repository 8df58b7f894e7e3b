"""blocksparse.kernels.aot (= benchmarks/compile_report.py): ahead-of-time compilation for sm_80 / sm_90
without a GPU.

The report runs in a subprocess without TRITON_INTERPRET (which `make test` sets and
which turns @triton.jit functions into uncompilable interpreted ones). Compiling
takes seconds per config, so the real kernels are checked on one config per
(kernel, regime) of the decode and prefill regimes; `python -m blocksparse.kernels.aot`
compiles them all.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

STAND_IN = textwrap.dedent('''
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _tile_dot_kernel(A, B, C, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
        a = tl.load(A + rm[:, None] * BK + rk[None, :])
        b = tl.load(B + rk[:, None] * BN + rn[None, :])
        tl.store(C + rm[:, None] * BN + rn[None, :], tl.dot(a, b))

    @triton.jit
    def _scale_kernel(X, Y, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs) * 2)

    def compile_specs(dtype=torch.bfloat16, arch=90):
        dt = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
        dot_sig = {"A": f"*{dt}", "B": f"*{dt}", "C": "*fp32", "BM": "constexpr", "BN": "constexpr",
                   "BK": "constexpr"}
        return [
            {"kernel": "_tile_dot_kernel", "regime": "prefill", "fn": _tile_dot_kernel, "signature": dot_sig,
             "constexprs": {"BM": 64, "BN": 64, "BK": 32}, "num_warps": 4, "num_stages": 2},
            # No MMA at all: must be reported as failing the sm_90 wgmma requirement.
            {"kernel": "_scale_kernel", "regime": "prefill", "fn": _scale_kernel,
             "signature": {"X": f"*{dt}", "Y": f"*{dt}", "BLOCK": "constexpr"},
             "constexprs": {"BLOCK": 256}, "num_warps": 4, "num_stages": 1},
        ]
''')


def load_report_module():
    from blocksparse.kernels import aot  # importing it compiles nothing and imports no kernel

    return aot


def run_report(args, tmp_path, extra_path=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), extra_path, env.get("PYTHONPATH")]))
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "blocksparse.kernels.aot", *args, "--json", str(out)], env=env,
                          cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


def row(**overrides):
    base = {"kernel": "_k", "regime": "prefill", "dtype": "bf16", "arch": "sm_90", "config": "BM=128 w8 s3",
            "constexprs": {"BM": 128}, "status": "ok", "registers": 120, "spill_stores": 0, "spill_loads": 0, "stack_bytes": 0,
            "shared_bytes": 60000, "num_warps": 8, "wgmma": 4, "wgmma_n": 128, "mma_sync": 0, "cp_async_16": 16,
            "compile_s": 1.0}
    base.update(overrides)
    return base


def test_failure_rules():
    report = load_report_module()
    assert report.failures(row()) == []
    assert report.failures(row(spill_stores=8, spill_loads=8)) == ["spills 8 B stores / 8 B loads"]
    assert report.failures(row(spill_stores=8, spill_loads=8, regime="repair")) == []  # runs only on NaN/inf
    # 200 registers x 8 warps = 51200 of 65536: one CTA per SM.
    assert report.ctas_per_sm(row(registers=200, num_warps=8, shared_bytes=50000)) == 1
    assert report.failures(row(registers=200, num_warps=8, shared_bytes=50000)) == [
        "1 CTA/SM in a compute-bound config (200 registers x 8 warps, 50000 B shared)"]
    assert report.failures(row(registers=200, num_warps=8, shared_bytes=50000, regime="decode")) == []
    wide = dict(registers=216, num_warps=8, shared_bytes=150000, constexprs={"BM": 256})  # one CTA by design
    assert report.failures(row(**wide)) == []
    assert report.failures(row(**wide, arch="sm_80", wgmma=0, mma_sync=8)) != []
    assert report.failures(row(**dict(wide, num_warps=4))) != []
    assert report.ctas_per_sm(row(registers=128, num_warps=4, shared_bytes=73888)) == 3  # shared memory binds
    assert report.ctas_per_sm(row(registers=60, num_warps=4, shared_bytes=1000)) == 8    # 64 regs x 128 threads
    assert report.failures(row(wgmma=0, mma_sync=8)) == ["no wgmma in a compute-bound config on sm_90"]
    assert report.failures(row(wgmma=0, mma_sync=8, regime="decode")) == []
    assert report.failures(row(wgmma=0, mma_sync=8, regime="backward", constexprs={"BM": 16})) == []
    assert report.failures(row(wgmma=0, mma_sync=8, constexprs={})) != []
    assert report.failures(row(arch="sm_80", wgmma=0, mma_sync=8)) == []
    grouped = {"BM": 128, "BS": 16, "G": 8}
    assert report.failures(row(constexprs=grouped)) == []
    assert report.failures(row(constexprs=grouped, wgmma_n=64)) == ["widest wgmma N=64, the group tile is 128 wide"]
    assert report.failures(row(constexprs=grouped, cp_async_16=0)) == [
        "no 16-byte cp.async: the tile loads are not pipelined"]
    assert report.failures(row(constexprs=grouped, cp_async_16=0, regime="decode")) == []
    assert report.failures(row(arch="sm_80", shared_bytes=200000)) == ["shared memory 200000 B > 166912 B"]
    assert report.failures(row(status="error: CompilationError: boom")) == ["error: CompilationError: boom"]
    table = report.markdown([row(), row(status="error: X: y")])
    assert "| pass |" in table and "| error: X: y |" in table and "| 4 (n128) | 0 | 16 |" in table


def test_stand_in_kernels(tmp_path):
    (tmp_path / "stand_in_kernels.py").write_text(STAND_IN)
    proc, report = run_report(["--specs", "stand_in_kernels:compile_specs"], tmp_path, str(tmp_path))
    assert proc.returncode == 1, proc.stderr[-3000:]          # the scale kernel lacks wgmma on sm_90
    rows = {(r["kernel"], r["arch"]): r for r in report["rows"]}
    assert set(rows) == {(k, a) for k in ("_tile_dot_kernel", "_scale_kernel") for a in ("sm_80", "sm_90")}
    assert all(r["status"] == "ok" for r in rows.values())
    dot90, dot80 = rows[("_tile_dot_kernel", "sm_90")], rows[("_tile_dot_kernel", "sm_80")]
    assert dot90["wgmma"] > 0 and dot90["failures"] == []
    assert dot80["mma_sync"] > 0 and dot80["wgmma"] == 0 and dot80["failures"] == []
    assert 0 < dot80["registers"] <= 255 and dot80["spill_stores"] == 0
    assert dot90["shared_bytes"] > 0
    assert rows[("_scale_kernel", "sm_90")]["failures"] == ["no wgmma in a compute-bound config on sm_90"]
    assert rows[("_scale_kernel", "sm_80")]["failures"] == []
    assert report["passed"] is False


def test_project_kernels_subset(tmp_path):
    pytest.importorskip("blocksparse.kernels")
    proc, report = run_report(["--regime", "prefill", "decode", "--max-per-regime", "1"], tmp_path)
    assert report is not None, proc.stderr[-3000:]
    failing = [(r["kernel"], r["regime"], r["arch"], r["failures"]) for r in report["rows"] if r["failures"]]
    assert failing == [] and proc.returncode == 0, (failing, proc.stderr[-3000:])
    regimes = {(r["regime"], r["arch"]) for r in report["rows"]}
    assert regimes == {(g, a) for g in ("prefill", "decode") for a in ("sm_80", "sm_90")}
    prefill90 = [r for r in report["rows"] if r["regime"] == "prefill" and r["arch"] == "sm_90"]
    assert all(r["wgmma"] > 0 for r in prefill90)


def test_select_drops_duplicates_and_caps_per_regime():
    report = load_report_module()
    spec = lambda regime, bm: {"kernel": "_k", "regime": regime, "constexprs": {"BM": bm}, "num_warps": 4,
                               "num_stages": 3}
    specs = [spec("decode", 16), spec("decode", 16), spec("decode", 64), spec("prefill", 128)]
    assert [s["constexprs"]["BM"] for s in report.select(specs, None, None)] == [16, 64, 128]
    assert [s["constexprs"]["BM"] for s in report.select(specs, ["decode"], 1)] == [16]


def test_compile_specs_are_complete():
    """The compile report compiles these ahead of time; their shape must match the kernels."""
    pytest.importorskip("triton")
    from blocksparse.kernels.aot import compile_specs

    for arch in (80, 90):
        specs = compile_specs(torch.bfloat16, arch)
        assert {s["kernel"] for s in specs} == {"_bsl_matmul_kernel", "_lora_shrink_kernel",
                                                "_lora_grad_a_kernel", "_dropout_keep_kernel", "_sdd_kernel"}
        assert {"decode", "prefill", "backward", "lora_shrink"} <= {s["regime"] for s in specs}
        for spec in specs:
            assert list(spec["signature"]) == list(spec["fn"].arg_names)
            constexprs = {name for name, kind in spec["signature"].items() if kind == "constexpr"}
            assert constexprs == set(spec["constexprs"]), spec["kernel"]
            assert spec["num_warps"] in (4, 8) and spec["num_stages"] >= 1
