"""Block pruning of Llama-style models with calibration data.

`prune_model(model, calib_inputs, sparsity=0.5)` prunes the target linears of
every decoder layer to b x b blocks (b = 16 by default), sequentially: the
calibration batch flows through the already-pruned layers, so each layer is
pruned against the inputs it will really see. Inside a layer the linears are
processed in the order they run ([q, k, v], o, [gate, up], down), each group
against inputs produced by the already-pruned members before it.

Read top to bottom:
1. block scores (Wanda, OBS-style, magnitude) and masks (per block row / global);
2. reconstruction: least squares of the kept weights of each block row, and the
   greedy block-OBS search ("obc") that picks the mask by the exact output error
   of dropping a whole block;
3. sparsity allocation over layers (uniform, OWL outlier-weighted, explicit);
4. the sequential driver `prune_model` and its report, and `refine_layer`, the
   gradient-based fit of a whole pruned decoder layer to the dense one.

Notation: W [N, K] (out x in), X [tokens, K] the linear's input, H = X^T X,
one "block row" = b consecutive output rows, which share the kept block columns.
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
import math
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .format import DEFAULT_BLOCK_SIZE, check_block_size, check_divisible
from .integration.sparsify import LLAMA_TARGET_MODULES, sparsify_model, target_linears

METHODS = ("wanda", "obs", "magnitude", "obc")
GROUPS = ("block-row", "global")
ALLOCATIONS = ("uniform", "owl")
RECONSTRUCT_TARGETS = ("dense", "pruned")
DEFAULT_DAMP = 0.01
DEFAULT_SINK_WEIGHT = 1000.0
DEFAULT_SINK_TOKENS = 1024


# --------------------------------------------------------------------------- 1. scores and masks
def block_scores(weight: torch.Tensor, act_sq_norms: torch.Tensor | None, block_size: int,
                 method: str = "wanda") -> torch.Tensor:
    """Importance of every b x b tile of W [N, K]: float [N/b, K/b].

    wanda: sum over the tile of |W_ij| * ||X_j||; obs: sum of W_ij^2 * ||X_j||^2
    (the diagonal OBS saliency); magnitude: sum of |W_ij|. act_sq_norms [K] holds
    ||X_j||^2 over the calibration tokens (unused by magnitude).
    """
    n, k = weight.shape
    w = weight.detach().float()
    if method == "magnitude":
        elementwise = w.abs()
    else:
        if act_sq_norms is None or act_sq_norms.shape != (k,):
            given = None if act_sq_norms is None else tuple(act_sq_norms.shape)
            raise ValueError(f"{method} scores need act_sq_norms of shape ({k},), got {given}")
        sq = act_sq_norms.float().clamp_min(0)
        if method == "wanda":
            elementwise = w.abs() * sq.sqrt()[None, :]
        elif method in ("obs", "obc"):
            elementwise = w.square() * sq[None, :]
        else:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    b = block_size
    return elementwise.reshape(n // b, b, k // b, b).sum(dim=(1, 3))


def blocks_to_keep(n_blocks: int, density: float) -> int:
    """Whole blocks kept out of n_blocks at `density` (at least one)."""
    return max(1, min(n_blocks, int(round(density * n_blocks))))


def select_block_mask(scores: torch.Tensor, keep_per_row: int, group: str = "block-row") -> torch.Tensor:
    """Bool mask [N/b, K/b] of the kept blocks.

    block-row: every block row keeps its `keep_per_row` best blocks (so all block
    rows hold the same number of blocks). global: the keep_per_row * N/b best
    blocks of the whole matrix (one threshold; rows may be left nearly empty).
    """
    rows, cols = scores.shape
    if not 1 <= keep_per_row <= cols:
        raise ValueError(f"keep_per_row must be in [1, {cols}], got {keep_per_row}")
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
    if group == "block-row":
        mask.scatter_(1, scores.topk(keep_per_row, dim=1).indices, True)
    elif group == "global":
        mask.view(-1)[scores.flatten().topk(keep_per_row * rows).indices] = True
    else:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    return mask


def element_mask(block_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    return block_mask.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)


# --------------------------------------------------------------------------- 2. reconstruction
def damped(gram: torch.Tensor, damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """H + damp * mean(diag H) * I (dead input channels get a unit diagonal)."""
    h = gram.clone()
    diag = h.diagonal()
    diag[diag == 0] = 1.0
    diag += damp * diag.mean()
    return h


def reconstruct_block_rows(weight: torch.Tensor, block_mask: torch.Tensor, gram: torch.Tensor,
                damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """Re-solve the kept weights of every block row against the calibration inputs.

    For block row r with kept input columns S: argmin_V ||X W_r^T - X_S V^T||^2,
    i.e. H[S, S] V^T = H[S, :] W_r^T with H damped. The b rows of a block row share
    S, so one Cholesky factor serves all of them; block rows with the same number
    of kept blocks are solved as one batch. Returns the new W, zero outside the mask.
    """
    n, k = weight.shape
    b = n // block_mask.shape[0]
    h = damped(gram.double(), damp)
    w = weight.detach().double()
    out = torch.zeros_like(w)
    counts = block_mask.sum(1)
    for count in counts.unique().tolist():
        rows = torch.nonzero(counts == count).flatten()
        cols = torch.nonzero(block_mask[rows])[:, 1].view(len(rows), count)          # [R, count]
        idx = (cols[:, :, None] * b + torch.arange(b, device=cols.device)).flatten(1)  # [R, m]
        h_ss = h[idx[:, :, None], idx[:, None, :]]                                     # [R, m, m]
        w_rows = w.view(n // b, b, k)[rows]                                            # [R, b, K]
        rhs = h[idx] @ w_rows.transpose(1, 2)                                          # [R, m, b]
        solved = torch.cholesky_solve(rhs, torch.linalg.cholesky(h_ss))               # [R, m, b]
        block = torch.zeros(len(rows), b, k, dtype=w.dtype, device=w.device)
        block.scatter_(2, idx[:, None, :].expand(-1, b, -1), solved.transpose(1, 2))
        out.view(n // b, b, k)[rows] = block
    return out.to(weight.dtype)


def greedy_obs_mask(weight: torch.Tensor, gram: torch.Tensor, keep_per_row: int, block_size: int,
                    damp: float = DEFAULT_DAMP, rounds: int | None = None) -> torch.Tensor:
    """Choose each block row's kept blocks by greedy block OBS (Optimal Brain Compression).

    Starting from the dense block row, repeatedly drop the block whose removal
    raises the output error least *given that the remaining weights are re-solved*:
    error(G) = tr(W_G (Hinv_GG)^-1 W_G^T) with Hinv the inverse Hessian restricted to
    the blocks still kept; then update the kept weights and Hinv (exact downdate).
    rounds=None drops one block per step; rounds=r drops the cheapest blocks in r
    rounds (faster, nearly as good). All block rows run as one batch. Returns the
    bool block mask; the caller re-solves the final weights with
    `reconstruct_block_rows` (which also removes the drift of the downdates).
    """
    n, k = weight.shape
    b = block_size
    rows, cols = n // b, k // b
    h = damped(gram.float(), damp)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    hinv = hinv.expand(rows, k, k).contiguous()                  # [R, K, K], one per block row
    w = weight.detach().float().reshape(rows, b, k).clone()      # [R, b, K]
    alive = torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
    eye = torch.eye(b, device=weight.device)
    arange_b = torch.arange(b, device=weight.device)
    to_drop = cols - keep_per_row
    rounds = to_drop if rounds is None else max(1, min(rounds, to_drop))
    dropped = 0
    for step in range(rounds):
        count = math.ceil((to_drop - dropped) / (rounds - step))
        dropped += count
        diag_blocks = torch.diagonal(hinv.view(rows, cols, b, cols, b), dim1=1, dim2=3)  # [R, b, b, C]
        diag_blocks = diag_blocks.permute(0, 3, 1, 2)                                     # [R, C, b, b]
        diag_blocks = torch.where(alive[:, :, None, None], diag_blocks, eye)
        w_blocks = w.view(rows, b, cols, b).permute(0, 2, 3, 1)                           # [R, C, b_in, b_out]
        cost = (w_blocks * torch.linalg.solve(diag_blocks, w_blocks)).sum(dim=(2, 3))
        cost = cost.masked_fill(~alive, math.inf)
        drop = cost.topk(count, dim=1, largest=False).indices                              # [R, count]
        alive.scatter_(1, drop, False)
        idx = (drop[:, :, None] * b + arange_b).flatten(1)                                 # [R, m]
        m = idx.shape[1]
        hinv_cols = hinv.gather(2, idx[:, None, :].expand(rows, k, m))                     # [R, K, m]
        hinv_gg = hinv_cols.gather(1, idx[:, :, None].expand(rows, m, m))                  # [R, m, m]
        w_g = w.gather(2, idx[:, None, :].expand(rows, b, m))                              # [R, b_out, m]
        inv_gg = torch.linalg.inv(hinv_gg)
        w -= (w_g @ inv_gg) @ hinv_cols.transpose(1, 2)
        hinv -= hinv_cols @ inv_gg @ hinv_cols.transpose(1, 2)
        w.scatter_(2, idx[:, None, :].expand(rows, b, m), 0.0)
    return alive


def output_error(weight: torch.Tensor, new_weight: torch.Tensor, gram: torch.Tensor) -> float:
    """||X W^T - X W'^T||^2 / ||X W^T||^2 over the calibration tokens, from H = X^T X."""
    delta = (weight.double() - new_weight.double())
    h = gram.double()
    num = torch.einsum("nk,kl,nl->", delta, h, delta)
    den = torch.einsum("nk,kl,nl->", weight.double(), h, weight.double())
    return float(num / den.clamp_min(1e-30))


