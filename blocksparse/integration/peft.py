"""PEFT LoRA on `BlockSparseLinear`: the adapter runs inside the block-sparse op.

    from peft import LoraConfig
    from blocksparse.integration.peft import get_peft_model, load_adapter, export_dense

    model = get_peft_model(sparse_model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    ...train...; model.save_pretrained("adapter")          # adapter_config.json + adapter_model.safetensors
    model = load_adapter(fresh_sparse_model, "adapter")     # = PeftModel.from_pretrained after registering

PEFT dispatches custom layer types through `LoraConfig._register_custom_module`
(experimental, PEFT >= 0.12). The registration lives on one LoraConfig
*instance* and is not saved with the adapter, so every config that creates
LoRA layers on a BlockSparseLinear must be registered: `register_peft(config)`
does it (for a config, a saved adapter directory, or the project default), and
`get_peft_model` / `load_adapter` here call it for you. With plain PEFT:

    PeftModel.from_pretrained(model, path, config=register_peft(path))

Tested with peft 0.21.2. `LoraBlockSparseLinear` forwards its constructor
arguments untouched to `peft.tuners.lora.layer.Linear`, so both signatures work:
<= 0.18 (`r=..., lora_alpha=..., lora_dropout=...` keywords) and >= 0.19
(`config=LoraConfig`).

dtypes: PEFT keeps LoRA weights in fp32 when the base is fp16/bf16
(`autocast_adapter_dtype=True`). The fused op computes in the base dtype
(with fp32 accumulation in the kernels), so the first adapter's A and B are
cast to the base dtype for the call; the cast is differentiable, so the fp32
weights still receive their gradients (the usual mixed-precision recipe).
Further active adapters run unfused in their own dtype, as in PEFT.

Merging: W is block-sparse, B A is dense. The inherited PEFT merge would
densify W; `merge` here adds B A * s only inside the kept blocks (a *masked*
merge), records the norm of what it drops relative to the whole update in
`merge_errors[adapter]` and warns with that number. For a plain dense model
with the adapter merged exactly, use `export_dense(model)`.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

from ..families import REFERENCE_LORA_TARGETS
from ..nn import BlockSparseLinear
from ..ops import block_sparse_linear
from ..sparsify import densify_model

try:
    from peft.tuners.lora.layer import Linear as _PeftLoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
except ImportError as _err:  # the package imports without PEFT; this module needs it
    raise ImportError("blocksparse.integration.peft needs PEFT >= 0.12: pip install 'peft>=0.12'") from _err

# init_lora_weights options that only draw A and B; the others (pissa, olora, corda,
# loftq, orthogonal, lora_ga, mica, ...) read or rewrite the dense base weight.
_SUPPORTED_INITS = (True, False, "gaussian")


class MaskedMergeWarning(UserWarning):
    """A LoRA update merged into a block-sparse weight lost its part outside the kept blocks."""


def _dropout_p(dropout: nn.Module) -> float:
    """The LoRA dropout probability in effect now (0 in eval mode or without dropout)."""
    return float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _init_option(kwargs: dict) -> Any:
    config = kwargs.get("config")
    if config is not None:
        return config.init_lora_weights
    return kwargs.get("init_lora_weights", True)


class LoraBlockSparseLinear(_PeftLoraLinear):
    """PEFT LoRA layer around a `BlockSparseLinear`.

    y = x W^T + bias + s * dropout(x) A^T B^T, computed by `block_sparse_linear`
    in one call for the first active adapter (one fused kernel on the Triton
    backend); further active adapters are added unfused. W is frozen (PEFT freezes
    the base) unless its kept blocks are trained beside the adapter
    (`train_lora(train_sparse_values=True)`); its structure never changes.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        if not isinstance(base, BlockSparseLinear):
            raise TypeError(f"LoraBlockSparseLinear wraps a BlockSparseLinear, got {type(base).__name__}")
        # Whatever PEFT passes (positional r/alpha/... up to 0.18, config= from 0.19) goes
        # to its own Linear untouched, so both constructor signatures work.
        super().__init__(base_layer, adapter_name, *args, **kwargs)
        if self.fan_in_fan_out:
            raise ValueError("fan_in_fan_out=True is for Conv1D weights; BlockSparseLinear stores W as [out, in]")
        self.merge_errors: dict[str, float] = {}

    def _get_in_out_features(self, module: nn.Module):
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        return base.in_features, base.out_features

    def update_layer(self, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        init = _init_option(kwargs)
        if init not in _SUPPORTED_INITS:
            raise ValueError(
                f"init_lora_weights={init!r} reads or rewrites the dense base weight, which a "
                f"BlockSparseLinear does not have; use one of {_SUPPORTED_INITS}")
        super().update_layer(adapter_name, *args, **kwargs)

    def resolve_lora_variant(self, **kwargs):
        # Variants (DoRA, aLoRA, ...) compute with the dense base weight; refuse them
        # before PEFT initialises one.
        variant = super().resolve_lora_variant(**kwargs)
        if variant is not None:
            raise ValueError(f"LoRA variant {type(variant).__name__} (DoRA and the like) is not "
                             "supported on BlockSparseLinear; use plain LoRA")
        return variant

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)

        active = [name for name in self.active_adapters if name in self.lora_A]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        dtype = base.sparse_weight.dtype
        first = active[0]
        # The fused op computes in the base dtype (in autocast's under autocast); the casts keep
        # A/B gradients in their own dtype.
        result = block_sparse_linear(
            x.to(dtype), base.sparse_weight, base.bias,
            self.lora_A[first].weight.to(dtype), self.lora_B[first].weight.to(dtype),
            scaling=float(self.scaling[first]), lora_dropout=_dropout_p(self.lora_dropout[first]))
        if self.lora_B[first].bias is not None:  # lora_bias=True
            result = result + (self.lora_B[first].bias * self.scaling[first]).to(dtype)
        for name in active[1:]:
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            x_lora = self._cast_input_dtype(x, lora_a.weight.dtype)
            delta = lora_b(lora_a(self.lora_dropout[name](x_lora))) * self.scaling[name]
            result = result + delta.to(dtype)
        return result

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The dense update s * B A [out, in] of `adapter`, in fp32 (not masked)."""
        lora_a = self.lora_A[adapter].weight.float()
        lora_b = self.lora_B[adapter].weight.float()
        return (lora_b @ lora_a) * self.scaling[adapter]

    def masked_delta(self, adapter: str) -> tuple[torch.Tensor, float]:
        """The update restricted to the kept blocks, [nnz, b, b] fp32, and the relative
        norm of the dropped part ||delta outside the mask|| / ||delta|| (0 for a zero update)."""
        sw = self.get_base_layer().sparse_weight
        delta = self.get_delta_weight(adapter).to(sw.device)
        kept = sw.blocks_of(delta)  # lined up with sw.values, whatever its order and tile layout
        total = delta.norm()
        kept_sq = kept.square().sum()
        dropped = (total.square() - kept_sq).clamp_min(0).sqrt()
        error = float(dropped / total) if float(total) > 0 else 0.0
        return kept, error

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Masked merge: add s * B A into the kept blocks only; W stays block-sparse.

        The part of the update outside the mask is dropped: its relative norm is
        stored in `merge_errors[adapter]` and reported with a MaskedMergeWarning.
        `safe_merge` checks for non-finite values before writing.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        values = base.sparse_weight.values
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            kept, error = self.masked_delta(name)
            merged = (values.float() + kept).to(values.dtype)
            new_bias = None
            if self.lora_B[name].bias is not None:
                if base.bias is None:
                    raise RuntimeError(f"adapter {name!r} has lora_bias=True but the base layer has no bias")
                new_bias = base.bias + self.lora_B[name].bias.to(base.bias.dtype) * self.scaling[name]
            if safe_merge and not (torch.isfinite(merged).all() and
                                   (new_bias is None or torch.isfinite(new_bias).all())):
                raise ValueError(f"NaNs detected in the merged weights; adapter {name!r} seems broken")
            values.copy_(merged)
            if new_bias is not None:
                base.bias.copy_(new_bias)
            self.merge_errors[name] = error
            self.merged_adapters.append(name)
            if error > 0:
                warnings.warn(
                    f"masked merge of adapter {name!r} into a BlockSparseLinear "
                    f"[{base.out_features}x{base.in_features}, density {base.density:.2f}] drops "
                    f"{error:.1%} of the update's norm (the part outside the kept blocks); the merged "
                    "layer no longer equals the adapter. Keep the adapter unmerged for exact outputs, "
                    "or use blocksparse.integration.peft.export_dense for a dense model.",
                    MaskedMergeWarning, stacklevel=2)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract what `merge` added (the same masked update), newest adapter first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        values = base.sparse_weight.values
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.lora_A:
                continue
            kept, _ = self.masked_delta(name)
            values.copy_((values.float() - kept).to(values.dtype))
            if self.lora_B[name].bias is not None:
                base.bias.sub_(self.lora_B[name].bias.to(base.bias.dtype) * self.scaling[name])
            self.merge_errors.pop(name, None)

    @torch.no_grad()
    def to_dense_linear(self, adapter_names: list[str] | None = None) -> nn.Linear:
        """A plain nn.Linear equal to this layer with `adapter_names` (default: the active
        adapters) merged densely and exactly (W dense; no update is dropped)."""
        if self.merged:
            self.unmerge()
        base = self.get_base_layer()
        names = self.active_adapters if adapter_names is None else adapter_names
        weight = base.to_dense().float()
        bias = None if base.bias is None else base.bias.detach().float().clone()
        for name in names:
            if name not in self.lora_A:
                continue
            weight += self.get_delta_weight(name).to(weight.device)
            if self.lora_B[name].bias is not None:
                update = self.lora_B[name].bias.float() * self.scaling[name]
                bias = update if bias is None else bias + update
        dtype = base.sparse_weight.dtype
        linear = nn.Linear(base.in_features, base.out_features, bias=bias is not None,
                           device=weight.device, dtype=dtype)
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        return linear


# ---------------------------------------------------------------------- registration
def lora_config(r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.05,
                target_modules=REFERENCE_LORA_TARGETS):
    """A LoraConfig for causal LMs, registered for BlockSparseLinear layers.

    The defaults are the reference workflow's recipe (Wanda's lora_ft): r=8,
    alpha=16, dropout 0.05 on q_proj/v_proj (each family's `lora_targets`).
    """
    from peft import LoraConfig

    return register_peft(LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                    target_modules=list(target_modules), bias="none", task_type="CAUSAL_LM"))


def register_peft(config=None):
    """Register `LoraBlockSparseLinear` for BlockSparseLinear targets on a LoraConfig; return it.

    config: a `LoraConfig`, a saved adapter directory (its adapter_config.json is
    loaded), or None for the reference recipe (r=8, alpha=16, dropout 0.05,
    q_proj/v_proj). Registering the same config twice is harmless.
    """
    from peft import LoraConfig

    if config is None:
        return lora_config()
    if isinstance(config, (str, os.PathLike)):
        config = LoraConfig.from_pretrained(os.fspath(config))
    if not isinstance(config, LoraConfig):
        raise TypeError(f"register_peft expects a LoraConfig, an adapter directory or None, "
                        f"got {type(config).__name__}")
    if not hasattr(config, "_register_custom_module"):
        raise RuntimeError("this PEFT has no LoraConfig._register_custom_module; blocksparse needs peft >= 0.12")
    config._register_custom_module({BlockSparseLinear: LoraBlockSparseLinear})
    return config


def get_peft_model(model: nn.Module, config=None, **kwargs):
    """`peft.get_peft_model` with the config registered for BlockSparseLinear layers."""
    import peft

    return peft.get_peft_model(model, register_peft(config), **kwargs)


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 is_trainable: bool = False, **kwargs):
    """Load a saved LoRA adapter onto `model` (a plain or sparsified model, or a PeftModel).

    The one-liner for `PeftModel.from_pretrained(model, path, config=register_peft(path))`;
    on a PeftModel the adapter is added under `adapter_name` (not activated, as in PEFT).
    """
    from peft import PeftModel

    if not os.path.isfile(os.path.join(os.fspath(path), "adapter_config.json")):
        raise FileNotFoundError(f"no adapter_config.json in {os.fspath(path)!r}: expected a directory "
                                "written by save_pretrained")
    config = register_peft(path)
    if isinstance(model, PeftModel):
        config.inference_mode = not is_trainable
        model.add_adapter(adapter_name, config)
        model.load_adapter(path, adapter_name, is_trainable=is_trainable, **kwargs)
        return model
    return PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable,
                                     config=config, **kwargs)


# ---------------------------------------------------------------------- model-level helpers
def lora_layers(model: nn.Module) -> dict[str, LoraBlockSparseLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraBlockSparseLinear)}


def merge_masked(model: nn.Module, adapter_names: list[str] | None = None) -> dict[str, float]:
    """Masked-merge the adapters into every LoRA block-sparse layer (model stays sparse).

    Returns {layer name: relative norm of the dropped update} and emits one
    MaskedMergeWarning summarising it instead of one per layer.
    """
    errors = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MaskedMergeWarning)
        for name, layer in lora_layers(model).items():
            layer.merge(adapter_names=adapter_names)
            errors[name] = max(layer.merge_errors.values(), default=0.0)
    if errors and max(errors.values()) > 0:
        worst = max(errors, key=errors.get)
        warnings.warn(
            f"masked merge into {len(errors)} block-sparse layers dropped on average "
            f"{sum(errors.values()) / len(errors):.1%} of each LoRA update's norm (worst {errors[worst]:.1%} "
            f"in {worst}); outputs differ from the unmerged adapter. Unmerge with model.unmerge_adapter().",
            MaskedMergeWarning, stacklevel=2)
    return errors


def export_dense(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """A plain dense model: every LoRA block-sparse layer becomes an nn.Linear with the
    adapter merged exactly, other LoRA layers are merged by PEFT, and remaining
    BlockSparseLinear layers become nn.Linear (pruned blocks zero).

    Works in place (like PEFT's merge_and_unload) on a PeftModel or a model holding
    LoRA layers; returns the underlying transformers model.
    """
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    for name, layer in lora_layers(base).items():
        parent_name, _, child = name.rpartition(".")
        parent = base.get_submodule(parent_name) if parent_name else base
        setattr(parent, child, layer.to_dense_linear(adapter_names))
    if isinstance(model, PeftModel):
        base = model.merge_and_unload(adapter_names=adapter_names)
    return densify_model(base)
