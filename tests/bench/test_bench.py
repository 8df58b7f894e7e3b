"""The benchmarks' quick paths on tiny shapes: files written, columns present, numbers sane.

No timing is asserted (speed is what the benchmarks measure, never the tests);
what is checked is the plumbing: every provider row, consistent speedups,
correct results of the sparse providers, and the GPU script's CPU dry run.
"""

import csv
import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
BENCHMARKS = {"_common": "common", "bench_kernels": "kernels", "bench_model": "model"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_script(name: str):
    """The benchmark module behind benchmarks/<name>.py."""
    return importlib.import_module(f"blocksparse.bench.{BENCHMARKS[name]}")


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_outputs(folder: Path, stem: str) -> list[dict]:
    for suffix in ("csv", "png", "md"):
        assert (folder / f"{stem}.{suffix}").is_file(), f"{stem}.{suffix} missing in {folder}"
    assert (folder / f"{stem}.png").read_bytes()[:8] == PNG_MAGIC
    return read_rows(folder / f"{stem}.csv")


def test_block_masks_keep_the_same_count_per_row_and_structure_shares_columns():
    common = load_script("_common")
    for kind in common.MASK_KINDS:
        mask = common.block_mask(kind, 64, 48, 0.75, seed=3)
        assert mask.shape == (64, 48) and mask.dtype == torch.bool
        assert mask.sum(dim=1).tolist() == [12] * 64
    # Column-correlated masks: block rows agree on columns, so groups of rows have smaller unions.
    def union_density(mask, group):
        return mask.view(-1, group, mask.shape[1]).any(dim=1).float().mean().item()

    structured = common.block_mask("structured", 256, 256, 0.5)
    random = common.block_mask("random", 256, 256, 0.5)
    assert union_density(random, 4) > 0.9  # 1 - 0.5**4 expected
    assert union_density(structured, 4) < 0.8
    with pytest.raises(ValueError, match="mask kind"):
        common.block_mask("wanda", 4, 4, 0.5)
    # Grouped masks: every group of GROUPED_ROW_GROUP rows (in row_perm order) shares its columns.
    mask, perm, group = common.mask_row_grouping("grouped", 64, 48, 0.75, seed=3)
    assert group == common.GROUPED_ROW_GROUP and sorted(perm.tolist()) == list(range(64))
    assert (mask[perm].view(-1, group, 48).any(dim=1).sum(dim=1) == 12).all()


def test_bench_kernels_quick_path_writes_csv_png_markdown(tmp_path):
    bench = load_script("bench_kernels")
    out = tmp_path / "kernels"
    assert bench.main(["--quick", "--out", str(out), "--device", "cpu", "--shapes", "32x64",
                       "--m", "1,40", "--sparsity", "0.5", "--reps", "2", "--warmup", "1", "--threads", "1"]) == 0
    rows = assert_outputs(out, "bench_kernels")
    assert list(rows[0]) == list(bench.COLUMNS)
    # 2 M x 2 modes x 5 providers, each row tagged with the device and versions.
    assert len(rows) == 2 * 2 * len(bench.BASE_PROVIDERS)
    assert {r["provider"] for r in rows} == set(bench.BASE_PROVIDERS)
    assert {r["torch"] for r in rows} == {torch.__version__}
    for r in rows:
        assert r["dtype"] == "fp32" and r["shape"] == "32x64" and r["sparsity"] == "0.5"
        if r["status"] != "ok":  # only torch.sparse may be unsupported on a platform
            assert r["provider"] == "torch_bsr" and r["status"].startswith("unsupported"), r
            continue
        ms, p20, p80 = float(r["ms"]), float(r["p20_ms"]), float(r["p80_ms"])
        assert 0 < p20 <= ms <= p80 and math.isfinite(p80)
        base = float(r["baseline_ms"])
        assert r["baseline"] == ("dense+lora" if "lora" in r["provider"] else "dense")
        assert float(r["speedup"]) == pytest.approx(base / ms, rel=1e-4)
        if r["provider"].startswith("dense"):
            assert float(r["speedup"]) == pytest.approx(1.0, rel=1e-4)
        else:  # the sparse providers computed the masked product (+ LoRA)
            assert float(r["rel_err"]) < 1e-5
            assert float(r["density"]) == pytest.approx(0.5)
    # Both small-M (stored blocks only) and large-M torch backend paths ran ok.
    assert {(r["M"], r["mode"]) for r in rows if r["provider"] == "ours" and r["status"] == "ok"} == {
        ("1", "fwd"), ("1", "fwd+bwd"), ("40", "fwd"), ("40", "fwd+bwd")}
    markdown = (out / "bench_kernels.md").read_text()
    assert "| shape | sparsity | M | dense | dense+lora | torch_bsr | ours | ours+lora | modeled |" in markdown
    assert "## fwd+bwd (fp32)" in markdown and "device:" in markdown


def test_weight_replicas_for_graph_timing_are_distinct_copies():
    """CUDA-graph timing cycles through copies of the weights so none is served from L2."""
    bench = load_script("bench_kernels")
    case = bench.Case(64, 128, 0.5, torch.float32, torch.device("cpu"), "structured", 16, 8, 0)
    twin = case.replica()
    x = torch.randn(3, 128)
    assert twin.dense.data_ptr() != case.dense.data_ptr()
    assert twin.sparse.values.data_ptr() != case.sparse.values.data_ptr()
    for provider in ("dense", "dense+lora", "ours", "ours+lora"):
        original = bench.no_grad(bench.forward_fn(provider, case, x, "torch", None))()
        copied = bench.no_grad(bench.forward_fn(provider, twin, x, "torch", None))()
        assert torch.equal(original, copied), provider


def test_bench_kernels_rejects_bad_shapes_and_schedules(tmp_path):
    bench = load_script("bench_kernels")
    with pytest.raises(SystemExit, match="NxK"):
        bench.main(["--out", str(tmp_path), "--device", "cpu", "--shapes", "64by64"])
    with pytest.raises(SystemExit, match="G1,G2"):
        bench.parse_schedules("G2,four")
    assert bench.parse_schedules("G2,G4nc") == [("G2", {"group_size": 2, "cluster": True}),
                                                ("G4nc", {"group_size": 4, "cluster": False})]


def test_bench_model_quick_path_on_a_tiny_llama(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    bench = load_script("bench_model")
    monkeypatch.setenv("BLOCKSPARSE_BACKEND", "triton")  # must be overridden on a CPU, then restored
    out = tmp_path / "model"
    assert bench.main(["--quick", "--out", str(out), "--device", "cpu", "--config", "tiny", "--reps", "1", "--threads", "1",
                       "--prompt-len", "16", "--decode-prompt", "8", "--new-tokens", "2",
                       "--train-len", "16"]) == 0
    assert os.environ["BLOCKSPARSE_BACKEND"] == "triton"
    rows = assert_outputs(out, "bench_model")
    assert list(rows[0]) == list(bench.COLUMNS)
    got = {(r["metric"], r["variant"]) for r in rows}
    assert got == {(m, v) for m in ("prefill", "decode", "finetune_step") for v in ("dense", "sparse")}
    for r in rows:
        value, dense = float(r["value"]), float(r["dense_value"])
        assert value > 0 and math.isfinite(value) and r["status"] == "ok"
        if r["variant"] == "dense":
            assert float(r["speedup"]) == 1.0 and float(r["density"]) == 1.0
        else:
            expected = value / dense if r["unit"] == "tokens/s" else dense / value
            assert float(r["speedup"]) == pytest.approx(expected, rel=1e-4)
            assert float(r["density"]) == pytest.approx(0.5)
    markdown = (out / "bench_model.md").read_text()
    assert "| metric | mode | batch | tokens | unit | dense | sparse | speedup |" in markdown


def test_static_cache_decoder_matches_generate(tiny_llama):
    """The decode loop timed under CUDA graphs produces greedy generate's tokens (checked eagerly)."""
    bench = load_script("bench_model")
    model = tiny_llama
    prompt = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                                  do_sample=False, pad_token_id=0)[:, 7:]
        decoder = bench.StaticDecoder(model, prompt, 5)
        decoder.prefill()
        tokens = [decoder.step_ids.clone()]
        for _ in range(4):
            decoder.advance(decoder.step())
            tokens.append(decoder.step_ids.clone())
    assert torch.equal(torch.cat(tokens, dim=1), expected)


def test_bench_cli_runs_the_kernel_benchmark(tmp_path):
    from blocksparse.commands import main

    out = tmp_path / "cli"
    code = main(["bench", "kernels", "--out", str(out), "--args",
                 "--device cpu --shapes 32x32 --m 2 --sparsity 0.5 --mode fwd --providers dense,ours --reps 1"])
    assert code == 0
    rows = assert_outputs(out, "bench_kernels")
    assert [r["provider"] for r in rows] == ["dense", "ours"]
    assert main(["bench", "--out", str(out), "--args", "--m 1"]) == 2  # --args needs one target
    assert main(["bench", "recovery", "--quick", "--out", str(out)]) == 2  # the quality benchmarks have no --quick


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)


