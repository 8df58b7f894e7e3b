"""Sparse checkpoints: save/load round trip, tied embeddings, malformed files."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from blocksparse import BlockSparseLinear, sparsify_model
from blocksparse.integration.checkpoint import (SparseCheckpointError, load_sparse_pretrained,
                                                save_sparse_pretrained, sparse_skeleton)
from blocksparse.prune import prune_model
from helpers import byte_tokenizer, make_tiny_llama, sparse_layers


PROBE = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


def tied_tiny_llama():
    """The tiny Llama with lm_head tied to the embeddings, like SmolLM2."""
    from transformers import LlamaForCausalLM

    config = make_tiny_llama().config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def saved(tmp_path):
    model = make_tiny_llama()
    prune_model(model, torch.randint(0, 256, (4, 32)), sparsity=0.5, method="wanda", progress=False)
    out = save_sparse_pretrained(model, byte_tokenizer(), tmp_path / "ckpt", report={"total_density": 0.5})
    return model, out


def test_round_trip_gives_identical_outputs(saved):
    model, out = saved
    loaded, tokenizer = load_sparse_pretrained(out)
    assert tokenizer is not None and tokenizer("ab c").input_ids == byte_tokenizer()("ab c").input_ids
    sparse = {name for name, m in loaded.named_modules() if isinstance(m, BlockSparseLinear)}
    assert len(sparse) == 14
    for name in sparse:
        assert torch.equal(loaded.get_submodule(name).block_mask, model.get_submodule(name).block_mask)
    assert torch.equal(loaded(PROBE).logits, model(PROBE).logits)
    marker = json.loads((out / "blocksparse_config.json").read_text())
    assert marker["block_size"] == 16 and marker["format_version"] == 2
    assert json.loads((out / "prune_report.json").read_text()) == {"total_density": 0.5}
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()


def test_the_loaded_model_owns_its_weights(saved):
    # The checkpoint may be overwritten, even in place, while a model loaded from it lives:
    # nothing of the model may stay mapped to the file.
    _, out = saved
    loaded, _ = load_sparse_pretrained(out)
    expected = loaded(PROBE).logits
    weights = out / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.write(bytes(size))
    assert torch.equal(loaded(PROBE).logits, expected)


# Peak RSS of the load alone: Linux's VmHWM, reset (clear_refs 5) after the imports.
LOAD_PEAK = """
import sys
from blocksparse.integration.checkpoint import load_sparse_pretrained
def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
open("/proc/self/clear_refs", "w").write("5")
before = kib("VmRSS:")
model, _ = load_sparse_pretrained(sys.argv[1])
print((kib("VmHWM:") - before) * 1024)
"""


def test_loading_never_builds_the_dense_projections(tmp_path):
    """A 90%-sparse checkpoint whose dense projections would take 600 MB loads in a fresh
    process with a peak far below that: the skeleton is built on the meta device."""
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=256)
    torch.manual_seed(0)
    model = sparsify_model(LlamaForCausalLM(config), sparsity=0.9)
    dense_bytes = 12 * (4 * 1024 * 1024 + 3 * 1024 * 2816) * 4
    sparse_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert sparse_bytes < dense_bytes / 8
    out = save_sparse_pretrained(model, None, tmp_path / "big")
    del model
    grew = int(subprocess.run([sys.executable, "-c", LOAD_PEAK, str(out)], check=True, capture_output=True,
                              text=True).stdout.split()[-1])
    # The file's pages while they are copied, the copies, and ~90 MB of Python and modules:
    # 210 MiB measured; building the dense model first took 800.
    assert grew < dense_bytes / 2, f"peak RSS grew {grew / 2**20:.0f} MiB for {sparse_bytes / 2**20:.0f} MiB of weights"


def test_a_skeleton_has_the_structure_and_every_parameter_but_reads_no_values(saved):
    model, out = saved
    skeleton, tokenizer = sparse_skeleton(out)
    assert tokenizer is not None and not any(p.is_meta for p in skeleton.parameters())
    for name, layer in sparse_layers(model).items():
        ours = skeleton.get_submodule(name)
        assert torch.equal(ours.block_mask, layer.block_mask) and ours.sparse_weight.row_group == 1
        assert ours.weight.shape == layer.weight.shape and ours.weight.dtype == layer.weight.dtype
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    # Without a module's structure there is nothing to shard: refused, naming it.
    _rewrite(out, "model.layers.1.mlp.up_proj.sparse_weight.crow", lambda t, k: t.pop(k))
    with pytest.raises(SparseCheckpointError, match=r"no block structure \(crow, col\) for \['model.layers.1.mlp.up_proj'\]"):
        sparse_skeleton(out)


def test_stores_only_the_kept_blocks(saved):
    _, out = saved
    tensors = load_file(str(out / "model.safetensors"))
    values = tensors["model.layers.0.mlp.down_proj.sparse_weight.values"]
    assert values.shape == (4 * 4, 16, 16)  # 4 block rows x 4 of 8 blocks
    assert "model.layers.0.mlp.down_proj.weight" not in tensors
    assert tensors["model.layers.0.mlp.down_proj.sparse_weight.col"].dtype == torch.int32


def test_tied_embeddings_round_trip_in_another_dtype(tmp_path):
    model = sparsify_model(tied_tiny_llama(), sparsity=0.5)
    out = save_sparse_pretrained(model, None, tmp_path / "tied")
    loaded, tokenizer = load_sparse_pretrained(out, dtype=torch.bfloat16)
    assert tokenizer is None
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    reference = load_sparse_pretrained(out)[0]
    assert torch.equal(reference(PROBE).logits, model(PROBE).logits)


def test_a_tied_tensor_stored_under_its_other_name_loads(tmp_path):
    # Tied embeddings saved under lm_head.weight (as some writers keep them) fill both names.
    model = sparsify_model(tied_tiny_llama(), sparsity=0.5)
    out = save_sparse_pretrained(model, None, tmp_path / "tied")
    _rewrite(out, "model.embed_tokens.weight", lambda t, k: t.__setitem__("lm_head.weight", t.pop(k)))
    loaded, _ = load_sparse_pretrained(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded(PROBE).logits, model(PROBE).logits)


def _rewrite(out, key, change):
    tensors = load_file(str(out / "model.safetensors"))
    change(tensors, key)
    save_file(tensors, str(out / "model.safetensors"))


@pytest.mark.parametrize("key, change, message", [
    ("model.layers.1.mlp.up_proj.sparse_weight.col",
     lambda t, k: t[k].__setitem__(0, 99), r"col\[0\]=99 is out of range \[0, 4\)"),
    ("model.layers.0.self_attn.k_proj.sparse_weight.crow",
     lambda t, k: t.__setitem__(k, t[k][:-1].clone()), r"crow must have N/b \+ 1 = 3 entries, got 2"),
    ("model.layers.0.mlp.gate_proj.sparse_weight.values",
     lambda t, k: t.__setitem__(k, t[k][:, :8].contiguous()), r"expected \[nnz, 16, 16\] blocks"),
    ("model.norm.weight",
     lambda t, k: t.__setitem__(k, torch.ones(32)), r"model.norm.weight: expected shape \(64,\), got \(32,\)"),
    ("model.layers.1.mlp.down_proj.sparse_weight.values",
     lambda t, k: t.pop(k), r"missing tensors \['model.layers.1.mlp.down_proj.sparse_weight.values'\]"),
    ("model.layers.0.mlp.up_proj.weight",
     lambda t, k: t.__setitem__(k, torch.zeros(128, 64)), r"unexpected tensor 'model.layers.0.mlp.up_proj.weight'"),
])
def test_malformed_weights_raise_a_clear_error(saved, key, change, message):
    _, out = saved
    _rewrite(out, key, change)
    with pytest.raises(SparseCheckpointError, match=message) as error:
        load_sparse_pretrained(out)
    assert "\n" not in str(error.value)  # one line, as the commands print it


def test_malformed_marker_raises_a_clear_error(saved):
    _, out = saved
    marker_file = out / "blocksparse_config.json"
    marker = json.loads(marker_file.read_text())
    marker["format_version"] = 7
    marker_file.write_text(json.dumps(marker))
    with pytest.raises(SparseCheckpointError, match="format_version 7 is not supported"):
        load_sparse_pretrained(out)
    marker["format_version"] = 1
    marker["modules"]["model.layers.0.mlp.fc9"] = {"in_features": 64, "out_features": 64}
    marker_file.write_text(json.dumps(marker))
    with pytest.raises(SparseCheckpointError, match=r"lists 'model.layers.0.mlp.fc9'.*has nothing there"):
        load_sparse_pretrained(out)
    marker_file.unlink()
    with pytest.raises(SparseCheckpointError, match="blocksparse_config.json is missing"):
        load_sparse_pretrained(out)


def test_save_refuses_a_dense_model(tmp_path):
    with pytest.raises(ValueError, match="no BlockSparseLinear"):
        save_sparse_pretrained(make_tiny_llama(), None, tmp_path / "dense")


def test_a_row_grouped_checkpoint_round_trips_and_a_bad_grouping_is_refused(tmp_path):
    model = make_tiny_llama()
    prune_model(model, torch.randint(0, 256, (4, 32)), sparsity=0.5, method="wanda", row_group=2, progress=False)
    out = save_sparse_pretrained(model, byte_tokenizer(), tmp_path / "grouped")
    loaded, _ = load_sparse_pretrained(out)
    assert torch.equal(loaded(PROBE).logits, model(PROBE).logits)
    name = "model.layers.1.mlp.up_proj"
    ours, theirs = loaded.get_submodule(name).sparse_weight, model.get_submodule(name).sparse_weight
    assert ours.row_group == 2 and torch.equal(ours.row_perm, theirs.row_perm)
    _rewrite(out, f"{name}.sparse_weight.row_perm", lambda t, k: t[k].__setitem__(1, t[k][0].item()))
    with pytest.raises(SparseCheckpointError, match=r"row_perm is not a permutation of range\(8\)"):
        load_sparse_pretrained(out)


def test_a_checkpoint_without_row_groupings_loads_ungrouped(saved):
    model, out = saved
    tensors = load_file(str(out / "model.safetensors"))
    old = {k: v for k, v in tensors.items() if not k.endswith((".row_perm", ".row_group"))}
    save_file(old, str(out / "model.safetensors"))  # as blocksparse wrote them before row groups
    with pytest.raises(SparseCheckpointError, match=r"missing tensors \[.*row_perm"):
        load_sparse_pretrained(out)                     # a version 2 marker promises them
    marker = json.loads((out / "blocksparse_config.json").read_text())
    (out / "blocksparse_config.json").write_text(json.dumps(dict(marker, format_version=1)))
    loaded, _ = load_sparse_pretrained(out)
    assert torch.equal(loaded(PROBE).logits, model(PROBE).logits)
    assert all(m.sparse_weight.row_group == 1 for m in loaded.modules() if isinstance(m, BlockSparseLinear))


def test_a_marker_over_dense_weights_is_refused(saved, tiny_dir):
    _, out = saved
    (tiny_dir / "blocksparse_config.json").write_text((out / "blocksparse_config.json").read_text())
    with pytest.raises(SparseCheckpointError, match=r"blocksparse_config.json marks a sparse checkpoint but "
                                                    r"model.safetensors holds no block-sparse tensor"):
        load_sparse_pretrained(tiny_dir)


def test_push_refuses_what_is_not_a_whole_sparse_checkpoint(saved, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from blocksparse.integration.checkpoint import push_sparse_checkpoint

    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: pytest.fail("nothing may reach the hub"))
    _, path = saved
    (tmp_path / "dense").mkdir()
    with pytest.raises(SparseCheckpointError, match="is not a sparse checkpoint"):
        push_sparse_checkpoint(tmp_path / "dense", "me/x")
    (path / "training_args.bin").write_bytes(b"pickle")
    with pytest.raises(SparseCheckpointError, match="training_args.bin is a pickle file"):
        push_sparse_checkpoint(path, "me/x")
    (path / "training_args.bin").unlink()
    (path / "README.md").unlink()
    with pytest.raises(SparseCheckpointError, match="README.md is missing"):
        push_sparse_checkpoint(path, "me/x")


def test_push_private_to_an_existing_public_repository_uploads_nothing(saved, monkeypatch):
    from huggingface_hub import HfApi

    from blocksparse.integration.checkpoint import push_sparse_checkpoint

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(HfApi, "repo_info", lambda self, repo_id, **kw: type("Info", (), {"private": False})())
    monkeypatch.setattr(HfApi, "upload_folder", lambda *a, **k: pytest.fail("nothing may be uploaded"))
    with pytest.raises(SparseCheckpointError, match="exists and is public; private was asked"):
        push_sparse_checkpoint(saved[1], "me/x", private=True)


def test_a_sharded_checkpoint_round_trips_and_a_resave_leaves_no_stale_shard(saved):
    model, out = saved
    save_sparse_pretrained(model, byte_tokenizer(), out, max_shard_size="100KB")  # over the unsharded save
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    # Each shard within the limit (headers aside), unless one tensor alone is larger.
    for shard in shards:
        held = load_file(str(out / shard))
        assert len(held) == 1 or sum(t.numel() * t.element_size() for t in held.values()) <= 100_000, shard
    loaded, _ = load_sparse_pretrained(out)
    assert torch.equal(loaded(PROBE).logits, model(PROBE).logits)
    save_sparse_pretrained(model, byte_tokenizer(), out)  # one file again: the shards and index go
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


@pytest.mark.parametrize("change, message", [
    (lambda index, out: index["weight_map"].update({"model.norm.weight": "../model.safetensors"}),
     "'../model.safetensors' is not a .safetensors file name inside the directory"),
    (lambda index, out: (out / sorted(set(index["weight_map"].values()))[-1]).unlink(), "which is missing"),
    (lambda index, out: index["weight_map"].update({"model.extra.weight": index["weight_map"]["model.norm.weight"]}),
     "lists 'model.extra.weight', which no shard holds"),
    (lambda index, out: index["weight_map"].update(
        {"model.norm.weight": next(f for f in set(index["weight_map"].values())
                                   if f != index["weight_map"]["model.norm.weight"])}),
     "holds 'model.norm.weight', which model.safetensors.index.json puts in"),
    (lambda index, out: index.update({"weight_map": {}}), "weight_map must be a non-empty object of tensor name"),
])
def test_a_malformed_shard_index_is_one_clear_error(saved, change, message):
    model, out = saved
    save_sparse_pretrained(model, byte_tokenizer(), out, max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    change(index, out)
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SparseCheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_sparse_pretrained(out)
