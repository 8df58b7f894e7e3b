"""The grouped-mask trade-off benchmark end to end on the tiny model: quality, speed, plot."""

import json

import pytest
import torch

from blocksparse.bench import tradeoff
from blocksparse.grouping import group_union_sizes


def test_configs_are_parsed_and_bad_ones_named():
    assert tradeoff.parse_configs("1, 4,8:0.6", 0.5) == [(1, None), (4, None), (8, 0.6)]
    for bad in ("8:0.4", "0", "1:0.7", "eight", ""):
        with pytest.raises(ValueError, match="--configs"):
            tradeoff.parse_configs(bad, 0.5)


def test_all_phases_write_a_row_per_configuration(tiny_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "tradeoff"
    argv = ["--out", str(out), "--model", str(tiny_dir), "--dataset", str(corpus_file), "--configs", "1,2,2:0.85",
            "--sparsity", "0.3", "--seqlen", "32", "--nsamples", "4", "--eval-windows", "3", "--steps", "2",
            "--train-seqlen", "32", "--prompt-len", "24", "--decode-tokens", "2", "--reps", "1"]
    assert tradeoff.main(argv) == 0
    results = {name: json.loads((out / name / "result.json").read_text()) for name in ("free", "G2", "G2_u0.85")}
    masks, perms, group = tradeoff.load_structure(out / "G2" / "structure.safetensors")
    assert group == 2 and masks and set(masks) == set(perms)
    # Fully shared groups: each group's union is its rows' blocks, so the mean union is the
    # pruned modules' density (weighted by size); u = 0.85 allows up to 0.85 of the columns.
    pruned = [m for m in masks.values() if not m.all()]
    density = sum(m.sum() for m in pruned).item() / sum(m.numel() for m in pruned)
    assert results["G2"]["union_forward"] == pytest.approx(density)
    assert all(int(group_union_sizes(m, 2, perms[n]).max()) == int(m.sum(1).max())
               for n, m in masks.items() if not m.all())
    assert density <= results["G2_u0.85"]["union_forward"] <= 0.85 + 1e-9
    for result in results.values():
        assert result["ppl_lora"] > 1 and result["ppl_one_shot"] > 1 and result["windows"] == 3
    speed = json.loads((out / "speed.json").read_text())["variants"]
    assert set(speed) == {"dense", "free", "G2", "G2_u0.85"}
    assert all(v["prefill_ms"] > 0 and v["decode_tokens_per_s"] > 0 for v in speed.values())
    table = (out / "tradeoff.md").read_text()
    assert f"| G2_u0.85 | {results['G2_u0.85']['total_density']:.3f} |" in table and (out / "tradeoff.png").is_file()
    # A rerun of the quality phase reuses what was done with the same settings, and only that.
    capsys.readouterr()
    assert tradeoff.main(argv + ["--phase", "quality"]) == 0
    assert capsys.readouterr().out.count("done earlier with the same settings, skipped") == 3
    assert tradeoff.main(argv + ["--phase", "quality", "--configs", "2", "--steps", "1"]) == 0
    assert "skipped" not in capsys.readouterr().out
    assert json.loads((out / "G2" / "result.json").read_text())["settings"]["steps"] == 1


def test_bad_arguments_and_missing_phases_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--reps must be >= 1, got 0"):
        tradeoff.main(["--out", str(tmp_path), "--reps", "0"])
    with pytest.raises(SystemExit, match="dense.json is missing: run --phase quality first"):
        tradeoff.main(["--out", str(tmp_path), "--phase", "plot"])
