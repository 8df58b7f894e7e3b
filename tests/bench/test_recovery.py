"""The recovery-curve benchmark end to end on the tiny model: one-shot checkpoint, sweep, curves, report."""

import json

import pytest

from blocksparse.bench import recovery
from blocksparse.integration.recipes import RECOVERY_RECIPES


def test_recipes_train_their_curves_and_the_report_names_each(tiny_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "recovery"
    argv = ["--out", str(out), "--model", str(tiny_dir), "--dataset", str(corpus_file), "--sparsity", "0.3",
            "--recipes", "seed,values_kd_hidden", "--budgets", "64,128", "--sweep", "0.5,2", "--seqlen", "32",
            "--eval-windows", "2", "--train-seqlen", "32"]
    assert recovery.main(argv) == 0
    assert (out / "one_shot" / "blocksparse_config.json").is_file()
    base = json.loads((out / "baseline.json").read_text())
    assert base["dense"] > 1 and base["one_shot"] > 1 and base["windows"] == 2
    for name in ("seed", "values_kd_hidden"):
        result = json.loads((out / name / "result.json").read_text())
        assert [p["tokens"] for p in result["points"]] == [64, 128]
        assert all(p["ppl"] > 1 and p["train_s"] > 0 for p in result["points"])
        # The curve runs at the sweep's best rate on the validation windows.
        assert len(result["sweep"]) == 2
        assert result["lr"] == min(result["sweep"], key=lambda s: s["validation_ppl"])["lr"]
        assert {s["lr"] for s in result["sweep"]} == {RECOVERY_RECIPES[name]["lr"] * f for f in (0.5, 2)}
    table = (out / "recovery.md").read_text()
    assert "| seed |" in table and "| values_kd_hidden |" in table and (out / "recovery.png").is_file()
    assert "tokens per step, fp32;" in table
    capsys.readouterr()
    assert recovery.main(argv) == 0  # a rerun reuses both recipes
    assert capsys.readouterr().out.count("done earlier with the same settings, skipped") == 2


def test_bad_arguments_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--recipes: unknown nope"):
        recovery.main(["--out", str(tmp_path), "--recipes", "seed,nope"])
    with pytest.raises(SystemExit, match="--budgets and --sweep are comma-separated numbers"):
        recovery.main(["--out", str(tmp_path), "--budgets", "ten"])
    with pytest.raises(SystemExit, match="no results in"):
        recovery.main(["--out", str(tmp_path), "--report-only"])


def test_results_from_before_the_precision_flag_count_as_fp32(tmp_path):
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"settings": {"model": "m", "recipe": {"lr": 1e-3}}}))
    assert recovery._read(path, {"model": "m", "recipe": {"lr": 1e-3}, "precision": "fp32"}) is not None
    assert recovery._read(path, {"model": "m", "recipe": {"lr": 1e-3}, "precision": "bf16"}) is None
    assert recovery._read(path, {"model": "n", "recipe": {"lr": 1e-3}, "precision": "fp32"}) is None
