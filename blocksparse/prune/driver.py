"""Sequential block pruning: `prune_model(model, calib_inputs, PruneOptions(...))`.

The calibration batch flows through the already-pruned layers, so each decoder
layer is pruned against the inputs it will really see. Inside a layer the
linears are processed in the order they run ([q, k, v], o, [gate, up], down),
each set against inputs produced by the already-pruned members before it:
choose the block mask (a score from `blocksparse.masks`, or greedy block OBS),
re-solve the kept weights (`reconstruct.py`), then optionally refine the whole
layer against the dense one (`refine.py`). How many blocks each matrix keeps
comes from `allocation.py`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from ..families import decoder_layers, family_of
from ..format import DEFAULT_BLOCK_SIZE, check_block_size
from ..grouping import cluster_block_rows, group_of, group_union_sizes, shared_column_groups
from ..masks import (COMPARISON_GROUPS, SCORES, block_scores, element_mask, grouped_block_mask, select_block_mask,
                     union_blocks_for)
from ..sparsify import FilterFn, check_block_divisible, sparsify_model, target_linears
from .allocation import ALLOCATIONS, explicit_densities, keep_counts, outlier_ratio, owl_densities
from .calibration import (DEFAULT_SINK_TOKENS, DEFAULT_SINK_WEIGHT, InputStats, calibration_batches,
                          advance, collect_stats, dense_sq_norms, layer0_inputs, linear_groups,
                          placed_on, sink_probe_ids)
from .permute import channel_orders, permute_layer, permute_outside
from .reconstruct import DEFAULT_DAMP, dense_target_weight, greedy_obs_mask, output_error, reconstruct_block_rows
from .refine import REFINE_PRECISIONS, refine_layer

# A score of `blocksparse.masks.SCORES`, or greedy block OBS.
METHODS = (*SCORES, "obc")
RECONSTRUCT_TARGETS = ("dense", "pruned")


@dataclass(frozen=True)
class PruneOptions:
    """Every choice of `prune_model`, validated when constructed.

    What is removed:
      sparsity: fraction of the target linears' weights removed (with a non-uniform
        allocation: of all of them together). block_size: the block edge b.
      method: a block score of `blocksparse.masks.SCORES` ("wanda" |W| ||X_j||, "obs"
        W^2 ||X_j||^2, "magnitude"), or "obc": greedy block OBS, dropping the blocks whose
        removal costs least output error after re-solving the others, in `obc_rounds`
        rounds (None: one block at a time).
      comparison_group: "block-row" (every block row keeps the same number of blocks)
        or "global" (one threshold per matrix; for comparison only).
      row_group / union_density: grouped masks. With row_group G > 1 every group of G
        block rows (chosen by their scores, any rows) shares one set of at most
        union_density * K/b block columns, and each row keeps its best blocks inside
        it; the kernels' grouped schedule then computes only that union. None means
        fully shared (the set is exactly the row's blocks: union = density);
        union_density 1 leaves the rows free. G = 1: free masks.
      allocation: "uniform", "owl" (outlier-weighted layer-wise densities, mean =
        target, +-owl_spread; outliers are scores above owl_threshold x the mean), or
        {linear name or module prefix: density} (`*` matches anything; the linears
        not named share the rest of the budget).
      permute_channels: first reorder the dense model's channels (hidden, MLP, value) by
        importance, so that heavy channels share blocks (`permute.py`; the model computes
        the same function, and prune_report.json records the hidden order).
    How the kept weights are fitted:
      reconstruct: re-solve each block row's kept weights by least squares on the
        calibration inputs (always, with "obc"). reconstruct_target: "dense" fits the
        dense model's output of each linear (correcting what earlier pruned layers let
        through); "pruned" fits the linear's own dense weights on the pruned inputs.
      damp: least-squares damping as a fraction of mean(diag X^T X).
      refine_steps / refine_lr: Adam steps on each pruned decoder layer's kept weights
        so that its output on the pruned hidden states matches the dense layer's on the
        dense ones (`refine_layer`); lr relative to each matrix's RMS weight; 0 = off.
      refine_precision: "float32", or "bfloat16": the refinement steps' forward and
        backward under bf16 autocast (weights, Adam and the losses that decide whether
        a refinement is kept stay fp32); about half the time where bf16 matmuls are native.
    Calibration:
      sink_weight: how many ordinary tokens the first token of every window (the
        attention sink, with a residual norm ~100x the others) counts for in scores
        and fits; 1 = no weighting.
      sink_tokens: how many of the calibration text's most frequent tokens (and BOS)
        are also fitted as one-token sequences (`sink_probe_ids`), so the sink forms
        for any first token; they share the sink weight; 0 = off.
      batch_size: calibration windows per forward pass.
    """

    sparsity: float = 0.5
    block_size: int = DEFAULT_BLOCK_SIZE
    method: str = "wanda"
    comparison_group: str = "block-row"
    row_group: int = 1
    union_density: float | None = None
    allocation: str | Mapping[str, float] = "uniform"
    permute_channels: bool = False
    owl_threshold: float = 5.0
    owl_spread: float = 0.08
    reconstruct: bool = True
    reconstruct_target: str = "dense"
    damp: float = DEFAULT_DAMP
    obc_rounds: int | None = 8
    refine_steps: int = 0
    refine_lr: float = 0.03
    refine_precision: str = "float32"
    sink_weight: float = DEFAULT_SINK_WEIGHT
    sink_tokens: int = DEFAULT_SINK_TOKENS
    batch_size: int = 8

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        check_block_size(self.block_size)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.comparison_group not in COMPARISON_GROUPS:
            raise ValueError(f"comparison_group must be one of {tuple(COMPARISON_GROUPS)}, "
                             f"got {self.comparison_group!r}")
        if isinstance(self.row_group, bool) or not isinstance(self.row_group, int) or self.row_group < 1:
            raise ValueError(f"row_group must be an int >= 1 (1 = free masks), got {self.row_group!r}")
        if self.union_density is not None and not 0.0 < self.union_density <= 1.0:
            raise ValueError(f"union_density must be in (0, 1] (or None: fully shared), got {self.union_density}")
        if self.union_density is not None and self.row_group == 1:
            raise ValueError("union_density bounds a row group's shared columns: give row_group > 1 with it")
        if self.row_group > 1 and self.comparison_group != "block-row":
            raise ValueError("row groups share block columns between block rows; use comparison_group='block-row'")
        if self.method == "obc" and self.comparison_group != "block-row":
            raise ValueError("method 'obc' chooses blocks per block row; use comparison_group='block-row'")
        if self.method == "obc" and not self.reconstruct:
            raise ValueError("method 'obc' re-solves the kept weights by construction; keep reconstruct=True")
        if isinstance(self.allocation, str) and self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS} or a {{linear name or prefix: density}} "
                             f"mapping, got {self.allocation!r}")
        if self.reconstruct_target not in RECONSTRUCT_TARGETS:
            raise ValueError(f"reconstruct_target must be one of {RECONSTRUCT_TARGETS}, "
                             f"got {self.reconstruct_target!r}")
        if not self.sink_weight >= 1.0:
            raise ValueError(f"sink_weight must be >= 1 (1 = no weighting), got {self.sink_weight}")
        if not (isinstance(self.sink_tokens, int) and self.sink_tokens >= 0):
            raise ValueError(f"sink_tokens must be an integer >= 0 (0 = only the windows' first tokens), "
                             f"got {self.sink_tokens!r}")
        if not (isinstance(self.refine_steps, int) and self.refine_steps >= 0):
            raise ValueError(f"refine_steps must be an integer >= 0 (0 = no refinement), got {self.refine_steps!r}")
        if self.refine_steps and not self.refine_lr > 0:
            raise ValueError(f"refine_lr must be > 0, got {self.refine_lr}")
        if self.refine_precision not in REFINE_PRECISIONS:
            raise ValueError(f"refine_precision must be one of {tuple(REFINE_PRECISIONS)}, "
                             f"got {self.refine_precision!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")


@contextlib.contextmanager
def _eval_without_cache(model: nn.Module):
    """Eval mode and no KV cache for the calibration passes; both restored after."""
    was_training = model.training
    model.eval()
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False
    try:
        yield
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
        model.train(was_training)


def _by_layer(layers: nn.ModuleList, targets: Mapping[str, nn.Linear]) -> list[dict[str, nn.Linear]]:
    """The target linears of each decoder layer (every target must sit in one)."""
    per_layer: list[dict[str, nn.Linear]] = [{} for _ in layers]
    for name, lin in targets.items():
        owner = next((i for i, layer in enumerate(layers) if any(m is lin for m in layer.modules())), None)
        if owner is None:
            raise ValueError(f"target linear {name} is outside the decoder layers; it cannot be pruned "
                             f"sequentially (narrow target_modules / filter_fn)")
        per_layer[owner][name] = lin
    return per_layer


def _keep_per_row(linears_by_layer, shapes, sq, options: PruneOptions):
    """Blocks kept per block row of every target linear, and OWL's outlier ratios (or None).
    sq: the dense model's input norms (`dense_sq_norms`), needed with OWL."""
    density = 1.0 - options.sparsity
    outlier_ratios = None
    if isinstance(options.allocation, Mapping):
        densities = explicit_densities(options.allocation, shapes, density)
    elif options.allocation == "owl":
        outlier_ratios = [outlier_ratio([lin.weight for lin in per_layer.values()],
                                        [sq[name] for name in per_layer], options.owl_threshold)
                          if per_layer else 0.0 for per_layer in linears_by_layer]
        layer_density = owl_densities(outlier_ratios, density, options.owl_spread)
        densities = {name: layer_density[i] for i, per_layer in enumerate(linears_by_layer) for name in per_layer}
    else:
        densities = {name: density for name in shapes}
    return keep_counts(densities, shapes, options.block_size, density), outlier_ratios


