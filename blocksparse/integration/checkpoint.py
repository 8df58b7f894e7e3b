"""Sparse checkpoints: a Hugging Face directory whose pruned linears are stored block-sparse.

Layout of a directory written by `save_sparse_pretrained`:

    config.json, generation_config.json, tokenizer files   as `save_pretrained` writes them
    model.safetensors        every tensor of the state dict; a BlockSparseLinear
                             `<name>` is stored as `<name>.sparse_weight.crow` (int32
                             [N/b+1]), `.col` (int32 [nnz]), `.values` ([nnz, b, b])
                             and `<name>.bias` if it has one; all the rest is dense.
                             Above `max_shard_size` (50 GB, as transformers and the
                             hub's file limit): model-0000i-of-0000n.safetensors and
                             model.safetensors.index.json, as `save_pretrained` shards
    blocksparse_config.json  the marker: format version, block size, and which
                             modules are block-sparse (with their shapes)
    prune_report.json        what pruning did (optional)

`load_sparse_pretrained(dir)` builds the model from config.json (nothing is
downloaded), swaps BlockSparseLinear in for the listed modules and loads the
safetensors file(s) (an index must name plain files in the directory, each tensor
in exactly the file it names), validating every tensor: names, shapes, dtypes and the BSR
structure (BlockSparseLinear rebuilds it through `BlockSparseWeight.from_bsr`,
which checks index ranges, ordering and counts). Anything malformed raises
`SparseCheckpointError` naming the file and the offending tensor. No pickle.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..dtypes import DTYPES, long_name
from ..format import SUPPORTED_BLOCK_SIZES
from ..nn import BlockSparseLinear
from ..prune.permute import check_order
from ..sparsify import replace_module
from .model_card import sparse_checkpoint_card, write_card

# The marker file: its presence makes a directory a sparse checkpoint.
SPARSE_CHECKPOINT_MARKER = "blocksparse_config.json"
FORMAT_NAME = "blocksparse-bsr"
# 2 adds each weight's row grouping (`sparse_weight.row_perm`, `.row_group`); version 1
# checkpoints have none and load ungrouped.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_GROUPING_LEAVES = (".sparse_weight.row_perm", ".sparse_weight.row_group")
_STRUCTURE_LEAVES = (".sparse_weight.crow", ".sparse_weight.col", *_GROUPING_LEAVES)
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"  # a sharded checkpoint's map of tensor -> file
SHARD_PATTERN = "model{suffix}.safetensors"  # huggingface_hub's: model-00001-of-00003.safetensors
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers' default, and the hub's largest file
REPORT_NAME = "prune_report.json"
# How the tensors of a BlockSparseLinear end in WEIGHTS_NAME.
SPARSE_TENSOR_SUFFIXES = (".sparse_weight.values", ".sparse_weight.crow", ".sparse_weight.col")
# config.json fields that size a model's tensors: positive integers where present.
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim")


class SparseCheckpointError(ValueError):
    """A sparse checkpoint directory that is missing files, malformed, or does not match its config."""


class ConfigError(ValueError):
    """A config.json that describes no loadable model: a size of the wrong type, or beyond this machine."""


def _storage_key(tensor: torch.Tensor) -> tuple:
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """State-dict keys that share one tensor (e.g. lm_head.weight tied to the embeddings)."""
    groups: dict[tuple, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_meta:  # no storage to compare: tied parameters are one object
            groups.setdefault(("meta", id(tensor)), []).append(key)
        elif tensor.numel():  # empty tensors all sit at address 0 without sharing anything
            groups.setdefault(_storage_key(tensor), []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def save_sparse_pretrained(model: nn.Module, tokenizer, out_dir: str | os.PathLike,
                           report: dict | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write `model` (with BlockSparseLinear layers) as a sparse Hugging Face directory.

    tokenizer may be None. report (a JSON-able dict, e.g. prune_model's) goes to
    prune_report.json. max_shard_size (bytes, or "5GB"-style): larger weights are split
    into shards with an index, as `save_pretrained` does. Returns the directory.
    """
    sparse = {name: module for name, module in model.named_modules() if isinstance(module, BlockSparseLinear)}
    if not sparse:
        raise ValueError("the model has no BlockSparseLinear layer; prune or sparsify_model it first, "
                         "or use model.save_pretrained for a dense model")
    block_sizes = {module.block_size for module in sparse.values()}
    if len(block_sizes) != 1:
        raise ValueError(f"all block-sparse layers must share one block size, found {sorted(block_sizes)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # One copy of each tied tensor; the loader re-ties them from the config.
    state = model.state_dict()
    duplicates = {key for keys in _tied_groups(model) for key in keys[1:]}
    tensors = {key: tensor.detach().contiguous().cpu() for key, tensor in state.items() if key not in duplicates}
    _write_weights(tensors, out, max_shard_size)

    model.config.save_pretrained(out)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    dtype = next(iter(sparse.values())).sparse_weight.values.dtype
    marker = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "block_size": block_sizes.pop(),
        "dtype": long_name(dtype),
        "modules": {name: {"in_features": m.in_features, "out_features": m.out_features,
                           "bias": m.bias is not None, "nnz_blocks": m.sparse_weight.nnz_blocks,
                           "row_group": m.sparse_weight.row_group}
                    for name, m in sparse.items()},
    }
    (out / SPARSE_CHECKPOINT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if report is not None:
        (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    b = marker["block_size"]
    measured = {"block_size": b, "total_density": sum(m.sparse_weight.nnz_blocks for m in sparse.values()) * b * b
                / sum(m.in_features * m.out_features for m in sparse.values())}
    write_card(out, sparse_checkpoint_card({**measured, **(report or {})}, out))
    return out


def _write_weights(tensors: dict[str, torch.Tensor], out: Path, max_shard_size: int | str) -> None:
    """`tensors` as model.safetensors, or as shards of at most `max_shard_size` with an index;
    the weight files of an earlier save into `out` that this one does not overwrite are removed,
    since a loader would read them with the new ones."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, filename_pattern=SHARD_PATTERN, max_shard_size=max_shard_size)
    earlier = [*out.glob("model-*-of-*.safetensors"), out / WEIGHTS_NAME, out / INDEX_NAME]
    for filename, names in split.filename_to_tensors.items():
        save_file({name: tensors[name] for name in names}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": split.metadata["total_size"]}, "weight_map": split.tensor_to_filename}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    written = set(split.filename_to_tensors) | ({INDEX_NAME} if split.is_sharded else set())
    for stale in earlier:  # only once the new weights are whole
        if stale.is_file() and stale.name not in written:
            stale.unlink()


def weight_files(path: str | os.PathLike) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of checkpoint directory `path` and, when it is sharded, its index's
    {tensor: file} map (validated: plain file names inside `path` that exist); ([], None) when
    it has neither model.safetensors nor an index."""
    path = Path(path)
    index = path / INDEX_NAME
    if not index.is_file():
        return ([path / WEIGHTS_NAME] if (path / WEIGHTS_NAME).is_file() else []), None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError) as err:
        raise SparseCheckpointError(f"{index}: not a JSON object with a weight_map ({err})") from err
    if not (isinstance(weight_map, dict) and weight_map
            and all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
        raise SparseCheckpointError(f"{index}: weight_map must be a non-empty object of tensor name -> file name, "
                                    f"got {json.dumps(weight_map)[:80]}")
    files = sorted(set(weight_map.values()))
    for name in files:
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise SparseCheckpointError(f"{index}: {name!r} is not a .safetensors file name inside the directory")
        if not (path / name).is_file():
            raise SparseCheckpointError(f"{index}: names {name!r}, which is missing")
    return [path / name for name in files], weight_map


def _read_weights(path: Path, wanted=None) -> tuple[dict[str, torch.Tensor], Path]:
    """The tensors of checkpoint `path` (all its shards; with `wanted`, a predicate on the names,
    only those), and the file errors are reported on. Every shard's names are checked."""
    from safetensors import SafetensorError, safe_open

    files, weight_map = weight_files(path)
    state: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                names = list(f.keys())
                for name in names:
                    if name in seen:
                        raise SparseCheckpointError(f"{file}: tensor {name!r} is in another shard too")
                    if weight_map is not None and weight_map.get(name) != file.name:
                        raise SparseCheckpointError(f"{file}: holds {name!r}, which {INDEX_NAME} puts in "
                                                    f"{weight_map.get(name)!r}")
                    seen.add(name)
                    if wanted is None or wanted(name):
                        state[name] = f.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise SparseCheckpointError(f"{file}: not a readable safetensors file ({err})") from err
    missing = sorted(weight_map.keys() - seen) if weight_map is not None else []
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SparseCheckpointError(f"{path / INDEX_NAME}: lists {missing[0]!r}{more}, which no shard holds")
    return state, (path / INDEX_NAME if weight_map is not None else path / WEIGHTS_NAME)


def push_sparse_checkpoint(path: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                           token: str | None = None) -> list[str]:
    """Upload a sparse checkpoint directory to the Hugging Face hub as it lies: the weights, the
    marker, config, tokenizer, prune report and model card (`model.push_to_hub` would write
    the weights without the marker, which loads nowhere). Returns the files uploaded."""
    from huggingface_hub import HfApi

    path = Path(path)
    block = read_marker(path)["block_size"]  # refuses a directory that is not a valid sparse checkpoint
    files = sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    pickled = [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl"))]
    if pickled:
        raise SparseCheckpointError(f"{path}: {pickled[0]} is a pickle file; it is not uploaded with the checkpoint "
                                    f"(remove it)")
    for needed in (INDEX_NAME if INDEX_NAME in files else WEIGHTS_NAME, "config.json", "README.md"):
        if needed not in files:
            raise SparseCheckpointError(f"{path}: {needed} is missing; save the checkpoint with "
                                        f"save_sparse_pretrained (or blocksparse prune) first")
    weight_files(path)  # an index naming missing or outside files is not uploaded
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if private and not api.repo_info(repo_id).private:
        raise SparseCheckpointError(f"{repo_id} exists and is public; private was asked: nothing uploaded")
    # Exact names: upload_folder matches patterns, and a name may hold * ? [.
    api.upload_folder(repo_id=repo_id, folder_path=str(path), allow_patterns=[glob.escape(f) for f in files],
                      commit_message=f"blocksparse checkpoint ({block}x{block} blocks)")
    return files


def _report(path: str | os.PathLike) -> dict:
    """A checkpoint's prune_report.json; {} when missing, unreadable or not a JSON object."""
    try:
        found = json.loads((Path(path) / REPORT_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def pruned_from(path: str | os.PathLike) -> str | None:
    """The dense model a sparse checkpoint was made from, as its prune_report.json records it
    (`model` from `blocksparse prune`, `source` from `finetune --sparsity`), or None."""
    found = _report(path)
    source = found.get("model") or found.get("source")
    return source if isinstance(source, str) else None


def hidden_channel_order(path: str | os.PathLike) -> torch.Tensor | None:
    """The hidden-channel order a pruned checkpoint records (`prune --permute-channels`): its
    channel k is channel order[k] of the model it was pruned from. None when not permuted."""
    permutation = _report(path).get("channel_permutation")
    where = f"{Path(path) / REPORT_NAME}: channel_permutation"
    if permutation is None:
        return None
    if not isinstance(permutation, dict):
        raise SparseCheckpointError(f"{where} must be an object {{\"hidden\": [...]}}, "
                                    f"got {type(permutation).__name__}")
    recorded = permutation.get("hidden")
    if recorded is None:
        return None
    where += ".hidden"
    if not (isinstance(recorded, list) and recorded
            and all(isinstance(i, int) and not isinstance(i, bool) for i in recorded)):
        raise SparseCheckpointError(f"{where} must be a non-empty list of channel indices, "
                                    f"got {type(recorded).__name__} {str(recorded)[:40]}")
    order = torch.tensor(recorded, dtype=torch.long)
    try:
        check_order(order, where)
    except ValueError as err:
        raise SparseCheckpointError(str(err)) from None
    return order


def is_sparse_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / SPARSE_CHECKPOINT_MARKER).is_file()


def tensor_names(path: str | os.PathLike) -> list[str]:
    """The names of the tensors in directory `path`'s weights (model.safetensors or its shards;
    only their headers are read)."""
    from safetensors import SafetensorError, safe_open

    keys = []
    for file in weight_files(path)[0]:
        try:
            with safe_open(str(file), framework="pt") as weights:
                keys += list(weights.keys())
        except (SafetensorError, OSError) as err:
            raise SparseCheckpointError(f"{file}: not a readable safetensors file ({err})") from err
    return keys


def block_sparse_tensors(path: str | os.PathLike) -> list[str]:
    """The block-sparse tensors in directory `path`'s weights (headers only)."""
    return [key for key in tensor_names(path) if key.endswith(SPARSE_TENSOR_SUFFIXES)]


def _parameter_count(config) -> int | None:
    """Parameters of a Llama-style decoder (embeddings, attention, gated MLP); None without those fields."""
    sizes = [getattr(config, field, None) for field in ("vocab_size", "hidden_size", "intermediate_size",
                                                        "num_hidden_layers", "num_attention_heads")]
    if None in sizes:
        return None
    vocab, hidden, mlp, layers, heads = sizes
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    embeddings = vocab * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return embeddings + layers * (2 * hidden * head_dim * (heads + kv_heads) + 3 * hidden * mlp)


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None


def read_config(name_or_path: str | os.PathLike, dtype: torch.dtype, **hub_kwargs):
    """The model config of a directory (or hub id), checked before any tensor is allocated.

    Raises ConfigError when a size field (SIZE_FIELDS) is not a positive integer, or when
    the weights it describes, in `dtype`, exceed this machine's memory. hub_kwargs go to
    `AutoConfig.from_pretrained` (e.g. local_files_only).
    """
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    file = Path(name_or_path) / "config.json"
    try:
        config = AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
    except (ValueError, StrictDataclassError) as err:  # transformers checks the fields' types
        raise ConfigError(f"{file}: " + " ".join(line.strip() for line in str(err).splitlines())) from err
    for field in SIZE_FIELDS:
        value = getattr(config, field, None)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{file}: {field} must be a positive integer, got {value!r}")
    params, memory = _parameter_count(config), _physical_memory()
    if params is not None and memory is not None:
        need = params * torch.empty(0, dtype=dtype).element_size()
        if need > memory:
            raise ConfigError(f"{file} describes a model of about {params / 1e9:,.1f}B parameters "
                              f"({need / 2**30:,.0f} GiB in {long_name(dtype)}), more than this machine's "
                              f"{memory / 2**30:,.0f} GiB of memory")
    return config


def read_marker(path: str | os.PathLike) -> dict:
    """The validated `blocksparse_config.json` of a sparse checkpoint directory."""
    file = Path(path) / SPARSE_CHECKPOINT_MARKER
    if not file.is_file():
        raise SparseCheckpointError(f"{path} is not a sparse checkpoint: {SPARSE_CHECKPOINT_MARKER} is missing")
    try:
        marker = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SparseCheckpointError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(marker, dict) or marker.get("format") != FORMAT_NAME:
        raise SparseCheckpointError(f"{file}: expected format {FORMAT_NAME!r}, got "
                                    f"{marker.get('format') if isinstance(marker, dict) else marker!r}")
    if marker.get("format_version") not in READABLE_VERSIONS:
        raise SparseCheckpointError(f"{file}: format_version {marker.get('format_version')!r} is not supported "
                                    f"(this blocksparse reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    if marker.get("block_size") not in SUPPORTED_BLOCK_SIZES:
        raise SparseCheckpointError(f"{file}: block_size must be one of {SUPPORTED_BLOCK_SIZES}, "
                                    f"got {marker.get('block_size')!r}")
    modules = marker.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise SparseCheckpointError(f"{file}: 'modules' must name at least one block-sparse module")
    for name, spec in modules.items():
        if not isinstance(spec, dict) or not all(isinstance(spec.get(k), int) for k in ("in_features", "out_features")):
            raise SparseCheckpointError(f"{file}: module {name!r} needs integer in_features and out_features")
    if marker.get("dtype", "float32") not in DTYPES:
        raise SparseCheckpointError(f"{file}: dtype must be one of {sorted(DTYPES)}, got {marker.get('dtype')!r}")
    return marker


def _skeleton(path: Path, dtype: torch.dtype | None):
    """(model, marker) of a validated sparse checkpoint directory: its parameters on the meta
    device (the dense projections never allocated), its block-sparse linears BlockSparseLinear
    with no structure yet, its buffers that are no weights (RoPE's inv_freq) built."""
    sparse_tensors = block_sparse_tensors(path)
    weights = f"the shards of {INDEX_NAME}" if (path / INDEX_NAME).is_file() else WEIGHTS_NAME
    if sparse_tensors and not is_sparse_checkpoint(path):
        # Loaded as a dense model, every pruned projection would be randomly initialised.
        raise SparseCheckpointError(f"{path}: {weights} holds block-sparse tensors ({sparse_tensors[0]!r}, "
                                    f"...) but {SPARSE_CHECKPOINT_MARKER} is missing")
    marker = read_marker(path)
    if not weight_files(path)[0]:
        raise SparseCheckpointError(f"{path}: {WEIGHTS_NAME} is missing")
    if not sparse_tensors:
        raise SparseCheckpointError(f"{path}: {SPARSE_CHECKPOINT_MARKER} marks a sparse checkpoint but "
                                    f"{weights} holds no block-sparse tensor "
                                    f"(*{', *'.join(SPARSE_TENSOR_SUFFIXES)})")
    dtype = dtype or DTYPES[marker.get("dtype", "float32")]
    try:
        config = read_config(path, dtype)
    except OSError as err:
        raise SparseCheckpointError(f"{path}: cannot read config.json ({err})") from err
    # The dense projections are never allocated (a 70B model's would not fit beside its sparse
    # weights): every parameter is assigned from the file.
    model = empty_model(path, dtype, config)

    block_size = marker["block_size"]
    modules = dict(model.named_modules())
    for name, spec in marker["modules"].items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            found = type(linear).__name__ if linear is not None else "nothing"
            raise SparseCheckpointError(f"{path}: {SPARSE_CHECKPOINT_MARKER} lists {name!r} as block-sparse, "
                                        f"but the model built from config.json has {found} there")
        expected = (linear.in_features, linear.out_features, linear.bias is not None)
        given = (spec["in_features"], spec["out_features"], bool(spec.get("bias", False)))
        if expected != given:
            raise SparseCheckpointError(
                f"{path}: module {name!r} is (in={given[0]}, out={given[1]}, bias={given[2]}) in "
                f"{SPARSE_CHECKPOINT_MARKER} but (in={expected[0]}, out={expected[1]}, bias={expected[2]}) "
                f"in config.json")
        try:
            sparse = BlockSparseLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                       block_size=block_size, dtype=dtype)
        except ValueError as err:
            raise SparseCheckpointError(f"{path}: module {name!r}: {err}") from err
        replace_module(model, name, sparse)
    return model, marker


def load_sparse_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None,
                           device: str | torch.device = "cpu"):
    """Load a directory written by `save_sparse_pretrained`: returns `(model, tokenizer)`.

    dtype: the dtype of the returned model (default: the one it was saved in); the model
    is built in it, so float buffers that are no weights (RoPE's inv_freq) stay fp32, as
    `from_pretrained` keeps them. tokenizer is None when the directory holds none.
    """
    path = Path(path)
    model, marker = _skeleton(path, dtype)
    tied_groups = _tied_groups(model)  # before assigning unties them
    tied = {key for keys in tied_groups for key in keys}
    state, weights_file = _read_weights(path)
    _check_tensors(model, state, weights_file, marker["format_version"])
    expected = model.state_dict()
    for key, tensor in state.items():
        # Owned copies, one at a time, in the dtype asked for: the files' memory maps are let
        # go, so the checkpoint may be overwritten while the model lives.
        dtype = expected[key].dtype if key in expected and tensor.is_floating_point() else tensor.dtype
        state[key] = tensor.to(dtype=dtype, copy=True)
    del expected
    for keys in tied_groups:  # a tied tensor is stored under one of its names: all get it
        stored = next((state[key] for key in keys if key in state), None)
        if stored is not None:
            state.update({key: stored for key in keys})
    try:
        # assign: the file's tensors become the parameters, so the weights exist once in memory.
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:  # the BSR validation of BlockSparseLinear reports here
        raise SparseCheckpointError(f"{weights_file}: {_one_line(err)}") from err
    missing = [key for key in result.missing_keys if key not in tied and not key.endswith(_GROUPING_LEAVES)]
    if missing or result.unexpected_keys:
        raise SparseCheckpointError(f"{weights_file}: missing tensors {missing[:5]}, "
                                    f"unexpected tensors {result.unexpected_keys[:5]}")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    unread = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if unread:
        raise SparseCheckpointError(f"{weights_file}: nothing to load into {unread[:5]}")
    return model.to(device=device).eval(), tokenizer_of(path)


def sparse_skeleton(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """`(model, tokenizer)` of a sparse checkpoint with its structure (block indices, row
    groupings) read and every parameter allocated but NOT read: uninitialised memory, which
    a machine commits only where it is written. For a model sharded before its weights are
    read: `fsdp.load_weights` fills each rank's shards, so no rank holds the whole model."""
    path = Path(path)
    model, _ = _skeleton(path, dtype)
    structure, weights_file = _read_weights(path, lambda key: key.endswith(_STRUCTURE_LEAVES))
    for name, module in model.named_modules():
        if isinstance(module, BlockSparseLinear) and name + ".sparse_weight.col" in structure:
            b = module.block_size
            structure[name + ".sparse_weight.values"] = torch.empty(
                structure[name + ".sparse_weight.col"].numel(), b, b, dtype=module.weight.dtype)
    try:
        model.load_state_dict(structure, strict=False, assign=True)
    except RuntimeError as err:
        raise SparseCheckpointError(f"{weights_file}: {_one_line(err)}") from err
    allocate_unread(model)
    missing = [name for name, module in model.named_modules() if isinstance(module, BlockSparseLinear)
               and not all(name + leaf in structure for leaf in (".sparse_weight.crow", ".sparse_weight.col"))]
    if missing:
        raise SparseCheckpointError(f"{weights_file}: no block structure (crow, col) for {missing[:5]}")
    return model.eval(), tokenizer_of(path)


def allocate_unread(model: nn.Module) -> None:
    """Give every meta parameter of `model` CPU memory that is allocated but not written
    (torch.empty: the host commits only the pages something writes), ties kept. In place."""
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                module._parameters[key] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype),
                                                       requires_grad=param.requires_grad)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def empty_model(path: str | os.PathLike, dtype: torch.dtype, config=None) -> nn.Module:
    """The model directory `path`'s config.json (or `config`) describes, in `dtype`, with its
    parameters on the meta device (nothing allocated or initialised), its buffers that are
    no weights (RoPE's inv_freq) built as from_config builds them, ties and the saved
    generation settings (generation_config.json) in place."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, GenerationConfig

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config or read_config(path, dtype), dtype=dtype)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # the context re-wraps every parameter, ties included
    if (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def tokenizer_of(path: str | os.PathLike):
    """The tokenizer saved in directory `path`, or None."""
    from transformers import AutoTokenizer

    path = Path(path)
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(path)
    return None


def _one_line(err: RuntimeError) -> str:
    """torch's "Error(s) in loading state_dict for ...:\n\t<error>", as the error on one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines[1:]) if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else str(err)


def _check_tensors(model: nn.Module, state: dict[str, torch.Tensor], weights_file: Path,
                   marker_version: int) -> None:
    """Raise SparseCheckpointError for unknown names, wrong shapes or dtypes, before loading."""
    expected = model.state_dict()
    sparse_prefixes = tuple(name + ".sparse_weight." for name, module in model.named_modules()
                            if isinstance(module, BlockSparseLinear))
    tied = {key for keys in _tied_groups(model) for key in keys}
    problems = []
    for key, tensor in state.items():
        if key not in expected:
            problems.append(f"unexpected tensor {key!r}")
        elif key.startswith(sparse_prefixes):
            leaf = key.rsplit(".", 1)[1]
            if leaf in ("crow", "col") and (tensor.dtype not in (torch.int32, torch.int64) or tensor.dim() != 1):
                problems.append(f"{key}: expected a 1-D int32 index tensor, got {tensor.dtype} "
                                f"of shape {tuple(tensor.shape)}")
            elif leaf == "values" and not tensor.is_floating_point():
                problems.append(f"{key}: expected floating-point block values, got {tensor.dtype}")
        elif tensor.shape != expected[key].shape:
            problems.append(f"{key}: expected shape {tuple(expected[key].shape)}, got {tuple(tensor.shape)}")
        elif not tensor.is_floating_point() and expected[key].is_floating_point():
            problems.append(f"{key}: expected a floating-point tensor, got {tensor.dtype}")
    missing = [key for key in expected if key not in state and key not in tied
               and not (marker_version == 1 and key.endswith(_GROUPING_LEAVES))]
    if missing:
        problems.append(f"missing tensors {missing[:5]}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    if problems:
        raise SparseCheckpointError(f"{weights_file}: " + "; ".join(problems[:5])
                                    + (f" (+{len(problems) - 5} more problems)" if len(problems) > 5 else ""))
