"""The recovery-curve benchmark end to end on the tiny model: one-shot checkpoint, sweep, curves, report."""

import json
import math

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


def test_the_interleaved_speed_measurement_gives_the_tables_speeds(tiny_dir, corpus_file, tmp_path):
    out = tmp_path / "recovery"
    argv = ["--out", str(out), "--model", str(tiny_dir), "--dataset", str(corpus_file), "--sparsity", "0.3",
            "--recipes", "seed,lora16", "--budgets", "64", "--sweep", "1", "--seqlen", "32", "--eval-windows", "2",
            "--train-seqlen", "32"]
    assert recovery.main(argv) == 0
    assert "CPU min (this run)" in (out / "recovery.md").read_text()
    assert recovery.main(argv + ["--report-only", "--speed", "--speed-steps", "4", "--speed-rounds", "2"]) == 0
    speed = json.loads((out / "speed.json").read_text())
    assert set(speed["s_per_step"]) == {"seed", "lora16"} and speed["tokens_per_step"] == 32
    for name, runs in speed["runs"].items():
        assert len(runs) == 2 and all(t > 0 for t in runs)
        assert speed["s_per_step"][name] == pytest.approx(sorted(runs)[0] / 2 + sorted(runs)[1] / 2)
    table = (out / "recovery.md").read_text()
    assert "tokens/s (interleaved)" in table and "2 interleaved rounds of 4 steps" in table
    for name in ("seed", "lora16"):  # 64 tokens at the measured seconds per 32-token step
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert row.split("|")[-3].strip() == f"{32 / speed['s_per_step'][name]:.0f}"
        assert row.split("|")[-2].strip() == f"{2 * speed['s_per_step'][name] / 60:.1f}"
    # Another step size or precision has other speeds: the measurement is not used for it.
    same, other, bf16 = (recovery.build_parser().parse_args(a) for a in
                         (argv, [*argv[:-1], "48"], [*argv, "--precision", "bf16"]))
    assert recovery.read_speed(same) == speed
    assert recovery.read_speed(other) is None and recovery.read_speed(bf16) is None


def test_bad_arguments_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--recipes: unknown nope"):
        recovery.main(["--out", str(tmp_path), "--recipes", "seed,nope"])
    with pytest.raises(SystemExit, match="--budgets and --sweep are comma-separated numbers"):
        recovery.main(["--out", str(tmp_path), "--budgets", "ten"])
    with pytest.raises(SystemExit, match="no results in"):
        recovery.main(["--out", str(tmp_path), "--report-only"])
    with pytest.raises(SystemExit, match="--speed-steps must be > 2"):
        recovery.main(["--out", str(tmp_path), "--speed", "--speed-steps", "2"])


def test_results_from_before_the_precision_flag_count_as_fp32(tmp_path):
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"settings": {"model": "m", "recipe": {"lr": 1e-3}}}))
    assert recovery._read(path, {"model": "m", "recipe": {"lr": 1e-3}, "precision": "fp32"}) is not None
    assert recovery._read(path, {"model": "m", "recipe": {"lr": 1e-3}, "precision": "bf16"}) is None
    assert recovery._read(path, {"model": "n", "recipe": {"lr": 1e-3}, "precision": "fp32"}) is None


def test_the_report_extrapolates_each_curve_by_its_power_law(tmp_path):
    dense = 20.0
    results = [{"recipe": "a", "points": [{"tokens": 1000, "ppl": 100.0}, {"tokens": 4000, "ppl": 80.0},
                                          {"tokens": 16000, "ppl": 64.0}]},
               {"recipe": "below_dense", "points": [{"tokens": 1000, "ppl": 30.0}, {"tokens": 4000, "ppl": 19.0}]},
               {"recipe": "one_point", "points": [{"tokens": 1000, "ppl": 90.0}]}]
    a, b = recovery.power_law(results[0]["points"], dense)
    # By hand: the least-squares line through (ln tokens, ln ln ratio).
    xs = [math.log(t) for t in (1000, 4000, 16000)]
    ys = [math.log(math.log(p / dense)) for p in (100.0, 80.0, 64.0)]
    slope = ((xs[0] - xs[1]) * (ys[0] - ys[1]) + (xs[2] - xs[1]) * (ys[2] - ys[1])) / (
        (xs[0] - xs[1]) ** 2 + (xs[2] - xs[1]) ** 2)  # xs evenly spaced: the middle point is the mean
    assert b == pytest.approx(-slope)
    assert math.log(a) == pytest.approx(sum(ys) / 3 - slope * xs[1])
    assert recovery.tokens_for(a, b, recovery.ratio_after(a, b, 1e6)) == pytest.approx(1e6)
    table = recovery.projection_table(results, dense)
    row = next(line for line in table.splitlines() if line.startswith("| a |"))
    assert f"| {-b:.3f} |" in row and f"{recovery.ratio_after(a, b, recovery.REFERENCE_TOKENS):.2f}x" in row
    assert "below_dense" not in table and "one_point" not in table
    with pytest.raises(ValueError, match="a power law needs >= 2 points above dense"):
        recovery.power_law(results[1]["points"], dense)


def test_results_from_before_recipes_carried_their_dropout_ran_with_point_05(tmp_path):
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"settings": {"precision": "fp32", "recipe": {"lora": {"r": 16}, "lr": 1e-3}}}))
    then = {"precision": "fp32", "recipe": {"lora": {"r": 16, "dropout": 0.05}, "lr": 1e-3}}
    assert recovery._read(path, then) is not None
    assert recovery._read(path, {**then, "recipe": {"lora": {"r": 16, "dropout": 0.0}, "lr": 1e-3}}) is None
    path.write_text(json.dumps({"settings": {"precision": "fp32", "recipe": {"values": True, "lr": 3e-4}}}))
    assert recovery._read(path, {"precision": "fp32", "recipe": {"values": True, "lr": 3e-4}}) is not None
