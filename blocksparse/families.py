"""Model families: where the decoder layers and their projections live, one row per family.

    family = family_of(model)           # by model.config.model_type
    family.projections                  # ("q_proj", ..., "down_proj"): what is pruned
    decoder_layers(model)               # the nn.ModuleList of decoder layers

Adding a family whose decoder layers hold separate q/k/v/o and gate/up/down
linears is one row of `FAMILIES`. A family with fused projections (Phi-3's
`qkv_proj`, `gate_up_proj`) would need its fused matrices split into their
block rows first; it is refused with the list of what is supported.

A pure table (no Hugging Face import), so the core (sparsify, prune) and the
glue (PEFT defaults, commands, benchmarks) read the same row.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


# The reference LoRA recipe (Wanda's lora_ft: r=8, alpha=16, dropout 0.05) adapts these.
REFERENCE_LORA_TARGETS = ("q_proj", "v_proj")


class UnsupportedModelError(ValueError):
    """A model whose family has no row in FAMILIES (or whose layers do not match its row)."""


@dataclass(frozen=True)
class Family:
    model_type: str
    layers: str = "model.layers"        # path of the nn.ModuleList of decoder layers
    attention: str = "self_attn"        # attention module inside a decoder layer
    mlp: str = "mlp"                    # MLP module inside a decoder layer
    attention_projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp_projections: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    value_projection: str = "v_proj"
    output_projection: str = "o_proj"   # attention's, writes the residual stream
    down_projection: str = "down_proj"  # the MLP's, reads its channels and writes the residual stream
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")  # in a decoder layer
    final_norm: str = "model.norm"
    lora_targets: tuple[str, ...] = REFERENCE_LORA_TARGETS  # the LoRA default for this family

    @property
    def projections(self) -> tuple[str, ...]:
        """Every linear of a decoder layer that blocksparse prunes, in the order they run."""
        return self.attention_projections + self.mlp_projections

    def mlp_path(self, layer: int | str = "*") -> str:
        """Qualified name of a decoder layer's MLP (`*` matches every layer in allocations)."""
        return f"{self.layers}.{layer}.{self.mlp}"

    def value_path(self, layer: int | str = "*") -> str:
        """Qualified name of a decoder layer's value projection."""
        return f"{self.layers}.{layer}.{self.attention}.{self.value_projection}"


FAMILIES = {family.model_type: family for family in (
    Family("llama"),
    Family("mistral"),
    Family("qwen2"),  # q/k/v carry biases: BlockSparseLinear keeps them
)}


def family_of(model: nn.Module) -> Family:
    """The row of `model`'s family, checked against its first decoder layer."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        what = f"model type {model_type!r}" if model_type else f"{type(model).__name__} (no config.model_type)"
        raise UnsupportedModelError(
            f"{what} is not supported: blocksparse knows the families {', '.join(FAMILIES)} "
            f"(separate q/k/v/o and gate/up/down projections; see blocksparse/families.py)")
    family = FAMILIES[model_type]
    layers = _layers(model, family)
    if len(layers):
        names = {name.rpartition(".")[2] for name, _ in layers[0].named_modules()}
        missing = [p for p in family.projections if p not in names]
        if missing:
            raise UnsupportedModelError(
                f"{type(model).__name__} (model type {model_type!r}) has no {', '.join(missing)} in its "
                f"decoder layers, which the {model_type} row of blocksparse/families.py expects")
    return family


def _layers(model: nn.Module, family: Family) -> nn.ModuleList:
    try:
        layers = model.get_submodule(family.layers)
    except AttributeError:
        layers = None
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"{type(model).__name__} has no decoder layers at {family.layers!r} "
                                    f"(the {family.model_type} row of blocksparse/families.py)")
    return layers


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported causal LM."""
    return _layers(model, family_of(model))