@torch.no_grad()
def prune_model(model: nn.Module, calib_inputs: torch.Tensor, options: PruneOptions | None = None, *,
                target_modules: Sequence[str] | None = None, filter_fn: FilterFn | None = None,
                convert: bool = True, progress: bool = True, execution_device: str | torch.device | None = None,
                offload_dir: str | os.PathLike | None = None, **choices) -> dict:
    """Prune the target linears of `model` in place to b x b blocks; return a report dict.

    calib_inputs: token ids [nsamples, seqlen]. options: a `PruneOptions`; `choices`
    are its fields for short calls (`prune_model(model, calib, sparsity=0.5, method="obc")`)
    and override `options`. Targets: `blocksparse.sparsify.target_linears` (the family's
    projections by default), all inside the decoder layers. convert: finish by
    swapping the pruned linears for BlockSparseLinear (the ones kept whole stay
    nn.Linear, unless nothing was pruned at all); otherwise they stay nn.Linear with
    zeros outside the blocks. execution_device: where the work runs (default: where the
    model is). A model kept elsewhere (e.g. on the CPU, larger than the GPU) moves there one
    decoder layer at a time, with what reaches it; the results are those of the run on
    `execution_device` (docs/DESIGN.md: the peak memory). offload_dir: for a model whose
    weights are memory-mapped files (`integration.model.load_mapped`, read only): each
    decoder layer is copied out before it is pruned, and once pruned and converted its
    tensors are written to offload_dir/layer-<i>.safetensors and mapped from there (permuted
    embeddings, norm and head to offload_dir/outside.safetensors), so the
    host holds about one layer in memory and the page cache the rest (where glibc allocates,
    its mmap threshold is then fixed at 1 MiB for the rest of the process, so freed layers
    go back to the system).
    """
    options = dataclasses.replace(options or PruneOptions(), **choices)
    device = _execution_device(model, execution_device)
    layers = decoder_layers(model)
    targets = target_linears(model, target_modules, filter_fn)
    if not targets:
        raise ValueError(f"no nn.Linear in the model matches target_modules={tuple(target_modules or ())}"
                         + (" / filter_fn" if filter_fn is not None else ""))
    check_block_divisible(targets, options.block_size)
    linears_by_layer = _by_layer(layers, targets)
    shapes = {name: (lin.out_features, lin.in_features) for name, lin in targets.items()}
    del targets  # linears_by_layer holds them, each until its layer is converted

    if offload_dir is not None:
        _release_freed_blocks()
    batches = calibration_batches(calib_inputs, options.batch_size)
    n_calib = len(batches)  # the sink probes, if any, ride along as one more batch
    probes = (sink_probe_ids(calib_inputs, options.sink_tokens, getattr(model.config, "bos_token_id", None))
              if options.sink_tokens else None)
    if probes is not None:
        batches.append(probes)
    n_sinks = calib_inputs.shape[0] + (0 if probes is None else probes.shape[0])
    # The windows' first tokens and the probes share the sink weight; none counts less than once.
    stats_sink_weight = max(1.0, options.sink_weight * calib_inputs.shape[0] / n_sinks)

    with _eval_without_cache(model):
        hidden, kwargs = layer0_inputs(model, layers, batches, device)
        sq = (dense_sq_norms(layers, hidden[:n_calib], kwargs[:n_calib], linears_by_layer, device)
              if options.allocation == "owl" or options.permute_channels else None)
        keep, outlier_ratios = _keep_per_row(linears_by_layer, shapes, sq, options)
        pruned = {name for name, (_, cols) in shapes.items() if keep[name] < cols // options.block_size}
        orders = None
        if options.permute_channels:  # the layers follow one by one, as they are pruned
            family = family_of(model)
            orders = channel_orders(model, family, linears_by_layer, sq, pruned)
            changed = permute_outside(model, family, orders.hidden)
            if offload_dir is not None and changed:  # like the layers, kept in a file and mapped
                _write_and_map_parameters(changed, Path(offload_dir) / "outside.safetensors")
            if orders.hidden is not None:
                hidden[:] = [h.index_select(-1, orders.hidden.to(h.device)) for h in hidden]

        def finish(names, masks, row_perms):
            """Convert one layer's pruned linears once they are final (its dense weights go); the
            linears that keep every block stay nn.Linear, unless nothing is pruned at all."""
            if convert and names:
                sparsify_model(model, block_masks={name: masks[name] for name in names},
                               block_size=options.block_size,
                               row_perms=row_perms if options.row_group > 1 else None, row_group=options.row_group,
                               whole_stays_dense=bool(pruned))

        masks, row_perms, per_linear, refine_loss = _prune_layers(
            layers, linears_by_layer, hidden, kwargs, n_calib, keep, stats_sink_weight, options, progress, device,
            finish, None if offload_dir is None else Path(offload_dir),
            None if orders is None else (lambda i, layer: permute_layer(layer, family, orders, i, model.config)))

    kept = sum(int(m.sum()) for m in masks.values()) * options.block_size ** 2
    total = sum(n * k for n, k in shapes.values())
    return {
        "total_density": kept / total,
        "target_sparsity": options.sparsity,
        "block_size": options.block_size,
        "method": options.method,
        "comparison_group": options.comparison_group,
        "row_group": options.row_group,
        "union_density": options.union_density,
        "reconstruct": options.reconstruct,
        "reconstruct_target": options.reconstruct_target if options.reconstruct else None,
        "allocation": (options.allocation if isinstance(options.allocation, str)
                       else {"explicit": dict(options.allocation)}),
        "channel_permutation": (None if orders is None else
                                {"hidden": None if orders.hidden is None else orders.hidden.tolist()}),
        "damp": options.damp,
        "sink_weight": options.sink_weight,
        "sink_tokens": 0 if probes is None else int(probes.shape[0]),
        "obc_rounds": options.obc_rounds if options.method == "obc" else None,
        "refine": ({"steps": options.refine_steps, "lr": options.refine_lr, "precision": options.refine_precision,
                    "layer_loss_before_after": {str(i): list(v) for i, v in refine_loss.items()}}
                   if options.refine_steps > 0 else None),
        "calibration": {"nsamples": int(calib_inputs.shape[0]), "seqlen": int(calib_inputs.shape[1])},
        "owl_outlier_ratios": outlier_ratios,
        "layers": per_linear,
    }


def _prune_layers(layers, linears_by_layer, hidden, kwargs, n_calib, keep, sink_weight, options: PruneOptions,
                  progress: bool, device: torch.device, finish, offload_dir: Path | None, permute):
    """The sequential loop: prune, fit and refine each decoder layer on `device`, advance the
    hidden states, then `finish(names, masks, row_perms)` the layer (and with offload_dir,
    write it there and map it back). Each entry of `linears_by_layer` is emptied when its
    layer is done. permute: None, or `permute(i, layer)` reorders a layer's channels first.

    hidden[:n_calib] (what reaches layer 0, with its kwargs) are the calibration windows; a
    batch after them holds the sink probes.
    """
    use_dense_target = options.reconstruct and options.reconstruct_target == "dense"
    track_dense = use_dense_target or options.refine_steps > 0
    dense_hidden = [h.clone() for h in hidden] if track_dense else None
    need_gram = options.reconstruct or options.method == "obc"
    needs_stats = options.method == "obc" or SCORES[options.method].needs_activations or options.reconstruct
    masks: dict[str, torch.Tensor] = {}
    row_perms: dict[str, torch.Tensor] = {}
    per_linear: dict[str, dict] = {}
    refine_loss: dict[int, tuple[float, float]] = {}

    def prune_layer(i: int, layer: nn.Module, linears: dict[str, nn.Linear]) -> None:
        with placed_on(layer, device):
            # The dense model's path must advance through every layer, pruned here or not.
            dense_layer = (copy.deepcopy(layer) if linears else layer) if track_dense else None
            if linears:
                for names in linear_groups(layer, linears, hidden[0], kwargs[0]):
                    stats = (collect_stats(layer, names, linears, hidden, kwargs, need_gram, sink_weight,
                                           *((dense_layer, dense_hidden) if use_dense_target else ()))
                             if needs_stats else None)
                    for name in names:
                        masks[name], row_perms[name], per_linear[name] = _prune_linear(
                            linears[name], stats, keep[name], options)
            if dense_layer is not None:
                advance(dense_layer, dense_hidden, kwargs)
            if linears and options.refine_steps > 0:
                weights = {name: (lin.weight, element_mask(masks[name], options.block_size).to(lin.weight.device))
                           for name, lin in linears.items()}
                has_probes = len(hidden) > n_calib
                sink = (hidden[n_calib], kwargs[n_calib], dense_hidden[n_calib]) if has_probes else None
                refine_loss[i] = refine_layer(layer, weights, hidden[:n_calib], kwargs[:n_calib],
                                              dense_hidden[:n_calib], options.refine_steps, options.refine_lr,
                                              sink=sink, precision=REFINE_PRECISIONS[options.refine_precision])
            advance(layer, hidden, kwargs)
            del dense_layer
            finish(list(linears), masks, row_perms)

    iterator = range(len(layers))
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, desc="pruning layers", unit="layer")
    for i in iterator:
        if offload_dir is not None and next(layers[i].parameters()).device == device:
            _own(layers[i])  # its mapped files are read only (moving to another device copies anyway)
        if permute is not None:
            permute(i, layers[i])
        # The entry goes with the call: nothing holds a converted layer's dense weights after it.
        linears, linears_by_layer[i] = linears_by_layer[i], {}
        prune_layer(i, layers[i], linears)
        del linears
        if offload_dir is not None:
            _write_and_map(layers[i], offload_dir / f"layer-{i}.safetensors")
    return masks, row_perms, per_linear, refine_loss


