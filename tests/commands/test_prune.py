"""`blocksparse prune`: flags, a whole run on the tiny model, one-line errors."""

import json
import re

import pytest
import torch

from blocksparse import BlockSparseLinear
from blocksparse.commands import main
from blocksparse.integration.checkpoint import SparseCheckpointError, hidden_channel_order


def test_cli_help_lists_both_spellings(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--sparsity", "--block-size", "--block_size", "--method", "--comparison-group", "--calib", "--nsamples",
                 "--seqlen", "--out", "--no-reconstruct", "--allocation", "--module-density", "--sink-weight",
                 "--sink-tokens", "--refine-steps", "--refine-lr", "--eval-dataset", "--eval-max-windows",
                 "--row-group", "--union-density"):
        assert flag in out


def test_cli_prunes_saves_and_reloads(tiny_dir, text_file, tmp_path, capsys):
    from blocksparse.integration.model import load_model

    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(tiny_dir), "--calib", str(text_file), "--nsamples", "4",
                 "--seqlen", "64", "--method", "wanda", "--module-density", "model.layers.0.mlp=1.0",
                 "--refine-steps", "4", "--refine-precision", "bfloat16",
                 "--eval_dataset", str(text_file), "--eval-seqlen", "64",
                 "--eval-max-windows", "2", "--out", str(out), "--no-progress"])
    assert code == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["total_density"] == 0.5
    assert report["calibration"] == {"nsamples": 4, "seqlen": 64, "dataset": str(text_file), "seed": 0}
    assert report["perplexity"]["windows"] == 2 and report["perplexity"]["pruned"] > 1
    assert report["layers"]["model.layers.0.mlp.up_proj"]["blocks_per_row"] == [4]  # kept dense
    assert report["layers"]["model.layers.1.mlp.up_proj"]["blocks_per_row"] == [1]  # pays for it
    assert report["allocation"] == {"explicit": {"model.layers.0.mlp": 1.0}}
    assert report["refine"]["steps"] == 4 and set(report["refine"]["layer_loss_before_after"]) == {"0", "1"}
    assert report["refine"]["precision"] == "bfloat16"
    model, _ = load_model(str(out))
    assert isinstance(model.model.layers[1].mlp.down_proj, BlockSparseLinear)
    assert "-> pruned" in capsys.readouterr().out
    # The model card holds this run's own numbers.
    card = (out / "README.md").read_text()
    assert f"block-sparse pruned from `{tiny_dir}`" in card and "total density **0.5000**" in card
    assert f"| this checkpoint | {report['perplexity']['pruned']:.2f} (" in card
    assert f"| dense | {report['perplexity']['dense']:.2f} |" in card and "2 windows of 64 tokens" in card
    assert "`model.layers.0.mlp` = 1" in card and "4 steps per decoder layer (lr 0.03, bf16 autocast but" in card
    assert "4 windows x 64 tokens" in card and f"blocksparse generate --model {out}" in card
    # Channels were reordered first (the default): the report records the hidden order, which a
    # hidden-state teacher reads back; a malformed one is refused in one line.
    order = hidden_channel_order(out)
    assert order.tolist() == report["channel_permutation"]["hidden"] and sorted(order.tolist()) == list(range(64))
    assert "channels reordered by importance first" in card
    report["channel_permutation"]["hidden"][0] = report["channel_permutation"]["hidden"][1]
    (out / "prune_report.json").write_text(json.dumps(report))
    with pytest.raises(SparseCheckpointError, match=r"channel_permutation.hidden must be a permutation of 0..n-1"):
        hidden_channel_order(out)
    (out / "prune_report.json").write_text(json.dumps({**report, "channel_permutation": [0, 1]}))
    with pytest.raises(SparseCheckpointError, match=r"channel_permutation must be an object .*, got list"):
        hidden_channel_order(out)


def test_cli_no_permute_channels_keeps_the_channel_order(tiny_dir, text_file, tmp_path):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_dir), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "64",
                 "--method", "wanda", "--refine-steps", "0", "--no-permute-channels", "--out", str(out),
                 "--no-progress"]) == 0
    assert json.loads((out / "prune_report.json").read_text())["channel_permutation"] is None
    assert hidden_channel_order(out) is None
    assert "channels reordered" not in (out / "README.md").read_text()


def test_cli_offload_prunes_the_same_checkpoint_in_shards_if_asked(tiny_dir, text_file, tmp_path):
    from safetensors.torch import load_file

    args = ["prune", "--model", str(tiny_dir), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "64",
            "--method", "wanda", "--device", "cpu", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--offload", "cpu", "--max-shard-size", "100000", "--out", str(tmp_path / "b")]) == 0
    a = load_file(tmp_path / "a" / "model.safetensors")
    shards = sorted((tmp_path / "b").glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / "b" / "model.safetensors.index.json").is_file()
    b = {key: t for shard in shards for key, t in load_file(shard).items()}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / "prune_report.json").read_text())["cli_args"]["offload"] == "cpu"
    # Memory-mapped from the dense files, each pruned layer parked in a file beside --out: the
    # same checkpoint, and nothing left behind. A model that is no local safetensors is refused.
    assert main(args + ["--offload", "disk", "--out", str(tmp_path / "c")]) == 0
    c = load_file(tmp_path / "c" / "model.safetensors")
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "a" / name).read_text()) == json.loads((tmp_path / "c" / name).read_text())
    assert not list(tmp_path.glob(".offload-*"))
    assert main(["prune", "--model", "default", "--offload", "disk", "--out", str(tmp_path / "d")]) == 2


