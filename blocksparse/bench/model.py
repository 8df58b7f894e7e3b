"""Model benchmark: a whole Llama, dense vs block-sparse, on the three workloads users run.

- prefill:  one forward pass over a prompt (latency, ms; last-token logits only, as generate does)
- decode:   greedy generation with a KV cache (tokens/s); on a GPU also with the
            decode step captured in a CUDA graph over a static cache (no launch overhead)
- finetune: one PEFT LoRA training step (r=8, alpha=16, dropout 0.05, q_proj/v_proj):
            forward + backward + AdamW step (ms)

Models: "default" (the embedded SmolLM2-135M, the CPU default), "llama2-7b" (a
Llama-2-7B-shaped config with random weights, built on the device: no download;
the GPU default) and "tiny" (for tests). `--num-layers` keeps a run short. The
sparse variant is the same model after `sparsify_model` at `--sparsity`; speed
does not depend on which blocks are kept except through the grouped schedule,
so random-weight models get Wanda-like structured masks (see common.block_mask).

    python benchmarks/bench_model.py --quick --out runs/bench_model                       # CPU, ~1 min
    python benchmarks/bench_model.py --config llama2-7b --num-layers 8 --out runs/model  # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import common

CONFIGS = ("default", "llama2-7b", "tiny")
VARIANTS = ("dense", "sparse")
# metric -> (unit, True when larger is better)
METRICS = {
    "prefill": ("ms", False),
    "decode": ("tokens/s", True),
    "finetune_step": ("ms", False),
}
COLUMNS = ("metric", "variant", "mode", "unit", "value", "p20", "p80", "dense_value", "speedup",
           "batch", "tokens", "model", "num_layers", "sparsity", "mask", "density", "dtype", "status",
           "device_name", "torch", "triton", "python", "cuda", "transformers", "peft", "config")


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------
def llama_config(name: str, num_layers: int | None):
    from transformers import LlamaConfig

    if name == "llama2-7b":
        config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                             max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
    else:  # tiny: the test suite's random Llama
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             tie_word_embeddings=False)
    if num_layers:
        config.num_hidden_layers = num_layers
    return config


def build_model(args, device: torch.device, dtype: torch.dtype):
    """A fresh model in eval mode (same weights on every call: fixed seed)."""
    torch.manual_seed(args.seed)
    if args.config == "default":
        from ..integration.model import load_model

        model, _ = load_model("default", dtype=dtype, device=device)
        if args.num_layers:
            model.model.layers = model.model.layers[:args.num_layers]
            model.config.num_hidden_layers = len(model.model.layers)
        return model.eval()
    from transformers import AutoModelForCausalLM

    config = llama_config(args.config, args.num_layers)
    with torch.device(device):  # initialise on the device: a 7B model in fp32 on the CPU would not fit the time
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def sparsify(model, args) -> float:
    """Swap the target linears for BlockSparseLinear; return the mean density."""
    from ..sparsify import sparsify_model, target_linears

    if args.mask == "magnitude":
        sparsify_model(model, sparsity=args.sparsity)
    else:
        masks, perms, row_group = {}, {}, 1
        for i, (name, linear) in enumerate(target_linears(model).items()):
            masks[name], perms[name], row_group = common.mask_row_grouping(
                args.mask, linear.out_features // 16, linear.in_features // 16, args.sparsity, seed=args.seed + i)
        grouped = row_group > 1 and all(p is not None for p in perms.values())
        sparsify_model(model, block_masks=masks, row_perms=perms if grouped else None, row_group=row_group)
    from ..nn import BlockSparseLinear

    layers = [m for m in model.modules() if isinstance(m, BlockSparseLinear)]
    return sum(m.density for m in layers) / max(1, len(layers))


# --------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int, warmup: int, setup=None, clock=time.perf_counter) -> tuple[float, float, float]:
    """Median / p20 / p80 seconds of fn() over `reps` runs after `warmup`; `setup()` runs untimed before each."""
    samples = []
    for i in range(warmup + reps):
        if setup is not None:
            setup()
        sync(device)
        start = clock()
        fn()
        sync(device)
        if i >= warmup:
            samples.append(clock() - start)
    return common.quantiles(samples)


def random_ids(model, batch: int, length: int, device, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=gen).to(device)


def forward_last_logits(model, cache=None, **kwargs):
    """Forward computing only the last position's logits, as generate's prefill does.

    The KV cache argument is `cache` in recent transformers and `past_key_values`
    before; `logits_to_keep` is absent in old versions."""
    import inspect

    params = inspect.signature(model.forward).parameters
    if cache is not None:
        kwargs["cache" if "cache" in params else "past_key_values"] = cache
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    return model(**kwargs)


def returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def bench_prefill(model, args, device):
    ids = random_ids(model, 1, args.prompt_len, device, args.seed)
    quant = timed(lambda: forward_last_logits(model, input_ids=ids, use_cache=True), device,
                  args.reps, args.warmup, clock=common.CPU_CLOCKS[args.cpu_clock])
    return tuple(q * 1e3 for q in quant)


@torch.no_grad()
def bench_decode_eager(model, args, device, batch: int):
    ids = random_ids(model, batch, args.decode_prompt, device, args.seed + 1)
    state = {}

    def prefill():
        out = forward_last_logits(model, input_ids=ids, use_cache=True)
        state["past"] = returned_cache(out)
        state["next"] = out.logits[:, -1:].argmax(-1)

    def decode():
        past, nxt = state["past"], state["next"]
        for _ in range(args.new_tokens):
            out = forward_last_logits(model, input_ids=nxt, cache=past, use_cache=True)
            past, nxt = returned_cache(out), out.logits[:, -1:].argmax(-1)

    quant = timed(decode, device, args.reps, args.warmup, setup=prefill, clock=common.CPU_CLOCKS[args.cpu_clock])
    return per_token_rate(quant, batch, args.new_tokens)


def per_token_rate(quant_s, batch, tokens):
    """Seconds per run -> tokens/s (median, and the p20/p80 of the rate: fast runs are p80)."""
    median, p20, p80 = quant_s
    return tuple(batch * tokens / t for t in (median, p80, p20))


class StaticDecoder:
    """Greedy decoding over a StaticCache with fixed-address inputs, so that one
    decode step can be captured in a CUDA graph and replayed (what torch.compile's
    reduce-overhead mode does, without the compile time). Works across
    transformers versions that take `cache_position` and those that do not."""

    def __init__(self, model, prompt: torch.Tensor, new_tokens: int):
        from transformers import StaticCache

        self.model, self.prompt = model, prompt
        batch, length = prompt.shape
        device = prompt.device
        self.cache = StaticCache(config=model.config, max_cache_len=length + new_tokens + 8)
        self.step_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.takes_cache_position = "cache_position" in __import__("inspect").signature(model.forward).parameters

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor):
        kwargs = dict(input_ids=ids, cache=self.cache, position_ids=positions, use_cache=True)
        if self.takes_cache_position:
            kwargs["cache_position"] = positions[0]
        return forward_last_logits(self.model, **kwargs).logits

    def prefill(self) -> None:
        self.cache.reset()
        batch, length = self.prompt.shape
        positions = torch.arange(length, device=self.prompt.device).expand(batch, length)
        self.step_ids.copy_(self._forward(self.prompt, positions)[:, -1:].argmax(-1))
        self.position.fill_(length)

    def step(self) -> torch.Tensor:
        """Logits of the next token for `step_ids` at `position` (fixed input buffers)."""
        return self._forward(self.step_ids, self.position)

    def advance(self, logits: torch.Tensor) -> None:
        self.step_ids.copy_(logits[:, -1:].argmax(-1))
        self.position.add_(1)


@torch.no_grad()
def bench_decode_cuda_graph(model, args, device, batch: int):
    decoder = StaticDecoder(model, random_ids(model, batch, args.decode_prompt, device, args.seed + 1),
                            args.new_tokens)
    decoder.prefill()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph (lazy cache allocation, autotuning)
        for _ in range(3):
            decoder.step()
    torch.cuda.current_stream().wait_stream(stream)
    decoder.prefill()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = decoder.step()

    def decode():
        for _ in range(args.new_tokens):
            graph.replay()
            decoder.advance(logits)

    quant = timed(decode, device, args.reps, args.warmup, setup=decoder.prefill, clock=common.CPU_CLOCKS[args.cpu_clock])
    return per_token_rate(quant, batch, args.new_tokens)


def bench_finetune(model, args, device, sparse: bool):
    """One LoRA step (fwd + bwd + AdamW) on a [batch, train_len] batch; the model is wrapped by PEFT."""
    from ..integration.peft import lora_config

    config = lora_config()  # the reference recipe: r=8, alpha=16, dropout 0.05 on q_proj/v_proj
    if sparse:
        from ..integration.peft import get_peft_model
    else:
        from peft import get_peft_model
    peft_model = get_peft_model(model, config)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = random_ids(model, args.train_batch, args.train_len, device, args.seed + 2)

    def step():
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    quant = timed(step, device, args.reps, args.warmup, clock=common.CPU_CLOCKS[args.cpu_clock])
    return tuple(q * 1e3 for q in quant)


# --------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------
@dataclass
class Workload:
    """One measurement: `run(model, variant)` returns (median, p20, p80) in `METRICS[metric]` units."""
    metric: str
    mode: str
    batch: int
    tokens: int
    run: Callable

    @property
    def label(self) -> str:
        return f"{self.metric} {self.mode} b={self.batch}"


def workloads(args, device) -> list[Workload]:
    """In run order; fine-tuning last, since it wraps the model in PEFT."""
    items = [Workload("prefill", "eager", 1, args.prompt_len, lambda model, variant: bench_prefill(model, args, device))]
    for b in args.decode_batch:
        items.append(Workload("decode", "eager", b, args.new_tokens,
                              lambda model, variant, b=b: bench_decode_eager(model, args, device, b)))
        if device.type == "cuda" and args.cuda_graph != "off":
            items.append(Workload("decode", "cuda_graph", b, args.new_tokens,
                                  lambda model, variant, b=b: bench_decode_cuda_graph(model, args, device, b)))
    if args.finetune:
        items.append(Workload("finetune_step", "eager", args.train_batch, args.train_len,
                              lambda model, variant: bench_finetune(model, args, device, variant == "sparse")))
    return items


def guarded(label: str, fn, *fn_args) -> tuple[tuple, str]:
    """Run one measurement; a failure becomes its row's status, not the end of the run."""
    try:
        return fn(*fn_args), "ok"
    except Exception as err:  # report and continue: other workloads still measure
        message = (str(err).strip().splitlines() or [""])[0][:200]
        print(f"  {label} failed: {type(err).__name__}: {message}", file=sys.stderr)
        return (math.nan,) * 3, f"failed: {type(err).__name__}: {message}"