def _release_freed_blocks() -> None:
    """Where glibc allocates, fix its mmap threshold at 1 MiB: it otherwise raises the threshold
    as large blocks are freed, and the freed layers then stay in its heap (measured: host
    memory grew by a quarter of a layer with every layer instead of staying flat)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _own(module: nn.Module) -> None:
    """Give every tensor of `module` its own memory (a copy of what may be a read-only map)."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        t.data = t.data.clone()


def _written_and_mapped(tensors: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Write `tensors` to `path` (safetensors); the same tensors, memory-mapped from there."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: t.detach().contiguous().cpu() for key, t in tensors.items()}, str(path))
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def _write_and_map(module: nn.Module, path: Path) -> None:
    """Write `module`'s tensors to `path` and use them memory-mapped from there."""
    module.load_state_dict(_written_and_mapped(module.state_dict(), path), assign=True)


def _write_and_map_parameters(params: Mapping[str, nn.Parameter], path: Path) -> None:
    """The same for `params` (by names of their own); the Parameter objects stay, so ties to
    them hold."""
    for name, mapped in _written_and_mapped(params, path).items():
        params[name].data = mapped


def _execution_device(model: nn.Module, requested) -> torch.device:
    if requested is None:
        return next(model.parameters()).device
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _prune_linear(lin: nn.Linear, stats: InputStats | None, keep_per_row: int, options: PruneOptions):
    """Choose the block mask (and row grouping) of one linear, re-solve its kept weights, write them back.

    Returns (mask, row_perm or None, report entry).
    """
    b, g = options.block_size, options.row_group
    weight = lin.weight.data
    target = weight.float()
    if stats is not None and options.reconstruct and stats.cross is not None:
        target = dense_target_weight(target, stats.gram, stats.cross, options.damp)
    cols = target.shape[1] // b
    union_blocks = union_blocks_for(cols, keep_per_row, options.union_density) if g > 1 else cols
    sq_norms = None if stats is None else stats.sq_norms
    perm = None
    if options.method == "obc":
        row_groups = None
        if g > 1:  # groups chosen on the diagonal OBS saliency; OBC then drops whole group-columns
            perm, _ = shared_column_groups(block_scores(target, sq_norms, b, "obs"), g, keep_per_row, union_blocks)
            row_groups = group_of(perm, g)
        mask = greedy_obs_mask(target, stats.gram, keep_per_row, b, options.damp, options.obc_rounds,
                               row_groups=row_groups, union_blocks=union_blocks)
    else:
        scores = block_scores(target, sq_norms, b, options.method)
        if g > 1:
            mask, perm = grouped_block_mask(scores, keep_per_row, g, union_blocks)
        else:
            mask = select_block_mask(scores, keep_per_row, options.comparison_group)
    if options.reconstruct:
        new = reconstruct_block_rows(target, mask, stats.gram, options.damp)
    else:
        new = target * element_mask(mask, b).to(target.dtype)
    info = {
        "density": float(mask.float().mean()),
        "blocks_per_row": sorted(set(mask.sum(1).tolist())),
        "zero_input_columns": int((~mask.any(0)).sum()) * b,
        "zero_output_rows": int((~mask.any(1)).sum()) * b,
    }
    if g > 1:
        info["union_density"] = _union_densities(mask.cpu(), perm, g)
    if stats is not None and stats.gram is not None:
        info["rel_output_error"] = output_error(target, new, stats.gram)
    lin.weight.data.copy_(new.to(weight.dtype))
    return mask.cpu(), perm, info


def _union_densities(mask: torch.Tensor, perm: torch.Tensor, group_size: int) -> dict:
    """What the grouped kernels compute, as a fraction of dense: the forward over the mask's
    own row groups, and the backward dX = dY W over W^T's block rows clustered for G."""
    forward = group_union_sizes(mask, group_size, perm).double().mean() / mask.shape[1]
    transposed = mask.t().contiguous()
    backward = (group_union_sizes(transposed, group_size, cluster_block_rows(transposed, group_size))
                .double().mean() / transposed.shape[1])
    return {"group_size": group_size, "forward": round(float(forward), 4), "transposed": round(float(backward), 4)}
