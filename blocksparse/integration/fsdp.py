"""FSDP2 for recovery training: shard a (PEFT) model layer by layer, gather what is saved,
and keep the trained state as a sharded checkpoint of safetensors files.

Under `torchrun ... blocksparse finetune --fsdp` every decoder layer and then the root
module are `fully_shard`ed: the frozen block values (Parameters), the LoRA weights and
their Adam moments live 1/world_size on each rank, and each layer's are gathered for its
forward and backward. The index arrays (crow, col, row_perm) stay buffers, replicated:
they are what every rank needs to run the op, and they are ~1/128 of the values' bytes.

A checkpoint-N of such a run holds the PEFT adapter gathered on rank 0 (a usable adapter,
as in every other run), each rank's RNG state (rng_state_<rank>.safetensors), and in
`fsdp/` every rank's shards of the trained parameters and optimizer moments
(torch.distributed.checkpoint with its safetensors writer, so a resume may use another
world size: it continues, though not bit for bit, as the data and dropout draws are
then split differently) and the optimizer's and scheduler's plain settings as JSON.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from torch import nn

SHARDED_DIR = "fsdp"  # inside checkpoint-N
STATE_FILE = "state.json"  # optimizer param groups, scheduler state, the world size that wrote it
_MODEL, _OPTIM = "model.", "optim."


def shard_model(model: nn.Module) -> None:
    """`fully_shard` every decoder layer of `model` (a causal LM, or a PeftModel around one),
    then the root; the process group must be initialised. In place."""
    from torch.distributed.fsdp import fully_shard

    from ..families import decoder_layers

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in decoder_layers(base):
        fully_shard(layer)
    fully_shard(model)


def load_weights(model: nn.Module, path: str) -> None:
    """Fill the parameters of a sharded `model` built by `model.load_skeleton(path)` (or a
    PeftModel around one) from that directory: DCP's Hugging Face reader over its
    safetensors files, each rank reading only its own shards. Every parameter the files lack
    must be a trainable adapter's (PEFT initialised it). Collective."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint import load as dcp_load

    from .checkpoint import SparseCheckpointError, tensor_names, weight_files

    # DCP's reader takes every *.safetensors file in the directory: only the checkpoint's may be there.
    listed = {file.name for file in weight_files(path)[0]}
    stray = sorted(name for name in os.listdir(path) if name.endswith(".safetensors") and name not in listed)
    if stray:
        raise SparseCheckpointError(f"{path}: {stray[0]} is not one of the model's weight files "
                                    f"({', '.join(sorted(listed))}); move it away, the sharded reader would read it")
    in_file = set(tensor_names(path))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = next(name for name, m in model.named_modules() if m is base)
    wanted, missing = {}, []
    for name, param in model.named_parameters():  # a tied parameter once, under its first name
        key = name[len(prefix) + 1:] if prefix else name
        key = key.replace(".base_layer.", ".")  # PEFT's wrapped linear
        if key in in_file:
            wanted[key] = param
        elif not param.requires_grad:
            missing.append(key)
    if missing:
        raise SparseCheckpointError(f"{path}: holds no {missing[0]!r}" + (f" (+{len(missing) - 1} more)"
                                                                        if len(missing) > 1 else ""))
    try:
        dcp_load(wanted, storage_reader=HuggingFaceStorageReader(path))
    except Exception as err:  # DCP wraps a missing or mis-shaped tensor in its own CheckpointException
        raise SparseCheckpointError(f"{path}: its tensors do not fit the model ({type(err).__name__}: "
                                    f"{_first_line(err)[:300]})") from err


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t`: its shard for a DTensor, `t` itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def _trained_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters of a sharded `model`, whole, on rank 0's CPU (other ranks get {}).
    A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=True))
    names = _trained_names(model)
    return {name: t for name, t in state.items() if name in names}


def _split(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) of the trained parameters as DCP sees them: tensors by
    flat name, and the optimizer's param groups (plain values) apart."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    names = _trained_names(model)
    tensors = {_MODEL + name: t for name, t in model_state.items() if name in names}
    for fqn, moments in optim_state["state"].items():
        for key, t in moments.items():
            tensors[f"{_OPTIM}{fqn}.{key}"] = t
    return tensors, optim_state


def save_sharded(folder: str, model: nn.Module, optimizer, scheduler) -> None:
    """Write `folder`/fsdp: every rank's shards of the trained parameters and their optimizer
    state, and (rank 0) the param groups, scheduler state and world size as JSON. Collective."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint import save as dcp_save

    import shutil

    path = os.path.join(folder, SHARDED_DIR)
    rank = dist.get_rank()
    if rank == 0:  # the reader takes every shard file there: none may be left from an earlier save
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
    dist.barrier()
    tensors, optim_state = _split(model, optimizer)
    dcp_save(tensors, storage_writer=HuggingFaceStorageWriter(path, save_distributed=True))
    _save_rng(folder, rank)
    if rank == 0:
        state = {"world_size": dist.get_world_size(), "param_groups": optim_state["param_groups"],
                 "scheduler": _plain(scheduler.state_dict()) if scheduler is not None else None}
        with open(os.path.join(path, STATE_FILE), "w") as f:
            json.dump(state, f, indent=1)
    dist.barrier()  # the checkpoint is whole before the Trainer marks it so


def load_sharded(folder: str, model: nn.Module, optimizer, scheduler) -> None:
    """Load what `save_sharded` wrote into the sharded `model`, `optimizer` and `scheduler`, in
    place (any world size: DCP reshards). Collective."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = os.path.join(folder, SHARDED_DIR)
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise ValueError(f"{folder} holds no sharded training state ({SHARDED_DIR}/{STATE_FILE}): it was not "
                         "saved by an FSDP run (resume it without --fsdp), or its save was cut short")
    with open(os.path.join(path, STATE_FILE)) as f:
        saved = json.load(f)
    tensors, optim_state = _split(model, optimizer)
    try:
        dcp_load(tensors, storage_reader=HuggingFaceStorageReader(path))
    except Exception as err:  # DCP wraps a missing or mis-shaped tensor in its own CheckpointException
        raise ValueError(f"{path}: its shards do not fit this model and optimizer ({type(err).__name__}: "
                         f"{_first_line(err)[:300]})") from err
    model_state = {name[len(_MODEL):]: t for name, t in tensors.items() if name.startswith(_MODEL)}
    optim_state = {"state": {fqn: {key: tensors[f"{_OPTIM}{fqn}.{key}"] for key in moments}
                             for fqn, moments in optim_state["state"].items()},
                   "param_groups": saved["param_groups"]}
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    if scheduler is not None and saved["scheduler"] is not None:
        scheduler.load_state_dict(saved["scheduler"])


def load_rng(folder: str) -> None:
    """This rank's RNG state from a checkpoint written by `save_sharded` (LoRA dropout draws
    continue where they stopped)."""
    from safetensors.torch import load_file

    path = os.path.join(folder, f"rng_state_{dist.get_rank()}.safetensors")
    if not os.path.isfile(path):  # a resume on more ranks than wrote it: those draw afresh
        return
    states = load_file(path)
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _save_rng(folder: str, rank: int) -> None:
    from safetensors.torch import save_file

    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    save_file(states, os.path.join(folder, f"rng_state_{rank}.safetensors"))


def _plain(value):
    """A scheduler's state dict as JSON can hold it (LambdaLR keeps None for its function)."""
    if isinstance(value, dict):
        return {key: _plain(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def end_process_group() -> None:
    """After this rank's part of a distributed run has succeeded: free what still holds the
    process group (a sharded model's DTensors and their device mesh; PEFT models sit in
    reference cycles, which only the collector frees), then destroy it. Left to the
    interpreter's exit, gloo's teardown aborted ~1 run in 25 ("terminate called without an
    active exception") after the work was done. No barrier: a rank that finished may wait here
    far longer than a collective's timeout while rank 0 evaluates. Nothing without a group."""
    import gc

    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    dist.destroy_process_group()