@contextlib.contextmanager
def cpu_uses_torch_backend(device: torch.device):
    """On a CPU the sparse model must run the torch backend, even if BLOCKSPARSE_BACKEND
    asks for Triton (the interpreter is a test tool, not a speed path)."""
    saved = os.environ.get("BLOCKSPARSE_BACKEND")
    if device.type == "cpu":
        os.environ["BLOCKSPARSE_BACKEND"] = "torch"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("BLOCKSPARSE_BACKEND", None)
        else:
            os.environ["BLOCKSPARSE_BACKEND"] = saved


def run(args) -> Path:
    device = common.start_run(args)
    dtype = common.pick_dtype(args.dtype, device)
    env = common.environment(device)
    env["transformers"] = common.package_version("transformers")
    env["peft"] = common.package_version("peft")
    config = (f"model={args.config} layers={args.num_layers or 'all'} sparsity={args.sparsity} "
              f"mask={args.mask} prompt={args.prompt_len} decode_prompt={args.decode_prompt} "
              f"new_tokens={args.new_tokens} decode_batch={','.join(map(str, args.decode_batch))} "
              f"train={args.train_batch}x{args.train_len} reps={args.reps} warmup={args.warmup} "
              f"cuda_graph={args.cuda_graph}"
              + (f" threads={torch.get_num_threads()} clock={args.cpu_clock}" if device.type == "cpu" else ""))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = common.CsvLog(out / "bench_model.csv", COLUMNS)
    print(f"# {env['device_name']} | torch {env['torch']} transformers {env['transformers']} "
          f"peft {env['peft']} | {common.dtype_name(dtype)}")
    print(f"# {config}")
    with cpu_uses_torch_backend(device):
        # Both variants live side by side so each workload is measured dense then sparse
        # at once: a run cut short still leaves complete pairs in the CSV.
        models, densities = {}, {}
        for variant in args.variants:
            models[variant] = build_model(args, device, dtype)
            densities[variant] = 1.0
            if variant == "sparse":
                start = time.perf_counter()
                densities[variant] = sparsify(models[variant], args)
                print(f"sparsified to density {densities[variant]:.3f} in {time.perf_counter() - start:.1f} s")
        for work in workloads(args, device):
            dense_value = math.nan
            for variant in args.variants:
                quant, status = guarded(f"{variant} {work.label}", work.run, models[variant], variant)
                if variant == "dense":
                    dense_value = quant[0]
                log.append(result_row(work, quant, status, variant, dense_value, densities[variant],
                                      args, dtype, env, config))
                print(f"  {variant:<6} {work.metric:<14} {work.mode:<10} b={work.batch:<3} n={work.tokens:<5} "
                      f"{quant[0]:10.3f} {METRICS[work.metric][0]}", flush=True)
    write_summary(out, log.rows, env, config)
    print(f"wrote {out / 'bench_model.csv'}, {out / 'bench_model.png'}, {out / 'bench_model.md'}")
    return out