def test_gpu_check_dry_run_on_cpu(tmp_path):
    # Three steps keep it short (bench_model's quick path is tested above); all run in `make gpu-check`.
    out = tmp_path / "gpu_check"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_STEPS": "env,kernels,tiles"}
    env.pop("OUT", None)
    result = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run", str(out)], env=env,
                            capture_output=True, text=True, timeout=300)
    summary = (out / "summary.md").read_text()
    for step in ("env", "kernels", "tiles"):
        assert f"| {step} | ok |" in summary, result.stdout[-3000:]
    assert "| tests |" not in summary and "| model |" not in summary
    assert "| decode M=1 | 64x128 | fp32 |" in summary  # the headline table read the sweep's CSV
    assert result.returncode == 0
    for path in ("kernels/bench_kernels.csv", "kernels/bench_kernels.png", "logs/kernels.log", "gpu_check.log",
                 "tiles/bench_kernels.csv", "logs/tiles.log"):
        assert (out / path).is_file(), path


def test_autotune_records_written_as_a_table(tmp_path, monkeypatch):
    """What the autotuner measured (GPU, BLOCKSPARSE_AUTOTUNE=1) lands in autotune.md/json;
    without records no file appears."""
    pytest.importorskip("triton")
    import blocksparse.kernels.block_sparse_linear as bsl

    bench = load_script("bench_kernels")
    monkeypatch.setattr(bsl, "AUTOTUNE_RECORDS", [])
    bench.write_autotune(tmp_path)
    assert not (tmp_path / "autotune.md").exists()
    monkeypatch.setattr(bsl, "AUTOTUNE_RECORDS", [{
        "regime": "prefill", "m": 2048, "n": 4096, "k": 4096, "group_size": 8, "union": 0.5, "transposed": True,
        "dtype": "bfloat16", "bias": False, "lora": True, "dropout": True, "chosen": "256x128 KC=4 w8 s5",
        "candidates": [{"config": "128x128 KC=4 w8 s5", "ms": 0.5}, {"config": "256x128 KC=4 w8 s5", "ms": 0.4}]}])
    bench.write_autotune(tmp_path)
    table = (tmp_path / "autotune.md").read_text()
    assert "| prefill dX | 2048 | 4096x4096 | 8 | 0.50 | bfloat16 | lora+dropout | 128x128 KC=4 w8 s5 |" in table
    assert table.rstrip().endswith("| 1.00 |") and "| 1.25 |" in table
    headline = load_script("_common").headline(tmp_path)
    assert "autotuned tiles (autotune.md):" in headline and "| 256x128 KC=4 w8 s5 |" in headline