# --------------------------------------------------------------------------- 3. allocation
def owl_densities(outlier_ratios: Sequence[float], density: float, spread: float = 0.08) -> list[float]:
    """OWL (outlier-weighted layer-wise) densities: layers with more outliers keep more.

    Densities are the outlier ratios mapped linearly onto a range of width
    2 * spread, centred so that their mean equals `density`.
    """
    ratios = torch.tensor(list(outlier_ratios), dtype=torch.float64)
    span = float(ratios.max() - ratios.min())
    scaled = (ratios - ratios.min()) * (2 * spread / span) if span > 0 else torch.zeros_like(ratios)
    return (scaled - scaled.mean() + density).clamp(0.0, 1.0).tolist()


def outlier_ratio(weights: Sequence[torch.Tensor], act_sq_norms: Sequence[torch.Tensor],
                  threshold: float = 5.0) -> float:
    """Fraction of Wanda scores |W_ij| ||X_j|| above `threshold` x their layer mean (OWL's LOD)."""
    scores = torch.cat([(w.detach().float().abs() * sq.float().sqrt()[None, :]).flatten()
                        for w, sq in zip(weights, act_sq_norms)])
    return float((scores > threshold * scores.mean()).float().mean())


def explicit_densities(allocation: Mapping[str, float], shapes: Mapping[str, tuple[int, int]],
                       density: float) -> dict[str, float]:
    """Per-linear densities from {linear name or module prefix: density}.

    A key covers the linear of that name or every linear under that module (e.g.
    "model.layers.0.mlp"); `*` matches any run of characters ("model.layers.*.self_attn.v_proj").
    The longest matching key wins. Linears no key covers share what is left of the
    budget, so the total stays at `density`.
    """
    for key, value in allocation.items():
        if not 0.0 < float(value) <= 1.0:
            raise ValueError(f"allocation density for {key!r} must be in (0, 1], got {value}")

    def key_of(name):
        keys = [key for key in allocation if fnmatch.fnmatchcase(name, key) or fnmatch.fnmatchcase(name, key + ".*")]
        return max(keys, key=len) if keys else None

    owners = {name: key_of(name) for name in shapes}
    unused = sorted(set(allocation) - set(owners.values()))
    if unused:
        raise ValueError(f"allocation keys match no pruned linear: {unused[:5]} "
                         f"(pruned linears look like {next(iter(shapes))!r})")
    fixed = {name: float(allocation[key]) for name, key in owners.items() if key is not None}
    rest = [name for name in shapes if name not in fixed]
    if not rest:
        return fixed
    size = {name: n * k for name, (n, k) in shapes.items()}
    left = density * sum(size.values()) - sum(fixed[name] * size[name] for name in fixed)
    rest_density = left / sum(size[name] for name in rest)
    if not 0.0 < rest_density <= 1.0:
        raise ValueError(f"the named densities leave density {rest_density:.3f} for the other linears; "
                         f"the total cannot be {density:.3f}")
    return {**fixed, **{name: rest_density for name in rest}}