def result_row(work: Workload, quant, status, variant, dense_value, density, args, dtype, env, config):
    higher_better = METRICS[work.metric][1]
    value = quant[0]
    if variant == "dense":
        speedup = 1.0 if status == "ok" else math.nan
    else:
        speedup = value / dense_value if higher_better else dense_value / value
    return {
        "metric": work.metric, "variant": variant, "mode": work.mode, "unit": METRICS[work.metric][0],
        "value": value, "p20": quant[1], "p80": quant[2], "dense_value": dense_value,
        "speedup": speedup, "batch": work.batch, "tokens": work.tokens, "model": args.config,
        "num_layers": args.num_layers or "all", "sparsity": args.sparsity if variant == "sparse" else 0.0,
        "mask": args.mask if variant == "sparse" else "", "density": density,
        "dtype": common.dtype_name(dtype), "status": status,
        **{k: env[k] for k in ("device_name", "torch", "triton", "python", "cuda", "transformers", "peft")},
        "config": config,
    }


def write_summary(out: Path, rows: list[dict], env: dict, config: str) -> None:
    sparse_rows = [r for r in rows if r["variant"] != "dense" and not math.isnan(r["speedup"])]

    def draw(fig, axes):
        ax = axes[0][0]
        labels = [f"{r['metric']}\n{r['mode']} b={r['batch']}" for r in sparse_rows]
        ax.bar(range(len(sparse_rows)), [r["speedup"] for r in sparse_rows], color="C0")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        if sparse_rows:
            ax.axhline(1.0 / sparse_rows[0]["density"], color="gray", linewidth=0.8, linestyle=":")
        ax.set_xticks(range(len(sparse_rows)), labels, fontsize=7)
        ax.set_ylabel("speedup vs dense")
        ax.set_title(f"{rows[0]['model'] if rows else ''}: block-sparse vs dense, {env['device_name']}",
                     fontsize=8)

    common.plot(out / "bench_model.png", draw, width=6.5)

    header = ["metric", "mode", "batch", "tokens", "unit", "dense", "sparse", "speedup"]
    table = []
    for r in sparse_rows:
        table.append([r["metric"], r["mode"], r["batch"], r["tokens"], r["unit"], common.fmt(r["dense_value"], 4),
                      common.fmt(r["value"], 4), common.fmt_speedup(r["speedup"])])
    parts = ["# Model benchmark: block-sparse vs dense\n", common.environment_markdown(env, config),
             f"- transformers {env['transformers']}, peft {env['peft']}\n",
             "Median of the timed runs. prefill and finetune_step: ms (lower is better); "
             "decode: generated tokens/s (higher is better). Speedup > 1 means the sparse model is faster. "
             "Dotted line in the plot: the ideal 1/density.\n",
             common.markdown_table(header, table)]
    failures = [f"- {r['variant']} {r['metric']} {r['mode']} b={r['batch']}: {r['status']}"
                for r in rows if r["status"] != "ok"]
    if failures:
        parts.append("\nNot measured:\n" + "\n".join(failures))
    (out / "bench_model.md").write_text("\n".join(parts) + "\n")


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_model", help="output folder (CSV, PNG, markdown)")
    p.add_argument("--quick", action="store_true", help="short prompts and few steps (~1 min on 2 CPU cores)")
    p.add_argument("--config", default=None, choices=CONFIGS,
                   help="default (SmolLM2-135M, CPU default) | llama2-7b (random weights, GPU default) | tiny")
    p.add_argument("--num-layers", type=int, default=None, help="keep only the first N decoder layers")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--mask", default=None, choices=("magnitude",) + common.MASK_KINDS,
                   help="block masks: magnitude of the weights (default for real models) or, for random "
                        "weights, structured (Wanda-like, the default there) / random")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU: torch threads (0: torch's default). On a shared machine 1 avoids "
                        "OpenMP threads waiting on each other behind other processes")
    p.add_argument("--prompt-len", type=int, default=None, help="prefill tokens (default 2048 GPU, 256 CPU)")
    p.add_argument("--decode-prompt", type=int, default=None, help="prompt before decoding (default 128, 32 CPU)")
    p.add_argument("--new-tokens", type=int, default=None, help="decoded tokens per timed run (default 64, 16 CPU)")
    p.add_argument("--decode-batch", default=None, help="decode batch sizes, comma-separated (default 1,16 GPU; 1 CPU)")
    p.add_argument("--train-len", type=int, default=None, help="fine-tune sequence length (default 1024, 128 CPU)")
    p.add_argument("--train-batch", type=int, default=1)
    p.add_argument("--no-finetune", dest="finetune", action="store_false", help="skip the fine-tune step")
    p.add_argument("--variants", default="dense,sparse", help="comma-separated subset of dense,sparse")
    p.add_argument("--cuda-graph", default="auto", choices=("auto", "off"),
                   help="GPU: also decode with CUDA-graph replays over a static cache")
    p.add_argument("--cpu-clock", default="wall", choices=tuple(common.CPU_CLOCKS),
                   help="CPU: wall time (default) or, with --threads 1, the process's CPU time "
                        "(robust to other jobs on a shared machine)")
    p.add_argument("--reps", type=int, default=None, help="timed runs per workload (default 5, 3 quick)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p


def resolve_defaults(args) -> None:
    on_gpu = common.pick_device(args.device).type == "cuda"
    args.config = args.config or ("llama2-7b" if on_gpu else "default")
    args.mask = args.mask or ("magnitude" if args.config == "default" else "structured")
    quick = args.quick
    if on_gpu:
        defaults = dict(prompt_len=512 if quick else 2048, decode_prompt=128, new_tokens=32 if quick else 64,
                        train_len=512 if quick else 1024, reps=3 if quick else 5, decode_batch="1,16")
    else:
        defaults = dict(prompt_len=128 if quick else 256, decode_prompt=32, new_tokens=8 if quick else 16,
                        train_len=64 if quick else 128, reps=3 if quick else 5, decode_batch="1")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if isinstance(args.decode_batch, str):
        args.decode_batch = [int(b) for b in args.decode_batch.split(",") if b]
    args.variants = [v for v in args.variants.split(",") if v]
    bad = set(args.variants) - set(VARIANTS)
    if bad:
        raise SystemExit(f"--variants: unknown {sorted(bad)}; choose from {', '.join(VARIANTS)}")
    if not 0.0 <= args.sparsity < 1.0:
        raise SystemExit(f"--sparsity must be in [0, 1), got {args.sparsity}")


def main(argv=None) -> int:
    return common.main(build_parser, resolve_defaults, run, argv)


if __name__ == "__main__":
    sys.exit(main())
