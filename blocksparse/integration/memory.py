"""Memory model of fine-tuning a block-sparse Llama: bytes per rank, before launching.

`estimate(shape, setup)` adds up, per rank: the weights (dense embeddings, head and
norms; the kept blocks and their index arrays), the trainable parameters (LoRA in
fp32, and the kept block values when they are trained) with their gradients and
Adam states, and the activations saved for backward, with or without gradient
checkpointing. Several ranks are DDP (everything on every rank) unless `fsdp`: then
parameters, gradients and optimizer states are sharded, one decoder layer is
gathered at a time (two with prefetch), the root unit (embeddings, head) stays
gathered and the index arrays replicated (buffers), as `blocksparse finetune --fsdp`
runs it (`integration/fsdp.py`; LoRA only: the kept values are not trained under FSDP yet).

The activation terms follow what the code saves for backward, per decoder layer and
token: the two RMSNorms' fp32 inputs, SDPA's q, k, v, output and log-sum-exp (k and
v repeated to the query heads under GQA), the rotary tables, the MLP's gate, up and
their product, and the LoRA terms of the backend: the torch backend (CPU) keeps per
adapted linear its input, its dropout output and T = x A^T (checked against the
saved tensors of tiny models in tests/integration/test_memory.py, within 15%); the
Triton op keeps only the inputs dA or dW need, once per shared input, T, and its
dropout keep mask packed one bit per element (checked the same way, in the interpreter). Plus
the LM loss: `linear_cross_entropy` holds one chunk of logits at a time (fp32, and the
compute dtype's copy) and keeps the final hidden states' gradient; under FSDP the Trainer
computes Hugging Face's loss, whose fp32 log-softmax of the logits and its gradient stay.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..families import FAMILIES
from .lm_loss import chunk_rows

# The Llama row of the families table: the projections pruned, and the seed's LoRA targets.
PROJECTIONS = FAMILIES["llama"].projections
SEED_TARGETS = FAMILIES["llama"].lora_targets
# Bytes per stored block besides its values: col (int32) and the two orientations'
# schedule tables (a block index each), as the kernels and the torch backend keep them.
INDEX_BYTES_PER_BLOCK = 12
ADAM_STATES = 2


@dataclass(frozen=True)
class Shape:
    """A Llama-family geometry (the config.json fields that set the memory)."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @classmethod
    def from_config(cls, config: dict) -> "Shape":
        try:
            return cls(hidden=int(config["hidden_size"]), intermediate=int(config["intermediate_size"]),
                       layers=int(config["num_hidden_layers"]), heads=int(config["num_attention_heads"]),
                       kv_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
                       vocab=int(config["vocab_size"]), tied=bool(config.get("tie_word_embeddings", False)))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"config.json lacks a Llama geometry field or has a bad value: {err}") from err

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each projection of one decoder layer."""
        h, f, kv = self.hidden, self.intermediate, self.kv_dim
        return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
                "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}


# Public configs (config.json of each model); "default" is the embedded SmolLM2-135M.
PRESETS = {
    "default": Shape(576, 1536, 30, 9, 3, 49152, tied=True),
    "llama-2-7b": Shape(4096, 11008, 32, 32, 32, 32000),
    "llama-2-13b": Shape(5120, 13824, 40, 40, 40, 32000),
    "llama-2-70b": Shape(8192, 28672, 80, 64, 8, 32000),
}


def shape_of(model: str) -> Shape:
    """A preset name, a config.json, or a model directory holding one."""
    if model in PRESETS:
        return PRESETS[model]
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json or a "
                         f"directory holding one")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    return Shape.from_config(config)


@dataclass(frozen=True)
class Setup:
    """What is trained, how, and on how many ranks."""
    sparsity: float = 0.5
    block_size: int = 16
    lora_r: int = 16
    lora_targets: tuple[str, ...] = PROJECTIONS
    lora_dropout: bool = True
    train_values: bool = False
    seqlen: int = 4096
    batch_size: int = 1
    world_size: int = 1
    fsdp: bool = False
    gradient_checkpointing: bool = False
    dtype_bytes: int = 2
    backend: str = "triton"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.fsdp and self.world_size < 2:
            raise ValueError("fsdp shards over ranks: give world_size >= 2 with it")


BACKENDS = ("triton", "torch")
# The linears that share one input: an input is saved once, whichever of them needs it.
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def activation_bytes_per_layer_token(shape: Shape, setup: Setup) -> float:
    """Bytes one decoder layer saves for backward per token (module docstring)."""
    s, h, f = setup.dtype_bytes, shape.hidden, shape.intermediate
    head_dim = h // shape.heads
    total = 2 * (4 * h + 4)                                            # RMSNorms: fp32 input, rsqrt
    total += s * (2 * h + 2 * shape.kv_dim + 2 * head_dim) + 4 * shape.heads  # SDPA q/out/k/v, rope, lse
    if shape.kv_dim < h:
        total += 2 * s * h                                             # k, v repeated to the query heads
    total += 3 * s * f                                                 # gate, up, their product
    shapes = shape.projection_shapes()
    adapted = set(setup.lora_targets) if setup.lora_r else set()
    if setup.backend == "torch":
        # Measured (tests): each adapted linear saves its input and its dropout output (the keep
        # mask, in the input's dtype, with dropout on) besides T.
        for name in adapted:
            total += (2 if setup.lora_dropout else 1) * s * shapes[name][1] + s * setup.lora_r
        if setup.train_values:  # dW needs the other linears' inputs too
            total += sum(s * shapes[name][1] for name in set(PROJECTIONS) - adapted)
        return total
    # Triton (the op's saved tensors, measured in the interpreter): a linear keeps its input only
    # when dA or dW needs it, once per shared input (down's input is the MLP product, counted
    # above), T (input dtype) and, with dropout, its keep mask at one bit per element.
    needs_input = adapted | (set(PROJECTIONS) if setup.train_values else set())
    for group in SHARED_INPUTS:
        if needs_input & set(group) and group != ("down_proj",):
            total += s * shapes[group[0]][1]
    total += s * setup.lora_r * len(adapted)
    if setup.lora_dropout:
        total += sum(shapes[name][1] / 8 for name in adapted)
    return total


def estimate(shape: Shape, setup: Setup) -> dict[str, float]:
    """Bytes per rank, by component (module docstring); "total" is their sum. Several ranks
    without `fsdp` are DDP: every rank holds everything."""
    s = setup.dtype_bytes
    w = setup.world_size if setup.fsdp else 1  # what sharding divides by
    shapes = shape.projection_shapes()
    layer_params = sum(n * k for n, k in shapes.values())
    kept = (1.0 - setup.sparsity) * layer_params * shape.layers
    dense = shape.vocab * shape.hidden * (1 if shape.tied else 2) + (2 * shape.layers + 1) * shape.hidden
    lora = (sum(setup.lora_r * (shapes[t][0] + shapes[t][1]) for t in setup.lora_targets) * shape.layers
            if setup.lora_r else 0)
    tokens = setup.batch_size * setup.seqlen
    per_layer_token = activation_bytes_per_layer_token(shape, setup)
    if setup.gradient_checkpointing:  # each layer's input, one layer recomputed at a time
        layer_acts = tokens * (shape.layers * s * shape.hidden + per_layer_token)
    else:
        layer_acts = tokens * shape.layers * per_layer_token
    out = {
        # Under FSDP the root unit (embeddings, head, final norm) is gathered for the whole step.
        "dense weights (embeddings, head, norms)": dense * s,
        "kept block values": kept * s / w,
        "block index (replicated)": kept / setup.block_size ** 2 * INDEX_BYTES_PER_BLOCK,
        "LoRA parameters (fp32)": lora * 4 / w,
        "LoRA gradients + Adam (fp32)": lora * 4 * (1 + ADAM_STATES) / w,
        "trained values: gradients + Adam": kept * s * (1 + ADAM_STATES) / w if setup.train_values else 0.0,
        "FSDP gathered layers (2)": 2 * (1.0 - setup.sparsity) * layer_params * s if setup.fsdp else 0.0,
        "activations (decoder layers)": layer_acts,
        "LM loss (logits)": (tokens * shape.vocab * 8 if setup.fsdp else
                             min(tokens, chunk_rows(shape.vocab)) * shape.vocab * (4 + (s if s < 4 else 0))
                             + tokens * shape.hidden * s),
    }
    out["total"] = sum(out.values())
    return out