def keep_counts(densities: Mapping[str, float], shapes: Mapping[str, tuple[int, int]],
                block_size: int, density: float) -> dict[str, int]:
    """Blocks kept per block row of each matrix, so the total kept fraction equals `density`.

    Each matrix first gets floor(density_m * K/b) blocks per row; the blocks still
    missing from the budget round(density * all blocks) go, one block per block row
    at a time, to the matrix whose rounding lost most among those that still fit.
    Exact whenever the leftover can be tiled by whole block rows (always for a
    uniform allocation).
    """
    b = block_size
    total = sum((n // b) * (k // b) for n, k in shapes.values())
    budget = int(round(density * total))
    counts, lost = {}, {}
    for name, (n, k) in shapes.items():
        want = min(max(densities[name], 0.0), 1.0) * (k // b)
        counts[name] = max(1, math.floor(want + 1e-9))
        lost[name] = want - counts[name]
    spent = sum(counts[name] * (n // b) for name, (n, k) in shapes.items())
    if spent > budget:
        raise ValueError(f"cannot keep a total density of {density:.4f}: the densities asked for (at least one "
                         f"block per block row) already keep {spent / total:.4f}; lower the fixed densities "
                         f"or the sparsity")
    while True:
        fits = [name for name, (n, k) in shapes.items() if spent + n // b <= budget and counts[name] < k // b]
        if not fits:
            return counts
        name = max(fits, key=lost.get)
        counts[name] += 1
        lost[name] -= 1.0
        spent += shapes[name][0] // b


# --------------------------------------------------------------------------- 4. sequential driver
class _Stop(Exception):
    """Raised from a hook once the activations needed from a layer have been seen."""


class _InputStats:
    """Running statistics of one linear input X: sum of X_j^2, H = X^T X, and X^T X_dense.

    Tokens can be weighted (sink_weight for position 0 of every window): a weight w
    counts the token w times in all three statistics.
    """

    def __init__(self, features: int, gram: bool, cross: bool, sink_weight: float = 1.0):
        self.sq_norms = torch.zeros(features, dtype=torch.float64)
        self.gram = torch.zeros(features, features, dtype=torch.float64) if gram else None
        self.cross = torch.zeros(features, features, dtype=torch.float64) if cross else None
        self.sink_weight = sink_weight
        self.tokens = 0

    def _weighted(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float()
        if self.sink_weight != 1.0 and x.dim() == 3:  # [batch, seq, features]
            scale = torch.ones(x.shape[1], 1, device=x.device)
            scale[0] = math.sqrt(self.sink_weight)
            x = x * scale
        return x.reshape(-1, x.shape[-1])

    def add(self, x: torch.Tensor, x_dense: torch.Tensor | None = None) -> None:
        self.tokens += x.numel() // x.shape[-1]
        x = self._weighted(x)
        self.sq_norms += x.square().sum(0).double().cpu()
        if self.gram is not None:
            self.gram += (x.T @ x).double().cpu()
        if self.cross is not None:
            self.cross += (x.T @ self._weighted(x_dense)).double().cpu()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a Llama-style causal LM (model.model.layers)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h"):
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (looked for model.layers)")


def _check_options(sparsity, block_size, method, group, allocation, reconstruct_target):
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    check_block_size(block_size)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    if method == "obc" and group != "block-row":
        raise ValueError("method 'obc' chooses blocks per block row; use group='block-row'")
    if isinstance(allocation, str) and allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS} or a {{linear name or prefix: density}} mapping, "
                         f"got {allocation!r}")
    if reconstruct_target not in RECONSTRUCT_TARGETS:
        raise ValueError(f"reconstruct_target must be one of {RECONSTRUCT_TARGETS}, got {reconstruct_target!r}")


def sink_probe_ids(calib_inputs: torch.Tensor, count: int, bos_token_id: int | None = None) -> torch.Tensor:
    """The `count` most frequent tokens of the calibration text (and BOS), as one-token sequences [n, 1].

    Position 0 attends only to itself, so its hidden state in every layer is a function of
    its token alone: fitting these sequences fits the attention sink for every first token
    a window can start with, where the calibration windows show only nsamples of them.
    """
    if count <= 0:
        return calib_inputs.new_zeros((0, 1))
    ids, counts = calib_inputs.flatten().unique(return_counts=True)
    probes = ids[counts.argsort(descending=True, stable=True)][:count]
    if isinstance(bos_token_id, int) and bos_token_id >= 0 and not (probes == bos_token_id).any():
        probes = torch.cat([probes.new_tensor([bos_token_id]), probes[:count - 1]])
    return probes[:, None]


def _batches(calib_inputs: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if calib_inputs.dim() != 2 or calib_inputs.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"calib_inputs must be token ids [nsamples, seqlen] (int64), "
                         f"got {calib_inputs.dtype} of shape {tuple(calib_inputs.shape)}")
    return list(calib_inputs.split(batch_size))


@torch.no_grad()
def _layer0_inputs(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor]):
    """Hidden states and keyword arguments that reach decoder layer 0, per batch."""
    captured = []

    def grab(module, args, kwargs):
        captured.append((args[0] if args else kwargs.pop("hidden_states"), kwargs))
        raise _Stop

    device = next(model.parameters()).device
    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    hidden = [h for h, _ in captured]
    kwargs = [{key: value for key, value in kw.items() if key not in ("cache", "past_key_values", "past_key_value")}
              for _, kw in captured]
    return hidden, kwargs


def _linear_groups(layer: nn.Module, linears: Mapping[str, nn.Linear], hidden: torch.Tensor,
                   kwargs: dict) -> list[list[str]]:
    """Target linears of `layer` grouped by shared input, in the order they run."""
    order: list[tuple[str, int]] = []
    seen_inputs: list[torch.Tensor] = []

    def make_hook(name):
        def hook(module, args):
            x = args[0]
            for i, other in enumerate(seen_inputs):
                if other is x:
                    order.append((name, i))
                    return
            seen_inputs.append(x)
            order.append((name, len(seen_inputs) - 1))
        return hook

    handles = [lin.register_forward_pre_hook(make_hook(name)) for name, lin in linears.items()]
    try:
        layer(hidden[:1], **_slice_kwargs(kwargs, hidden.shape[0], 0, 1))
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[int, list[str]] = {}
    for name, i in order:
        if name not in groups.setdefault(i, []):
            groups[i].append(name)
    missing = set(linears) - {name for name, _ in order}
    if missing:
        raise ValueError(f"target linears never ran during the layer's forward: {sorted(missing)}")
    return list(groups.values())


def _slice_kwargs(kwargs: dict, batch: int, start: int, stop: int, float32: bool = False) -> dict:
    """Keyword arguments of a batch of `batch` samples cut to samples start:stop.

    Only tensors whose first dim is the batch are cut (a [1, T, d] rotary table serves
    every sample); with float32, floating tensors are also cast to fp32.
    """
    def cut(value):
        if value.dim() > 0 and value.shape[0] == batch:
            value = value[start:stop]
        return value.float() if float32 and value.is_floating_point() else value

    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            value = cut(value)
        elif isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
            value = tuple(cut(v) for v in value)
        out[key] = value
    return out


def _collect(layer, names, linears, hidden, kwargs, need_gram, sink_weight, dense_layer=None, dense_hidden=None):
    """Statistics of the inputs of `names` (one shared input) over all calibration batches.

    With a dense layer, also X^T X_dense, pairing each token's input in the pruned
    model with its input in the dense model.
    """
    first = linears[names[0]]
    stats = _InputStats(first.in_features, gram=need_gram, cross=dense_layer is not None, sink_weight=sink_weight)
    dense_first = None if dense_layer is None else dict(dense_layer.named_modules())[_local(layer, first)]
    for i, (h, kw) in enumerate(zip(hidden, kwargs)):
        x_dense = None
        if dense_layer is not None:
            box = []

            def grab_dense(module, args):
                box.append(args[0])
                raise _Stop

            handle = dense_first.register_forward_pre_hook(grab_dense)
            try:
                dense_layer(dense_hidden[i], **kw)
            except _Stop:
                pass
            finally:
                handle.remove()
            x_dense = box[0]

        def grab(module, args):
            stats.add(args[0], x_dense)
            raise _Stop

        handle = first.register_forward_pre_hook(grab)
        try:
            layer(h, **kw)
        except _Stop:
            pass
        finally:
            handle.remove()
    return stats


def _local(layer: nn.Module, module: nn.Module) -> str:
    for name, m in layer.named_modules():
        if m is module:
            return name
    raise ValueError("module is not inside the layer")


def _target_weight(weight: torch.Tensor, stats: _InputStats, damp: float) -> torch.Tensor:
    """The weight whose output on the pruned model's inputs best matches the dense model's output.

    argmin_V ||X_dense W^T - X V^T||^2 = W + H^-1 (X^T X_dense - X^T X) W^T (transposed); pruning
    then fits this weight on H, which equals fitting the dense output up to a constant. Only
    the correction is damped, so where the inputs agree (the first layer) the target is W.
    """
    if stats.cross is None:
        return weight
    h = damped(stats.gram, damp)
    correction = torch.cholesky_solve((stats.cross - stats.gram) @ weight.double().T, torch.linalg.cholesky(h))
    return (weight.double() + correction.T).to(weight.dtype)


def _dense_sq_norms(model, layers, batches, linears_by_layer) -> dict[str, torch.Tensor]:
    """||X_j||^2 of every target linear's input in the dense model (for OWL)."""
    sq = {name: torch.zeros(lin.in_features, dtype=torch.float64)
          for per_layer in linears_by_layer for name, lin in per_layer.items()}

    def make_hook(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sq[name] += x.square().sum(0).double().cpu()
        return hook

    handles = [lin.register_forward_pre_hook(make_hook(name))
               for per_layer in linears_by_layer for name, lin in per_layer.items()]
    device = next(model.parameters()).device
    try:
        for ids in batches:
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return sq


@torch.no_grad()
def prune_model(model: nn.Module, calib_inputs: torch.Tensor, sparsity: float = 0.5,
                block_size: int = DEFAULT_BLOCK_SIZE, method: str = "wanda", group: str = "block-row",
                reconstruct: bool = True, allocation: str | Mapping[str, float] = "uniform",
                reconstruct_target: str = "dense", damp: float = DEFAULT_DAMP,
                sink_weight: float = DEFAULT_SINK_WEIGHT, sink_tokens: int = DEFAULT_SINK_TOKENS,
                obc_rounds: int | None = 8,
                refine_steps: int = 0, refine_lr: float = 0.03,
                owl_threshold: float = 5.0, owl_spread: float = 0.08, batch_size: int = 8,
                target_modules: Sequence[str] = LLAMA_TARGET_MODULES,
                filter_fn: Callable[[nn.Module, str], bool] | None = None,
                convert: bool = True, progress: bool = True) -> dict:
    """Prune the target linears of `model` in place to b x b blocks; return a report dict.

    calib_inputs: token ids [nsamples, seqlen]. sparsity: fraction of each target
    linear's weights removed (with a non-uniform allocation: of all of them together).
    method: block score "wanda" (|W| ||X_j||), "obs" (W^2 ||X_j||^2), "magnitude", or
    "obc" (greedy block OBS: drop the blocks whose removal costs least output error
    after re-solving the others, in `obc_rounds` rounds (None: one block at a time);
    implies reconstruction).
    group: "block-row" (every block row keeps the same number of blocks) or "global"
    (one threshold per matrix; for comparison only).
    reconstruct: re-solve the kept weights of each block row by least squares on the
    calibration inputs. reconstruct_target: "dense" fits the dense model's output of
    each linear (correcting the error that earlier pruned layers let through);
    "pruned" fits the linear's own dense weights on the pruned model's inputs.
    sink_weight: how many ordinary tokens the first token of every calibration window
    counts for in the scores and fits (1 = no weighting). Llama-style models turn the
    first token into an attention sink with a residual norm ~100x the others, built
    by a few MLP channels; an unweighted fit spends 1/seqlen of its effort on it and
    lets it shrink (SmolLM2-135M at 50%: 24,462 -> 2,639 at layer 12), which every
    later attention layer then reads.
    sink_tokens: how many of the calibration text's most frequent tokens (and BOS) are also
    fitted as the first token of a one-token sequence (`sink_probe_ids`); the sink weight
    is then shared between these and the windows' first tokens (total nsamples *
    sink_weight, each counting at least once). Fitted on the windows' own first tokens
    alone (16 of them), SmolLM2-135M's sink failed to form at layer 12 for 12% of random
    first tokens (27% after refinement), and held-out windows starting with such a token
    collapsed; 0 disables.
    refine_steps: after a decoder layer's linears are pruned and fitted one by one, this
    many Adam steps (micro-batches of 2 calibration windows, cosine schedule) on all
    its kept weights together, so that the layer's output on the pruned model's hidden
    states matches the dense layer's output on the dense ones (`refine_layer`). The
    per-linear fits cannot see the nonlinearities (softmax, SiLU gate) between them;
    this fits the layer as a whole. refine_lr: step relative to each matrix's RMS weight.
    allocation: "uniform", "owl" (outlier-weighted layer-wise densities, mean = target,
    +-owl_spread), or {linear name or module prefix: density} (the linears not named
    share the rest of the budget; e.g. {"model.layers.0.mlp": 1.0}); the total kept
    fraction of all target linears is the target in every case (rounded to whole
    block rows).
    convert: finish by swapping the pruned linears for BlockSparseLinear; otherwise
    they stay nn.Linear with zeros outside the blocks.
    """
    _check_options(sparsity, block_size, method, group, allocation, reconstruct_target)
    if not sink_weight >= 1.0:
        raise ValueError(f"sink_weight must be >= 1 (1 = no weighting), got {sink_weight}")
    if not (isinstance(sink_tokens, int) and sink_tokens >= 0):
        raise ValueError(f"sink_tokens must be an integer >= 0 (0 = only the windows' first tokens), "
                         f"got {sink_tokens!r}")
    if not (isinstance(refine_steps, int) and refine_steps >= 0):
        raise ValueError(f"refine_steps must be an integer >= 0 (0 = no refinement), got {refine_steps!r}")
    if refine_steps and not refine_lr > 0:
        raise ValueError(f"refine_lr must be > 0, got {refine_lr}")
    if method == "obc":
        reconstruct = True
    density = 1.0 - sparsity
    layers = decoder_layers(model)
    all_targets = target_linears(model, target_modules, filter_fn)
    if not all_targets:
        raise ValueError(f"no nn.Linear in the model matches target_modules={tuple(target_modules)}")
    for name, lin in all_targets.items():
        try:
            check_divisible((lin.out_features, lin.in_features), block_size)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
    linears_by_layer: list[dict[str, nn.Linear]] = [{} for _ in layers]
    for name, lin in all_targets.items():
        owner = next((i for i, layer in enumerate(layers)
                      if any(m is lin for m in layer.modules())), None)
        if owner is None:
            raise ValueError(f"target linear {name} is outside the decoder layers; it cannot be pruned "
                             f"sequentially (narrow target_modules / filter_fn)")
        linears_by_layer[owner][name] = lin
    batches = _batches(calib_inputs, batch_size)
    n_calib = len(batches)  # the sink probes, if any, ride along as one more batch
    probes = (sink_probe_ids(calib_inputs, sink_tokens, getattr(model.config, "bos_token_id", None))
              if sink_tokens else None)
    if probes is not None:
        batches.append(probes)
    n_sinks = calib_inputs.shape[0] + (0 if probes is None else probes.shape[0])
    # The windows' first tokens and the probes share the sink weight; none counts less than once.
    stats_sink_weight = max(1.0, sink_weight * calib_inputs.shape[0] / n_sinks)
    shapes = {name: (lin.out_features, lin.in_features) for name, lin in all_targets.items()}

    was_training = model.training
    model.eval()
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False

    try:
        # Densities per matrix, then whole blocks per block row matching the total budget.
        outlier_ratios = None
        if isinstance(allocation, Mapping):
            densities = explicit_densities(allocation, shapes, density)
        elif allocation == "owl":
            sq = _dense_sq_norms(model, layers, batches[:n_calib], linears_by_layer)
            outlier_ratios = [outlier_ratio([lin.weight for lin in per_layer.values()],
                                            [sq[name] for name in per_layer], owl_threshold)
                              if per_layer else 0.0 for per_layer in linears_by_layer]
            layer_density = owl_densities(outlier_ratios, density, owl_spread)
            densities = {name: layer_density[i] for i, per_layer in enumerate(linears_by_layer) for name in per_layer}
        else:
            densities = {name: density for name in all_targets}
        keep = keep_counts(densities, shapes, block_size, density)

        hidden, kwargs = _layer0_inputs(model, layers, batches)
        use_dense_target = reconstruct and reconstruct_target == "dense"
        track_dense = use_dense_target or refine_steps > 0
        dense_hidden = [h.clone() for h in hidden] if track_dense else None
        need_gram = reconstruct or method == "obc"
        masks: dict[str, torch.Tensor] = {}
        per_linear: dict[str, dict] = {}
        refine_loss: dict[int, tuple[float, float]] = {}

        iterator = range(len(layers))
        if progress:
            from tqdm.auto import tqdm
            iterator = tqdm(iterator, desc="pruning layers", unit="layer")
        for i in iterator:
            layer, linears = layers[i], linears_by_layer[i]
            # The dense model's path must advance through every layer, pruned here or not.
            dense_layer = (copy.deepcopy(layer) if linears else layer) if track_dense else None
            if linears:
                for names in _linear_groups(layer, linears, hidden[0], kwargs[0]):
                    needs_stats = method != "magnitude" or reconstruct
                    stats = (_collect(layer, names, linears, hidden, kwargs, need_gram, stats_sink_weight,
                                      *((dense_layer, dense_hidden) if use_dense_target else ()))
                             if needs_stats else None)
                    for name in names:
                        lin = linears[name]
                        masks[name], per_linear[name] = _prune_linear(
                            lin, stats, keep[name], block_size, method, group, reconstruct, damp, obc_rounds)
            if dense_layer is not None:
                dense_hidden = [_layer_output(dense_layer(h, **kw)) for h, kw in zip(dense_hidden, kwargs)]
            if linears and refine_steps > 0:
                weights = {name: (lin.weight, element_mask(masks[name], block_size).to(lin.weight.device))
                           for name, lin in linears.items()}
                sink = None if probes is None else (hidden[n_calib], kwargs[n_calib], dense_hidden[n_calib])
                refine_loss[i] = refine_layer(layer, weights, hidden[:n_calib], kwargs[:n_calib],
                                              dense_hidden[:n_calib], refine_steps, refine_lr, sink=sink)
            hidden = [_layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
            del dense_layer
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
        model.train(was_training)
    if convert:
        sparsify_model(model, block_masks=masks, block_size=block_size)

    kept = sum(int(m.sum()) for m in masks.values()) * block_size ** 2
    total = sum(n * k for n, k in shapes.values())
    return {
        "total_density": kept / total,
        "target_sparsity": sparsity,
        "block_size": block_size,
        "method": method,
        "group": group,
        "reconstruct": reconstruct,
        "reconstruct_target": reconstruct_target if reconstruct else None,
        "allocation": allocation if isinstance(allocation, str) else {"explicit": dict(allocation)},
        "damp": damp,
        "sink_weight": sink_weight,
        "sink_tokens": 0 if probes is None else int(probes.shape[0]),
        "obc_rounds": obc_rounds if method == "obc" else None,
        "refine": ({"steps": refine_steps, "lr": refine_lr,
                    "layer_loss_before_after": {str(i): list(v) for i, v in refine_loss.items()}}
                   if refine_steps > 0 else None),
        "calibration": {"nsamples": int(calib_inputs.shape[0]), "seqlen": int(calib_inputs.shape[1])},
        "owl_outlier_ratios": outlier_ratios,
        "layers": per_linear,
    }


def refine_layer(layer: nn.Module, weights: Mapping[str, tuple[nn.Parameter, torch.Tensor]],
                 hidden: Sequence[torch.Tensor], kwargs: Sequence[dict], targets: Sequence[torch.Tensor],
                 steps: int, lr: float, micro_batch: int = 2,
                 sink: tuple[torch.Tensor, dict, torch.Tensor] | None = None,
                 sink_micro_batch: int = 256) -> tuple[float, float]:
    """Adam on the kept weights of one pruned decoder layer so that its output matches `targets`.

    weights: {name: (weight parameter, boolean element mask)}; the mask is re-applied after every
    step, so the block pattern is unchanged; lr is relative to each matrix's RMS weight.
    The loss is each token's squared error relative to its target's squared norm,
    averaged over tokens: the sink token's norm is ~100x the others, so an absolute
    error would fit nothing else. sink: (hidden, kwargs, targets) of the one-token sink
    probes (`sink_probe_ids`); each step adds their mean loss (a micro-batch of
    `sink_micro_batch` of them) to the windows', so the sink counts as much as all the
    other tokens: a refinement fitted to the windows alone broke the sink for first tokens
    it had not seen. Returns the mean loss over the calibration data before and after;
    a refinement that does not lower it is undone.
    """
    def split(h, kw, t, size):
        return [(h[s:s + size], _slice_kwargs(kw, h.shape[0], s, s + size, float32=True), t[s:s + size])
                for s in range(0, h.shape[0], size)]

    chunks = [chunk for h, kw, t in zip(hidden, kwargs, targets) for chunk in split(h, kw, t, micro_batch)]
    sink_chunks = [] if sink is None else split(*sink, sink_micro_batch)

    def loss_of(h, kw, t):
        h, t = h.float(), t.float()
        err = (_layer_output(layer(h, **kw)) - t).square().sum(-1) / t.square().sum(-1).clamp_min(1e-12)
        return err.mean()

    def mean_loss():
        def mean(parts):
            return sum(loss_of(*c).item() * c[0].shape[0] for c in parts) / sum(c[0].shape[0] for c in parts)
        with torch.no_grad():
            return mean(chunks) + (mean(sink_chunks) if sink_chunks else 0.0)

    params = [p for p, _ in weights.values()]
    masks = [mask.float() for _, mask in weights.values()]  # multiplied into fp32 weights
    trainable = {p: p.requires_grad for p in layer.parameters()}
    dtypes = {name: t.dtype for name, t in itertools.chain(layer.named_parameters(), layer.named_buffers())}
    try:
        # Adam's moments and steps of ~1% of a weight need fp32: a half-precision layer
        # is refined in fp32 and cast back.
        layer.float()
        for p in layer.parameters():
            p.requires_grad_(any(p is q for q in params))
        before = mean_loss()
        saved = [p.detach().clone() for p in params]
        # Adam moves every weight by ~lr per step whatever its gradient's scale, so the step
        # is set relative to each matrix's RMS weight (0.02 in a fresh model, 0.2 in SmolLM2).
        optimizer = torch.optim.Adam([{"params": [p], "lr": lr * float(p.detach()[m.bool()].square().mean().sqrt())}
                                      for p, m in zip(params, masks)])
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        with torch.enable_grad():
            for step in range(steps):
                loss = loss_of(*chunks[step % len(chunks)])
                if sink_chunks:
                    loss = loss + loss_of(*sink_chunks[step % len(sink_chunks)])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                with torch.no_grad():
                    for p, m in zip(params, masks):
                        p.mul_(m)
        after = mean_loss()
        if not after < before:  # never leave a layer worse than its closed-form fit
            with torch.no_grad():
                for p, old in zip(params, saved):
                    p.copy_(old)
            after = before
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
            p.grad = None
        # One by one: a layer may mix dtypes on purpose (fp32 norms or rotary tables).
        for name, t in itertools.chain(layer.named_parameters(), layer.named_buffers()):
            t.data = t.data.to(dtypes[name])
    return before, after


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _prune_linear(lin: nn.Linear, stats: _InputStats | None, keep_per_row: int, block_size: int,
                  method: str, group: str, reconstruct: bool, damp: float, obc_rounds: int | None):
    """Choose the block mask of one linear, re-solve its kept weights, write them back."""
    weight = lin.weight.data
    target = _target_weight(weight.float(), stats, damp) if (stats is not None and reconstruct) else weight.float()
    if method == "obc":
        mask = greedy_obs_mask(target, stats.gram, keep_per_row, block_size, damp, obc_rounds)
    else:
        scores = block_scores(target, None if stats is None else stats.sq_norms, block_size, method)
        mask = select_block_mask(scores, keep_per_row, group)
    if reconstruct:
        new = reconstruct_block_rows(target, mask, stats.gram, damp)
    else:
        new = target * element_mask(mask, block_size).to(target.dtype)
    info = {
        "density": float(mask.float().mean()),
        "blocks_per_row": sorted(set(mask.sum(1).tolist())),
        "zero_input_columns": int((~mask.any(0)).sum()) * block_size,
        "zero_output_rows": int((~mask.any(1)).sum()) * block_size,
    }
    if stats is not None and stats.gram is not None:
        info["rel_output_error"] = output_error(target, new, stats.gram)
    lin.weight.data.copy_(new.to(weight.dtype))
    return mask.cpu(), info