def test_cli_prunes_and_saves_in_the_dtype_asked(tiny_dir, text_file, tmp_path):
    out = tmp_path / "bf16"
    assert main(["prune", "--model", str(tiny_dir), "--calib", str(text_file), "--nsamples", "2", "--seqlen", "32",
                 "--method", "wanda", "--dtype", "bfloat16", "--offload", "cpu", "--out", str(out),
                 "--no-progress"]) == 0
    assert json.loads((out / "blocksparse_config.json").read_text())["dtype"] == "bfloat16"


def test_cli_pushes_the_checkpoint_with_its_marker_and_card(tiny_dir, text_file, tmp_path, monkeypatch, capsys):
    # The hub is replaced by a recorder: what would be uploaded is the file list upload_folder gets.
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)))
    monkeypatch.setattr(HfApi, "repo_info", lambda self, repo_id, **kw: type("Info", (), {"private": True})())
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_dir), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "64",
                 "--method", "wanda", "--out", str(out), "--no-progress", "--push-to-hub", "me/tiny-bs50",
                 "--hub-private"]) == 0
    (create, repo, options), (upload, kw) = calls
    assert (create, repo, options["private"]) == ("create", "me/tiny-bs50", True)
    assert kw["repo_id"] == "me/tiny-bs50" and kw["folder_path"] == str(out)
    sent = set(kw["allow_patterns"])
    assert {"blocksparse_config.json", "README.md", "model.safetensors", "config.json", "prune_report.json"} <= sent
    assert sent == {p.name for p in out.iterdir() if p.is_file()}
    assert "pushed" in capsys.readouterr().out


def test_a_hub_failure_is_one_line_and_keeps_the_checkpoint(tiny_dir, text_file, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    def refuse(self, repo_id, **kw):
        raise OSError("401 Unauthorized: invalid token\nmore detail")
    monkeypatch.setattr(HfApi, "create_repo", refuse)
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_dir), "--calib", str(text_file), "--nsamples", "2", "--seqlen", "32",
                 "--out", str(out), "--no-progress", "--push-to-hub", "me/tiny"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "401 Unauthorized: invalid token (the checkpoint is saved in" in last
    assert (out / "blocksparse_config.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "1.0"], r"--sparsity must be in \[0, 1\), got 1.0"),
    (["--block-size", "64"], r"not divisible: model.layers.0.self_attn.k_proj \[32, 64\]"),
    (["--sparse-block-size", "64"], r"not divisible: model.layers.0.self_attn.k_proj \[32, 64\]"),
    (["--seqlen", "5000"], "fewer than the 5001 needed"),
    (["--model", "./no-such-model"], "does not exist"),
    (["--method", "obc", "--comparison-group", "global"], "use --comparison-group block-row"),
    (["--module-density", "model.layers.0.mlp"], "expects NAME=D"),
    (["--module-density", "model.layers.9=1.0"], r"match no pruned linear: \['model.layers.9'\]"),
    (["--sink-weight", "0"], r"--sink-weight must be >= 1"),
    (["--sink-tokens", "-1"], r"--sink-tokens must be >= 0"),
    (["--refine-steps", "-3"], r"--refine-steps must be >= 0"),
    (["--refine-lr", "0"], r"--refine-lr must be > 0"),
    (["--damp", "nan"], r"--damp must be a finite number, got nan"),
    (["--damp", "inf"], r"--damp must be a finite number, got inf"),
    (["--sink-weight", "inf"], r"--sink-weight must be a finite number, got inf"),
    (["--owl-spread", "nan"], r"--owl-spread must be a finite number, got nan"),
    (["--device", "bogus"], r"--device 'bogus' is not a torch device"),
    (["--row-group", "0"], r"row_group must be an int >= 1"),
    (["--row-group", "2", "--union-density", "0"], r"union_density must be in \(0, 1\]"),
    (["--row-group", "1", "--union-density", "0.6"], r"give row_group > 1 with it"),
    (["--offload", "cpu", "--eval-dataset", "default"], r"evaluate the saved checkpoint with `blocksparse eval`"),
    (["--push-to-hub", "not a repo"], r"--push-to-hub 'not a repo' is not a hub repository id"),
    (["--hub-private"], r"give --push-to-hub with it"),
    (["--max-shard-size", "5GiB"], r"--max-shard-size must be a positive number of bytes or of KB, MB, GB or TB"),
    (["--max-shard-size", "0"], r"--max-shard-size must be a positive number .* got '0'"),
])
def test_cli_bad_input_is_one_line_error(tiny_dir, text_file, tmp_path, capsys, extra, message):
    args = ["prune", "--model", str(tiny_dir), "--calib", str(text_file), "--nsamples", "2", "--seqlen", "32",
            "--out", str(tmp_path / "never"), "--no-progress"]
    code = main(args + extra)
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # above it only the loader's progress bars
    assert last.startswith("blocksparse prune: error: ")
    assert re.search(message, last), last
    assert not (tmp_path / "never").exists()
