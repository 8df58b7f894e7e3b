"""The structure benchmark: Wanda's masks per structure, the sequential pruning, the projection's arithmetic."""

import copy
import json
import math

import pytest
import torch

from blocksparse import sparsify_model
from blocksparse.bench import recovery, structures
from blocksparse.families import decoder_layers
from blocksparse.prune.calibration import advance, calibration_batches, dense_sq_norms, layer0_inputs
from blocksparse.sparsify import target_linears


def test_each_structure_keeps_the_best_scores_its_pattern_allows():
    scores = torch.rand(32, 64, dtype=torch.float64)
    un = structures.structure_mask(scores, "unstructured", 0.5)
    assert (un.sum(1) == 32).all()
    for row in range(32):  # every kept score beats every dropped one of its row
        assert scores[row][un[row]].min() > scores[row][~un[row]].max()
    for n, m in ((2, 4), (4, 8)):
        mask = structures.structure_mask(scores, f"{n}:{m}", 0.5)
        groups, kept = scores.reshape(32, 64 // m, m), mask.reshape(32, 64 // m, m)
        assert (kept.sum(2) == n).all()
        assert (groups.masked_fill(~kept, math.inf).amin(2) > groups.masked_fill(kept, -math.inf).amax(2)).all()
    blocks = structures.structure_mask(scores, "16x16", 0.5)
    tiles = scores.reshape(2, 16, 4, 16).sum(dim=(1, 3))
    kept = blocks.reshape(2, 16, 4, 16)[:, 0, :, 0]
    assert (blocks == kept.repeat_interleave(16, 0).repeat_interleave(16, 1)).all()
    assert (kept.sum(1) == 2).all()
    assert (tiles.masked_fill(~kept, math.inf).amin(1) > tiles.masked_fill(kept, -math.inf).amax(1)).all()


def test_bad_structures_are_one_line():
    for bad in ("4:2", "2:2", "16x8", "blocks", "0:4", ""):
        with pytest.raises(ValueError, match="a structure is 'unstructured', N:M"):
            structures.parse_structure(bad)
    with pytest.raises(ValueError, match="2:3 needs the input size to divide by 3"):
        structures.structure_mask(torch.rand(4, 8), "2:3", 0.5)
    with pytest.raises(SystemExit, match="--structures: a structure is"):
        structures.main(["--structures", "unstructured,3x4"])


@pytest.mark.parametrize("structure", ["unstructured", "2:4", "16x16"])
def test_the_first_layer_is_pruned_by_its_dense_input_norms_and_the_rest_follow(tiny_llama, structure):
    calib = torch.randint(0, 256, (4, 32))
    layers = decoder_layers(tiny_llama)
    first = {n: lin for n, lin in target_linears(tiny_llama).items() if n.startswith("model.layers.0.")}
    hidden, kwargs = layer0_inputs(tiny_llama, layers, calibration_batches(calib, 8), torch.device("cpu"))
    sq = dense_sq_norms([layers[0]], hidden, kwargs, [first], torch.device("cpu"))
    dense = {n: lin.weight.detach().clone() for n, lin in first.items()}
    density = structures.wanda_prune(tiny_llama, calib, structure, 0.5)
    assert density == pytest.approx(0.5)
    for name, lin in first.items():  # layer 0 sees the dense inputs: its masks are Wanda's on them
        expected = structures.structure_mask(dense[name].float().abs() * sq[name].float().sqrt()[None, :],
                                             structure, 0.5)
        assert torch.equal(lin.weight, dense[name] * expected)
    for lin in target_linears(tiny_llama).values():  # every projection holds the structure's count of zeros
        assert (lin.weight == 0).float().mean().item() >= 0.5


def test_the_transfer_factor_the_gap_map_and_the_projection_by_hand(tmp_path):
    pub = structures.LLAMA2_7B_WANDA
    measured = {"dense": 20.0, "unstructured": 40.0, "2:4": 120.0, "16x16": 400.0}
    ks = structures.transfer_factors(measured, 20.0)
    assert set(ks) == {"unstructured", "2:4"}
    gap_un, gap_24 = math.log(pub["unstructured"] / pub["dense"]), math.log(pub["2:4"] / pub["dense"])
    assert ks["unstructured"] == pytest.approx(gap_un / math.log(2.0))
    assert ks["2:4"] == pytest.approx(gap_24 / math.log(6.0))
    # Two structures: the map passes through both published points.
    alpha, beta = structures.gap_map(measured, 20.0)
    assert beta == pytest.approx(math.log(gap_24 / gap_un) / math.log(math.log(6.0) / math.log(2.0)))
    assert structures.projected(2.0, alpha, beta) == pytest.approx(pub["unstructured"] / pub["dense"])
    assert structures.projected(6.0, alpha, beta) == pytest.approx(pub["2:4"] / pub["dense"])
    # One structure: a constant k.
    assert structures.gap_map({"dense": 20.0, "unstructured": 40.0}, 20.0) == pytest.approx((ks["unstructured"], 1.0))
    with pytest.raises(ValueError, match="the projection needs one of"):
        structures.gap_map({"dense": 20.0, "16x16": 400.0}, 20.0)
    curves = tmp_path / "curves"
    (curves / "lora").mkdir(parents=True)
    (curves / "baseline.json").write_text(json.dumps({"dense": 20.0, "one_shot": 200.0}))
    points = [{"tokens": 1000, "ppl": 100.0}, {"tokens": 8000, "ppl": 60.0}]
    (curves / "lora" / "result.json").write_text(json.dumps({"recipe": "lora", "points": points}))
    rows = structures.projection_rows(measured, 20.0, curves)
    k = (ks["unstructured"] + ks["2:4"]) / 2
    llama = math.exp(alpha * math.log(10.0) ** beta)
    assert rows[0][1:4] == ["10.00x", f"{llama:.2f}x", f"{pub['dense'] * llama:.2f}"]
    assert rows[0][4].startswith(f"{10.0 ** k:.2f}x (")
    assert rows[1][1] == "3.00x" and rows[1][2] == f"{math.exp(alpha * math.log(3.0) ** beta):.2f}x"
    a, b = recovery.power_law(points, 20.0)  # two points: the law passes through both
    assert math.exp(a * 1000 ** -b) == pytest.approx(5.0) and math.exp(a * 8000 ** -b) == pytest.approx(3.0)
    extrapolated = recovery.ratio_after(a, b, recovery.REFERENCE_TOKENS)
    assert rows[2][1] == f"{extrapolated:.2f}x"
    assert rows[2][2] == f"{structures.projected(extrapolated, alpha, beta):.2f}x"
    assert recovery.tokens_for(a, b, 3.0) == pytest.approx(8000)


def test_the_command_measures_each_structure_once_and_writes_the_projection(tiny_dir, corpus_file, tmp_path,
                                                                             capsys):
    curves = tmp_path / "curves"
    curves.mkdir()
    (curves / "baseline.json").write_text(json.dumps({"dense": 20.0, "one_shot": 200.0}))
    (curves / "lora.json").write_text(json.dumps({"recipe": "lora", "points": [{"tokens": 1000, "ppl": 100.0},
                                                                               {"tokens": 8000, "ppl": 60.0}]}))
    out = tmp_path / "structures"
    argv = ["--out", str(out), "--model", str(tiny_dir), "--dataset", str(corpus_file), "--structures",
            "unstructured,2:4,16x16", "--nsamples", "4", "--seqlen", "32", "--eval-windows", "2",
            "--curves", str(curves)]
    assert structures.main(argv) == 0
    ppl = json.loads((out / "structures.json").read_text())["ppl"]
    assert set(ppl) == {"dense", "unstructured", "2:4", "16x16"} and all(p > 1 for p in ppl.values())
    report = (out / "structures.md").read_text()
    assert "| 2:4 |" in report and "| 16x16 |" in report and "Projection to Llama-2-7B (not a measurement)" in report
    assert "+ `lora` after 30,720,000 tokens (power law, extrapolated)" in report
    capsys.readouterr()
    assert structures.main(argv) == 0
    assert capsys.readouterr().out.count("measured earlier with the same settings, skipped") == 3


def test_each_later_layer_is_scored_on_the_pruned_layers_before_it(tiny_llama):
    calib, cpu = torch.randint(0, 256, (4, 32)), torch.device("cpu")
    reference = copy.deepcopy(tiny_llama)
    structures.wanda_prune(tiny_llama, calib, "unstructured", 0.5)
    pruned = target_linears(tiny_llama)
    layers = decoder_layers(reference)
    second = {n: lin for n, lin in target_linears(reference).items() if n.startswith("model.layers.1.")}
    hidden, kwargs = layer0_inputs(reference, layers, calibration_batches(calib, 8), cpu)
    dense_sq = dense_sq_norms(layers[:2], hidden, kwargs, [{}, second], cpu)  # layer 1 on dense inputs
    # By hand: layer 0 as the function pruned it, then layer 1's input norms on its outputs.
    layers[0].load_state_dict(decoder_layers(tiny_llama)[0].state_dict())
    advance(layers[0], hidden, kwargs)
    sq = dense_sq_norms([layers[1]], hidden, kwargs, [second], cpu)
    differs = False
    for name, lin in second.items():
        expected = structures.structure_mask(lin.weight.abs() * sq[name].float().sqrt()[None, :], "unstructured", 0.5)
        assert torch.equal(pruned[name].weight, lin.weight * expected)
        on_dense = structures.structure_mask(lin.weight.abs() * dense_sq[name].float().sqrt()[None, :],
                                             "unstructured", 0.5)
        differs |= not torch.equal(expected, on_dense)
    assert differs  # the check tells the sequential scheme from scoring every layer on dense inputs


def test_bad_pruning_inputs_are_one_line(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="1:4 keeps 25% of the weights; at sparsity 0.5 use N:M with N/M = 0.5"):
        structures.wanda_prune(tiny_llama, torch.randint(0, 256, (2, 16)), "1:4", 0.5)
    with pytest.raises(SystemExit, match="--structures: 1:4 keeps 25% of the weights"):
        structures.main(["--structures", "1:4"])
    sparse = sparsify_model(tiny_llama, sparsity=0.5)
    with pytest.raises(ValueError, match="no dense projections to prune"):
        structures.wanda_prune(sparse, torch.randint(0, 256, (2, 16)), "unstructured", 0.5)
    curves = tmp_path / "curves"
    curves.mkdir()
    (curves / "baseline.json").write_text(json.dumps({"dense": 20.0, "one_shot": 200.0}))
    for argv in (["--structures", "16x16"], ["--sparsity", "0.75", "--structures", "unstructured"]):
        with pytest.raises(SystemExit, match="--curves: the projection needs --sparsity 0.5"):
            structures.main([*argv, "--curves", str(curves)])
