"""`blocksparse memory`: will a block-sparse fine-tune fit? Bytes per rank, before launching.

    blocksparse memory --model llama-2-70b --sparsity 0.5 --lora-r 16 --seqlen 4096 --world-size 8 --fsdp
    blocksparse memory --model runs/pruned50 --train-sparse-values --gradient-checkpointing

A model is a preset (default, llama-2-7b, llama-2-13b, llama-2-70b), a config.json,
or a model directory. The terms are those of `blocksparse.integration.memory`
(a model of what the code holds, checked on tiny models; not measured on GPUs).
"""

from __future__ import annotations

import argparse

from ..dtypes import DTYPES
from .args import CLIError, add_flag, check_finite


def add_parser(subparsers):
    parser = subparsers.add_parser("memory", help="per-rank memory of a block-sparse fine-tune, before launching",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(parser, "--model", default="llama-2-7b", help="preset, config.json or model directory "
                                                           "(default: %(default)s)")
    add_flag(parser, "--sparsity", type=float, default=0.5, help="of the projections (default: %(default)s)")
    add_flag(parser, "--block-size", type=int, default=16, help="(default: %(default)s)")
    add_flag(parser, "--lora-r", type=int, default=16, help="LoRA rank, 0 = none (default: %(default)s)")
    add_flag(parser, "--lora-targets", choices=["all", "seed"], default="all",
             help="all seven projections, or q_proj/v_proj (default: %(default)s)")
    add_flag(parser, "--no-lora-dropout", action="store_true", help="LoRA dropout 0 (saves its masks)")
    add_flag(parser, "--train-sparse-values", action="store_true", help="also train the kept block values")
    add_flag(parser, "--seqlen", type=int, default=4096, help="(default: %(default)s)")
    add_flag(parser, "--batch-size", type=int, default=1, help="per device (default: %(default)s)")
    add_flag(parser, "--world-size", type=int, default=1, help="ranks (DDP unless --fsdp; default: %(default)s)")
    add_flag(parser, "--fsdp", action="store_true",
             help="shard over the ranks as `finetune --fsdp` does (FSDP2)")
    add_flag(parser, "--backend", choices=["triton", "torch"], default="triton",
             help="whose saved tensors: the GPU's Triton op or the CPU's torch backend (default: %(default)s)")
    add_flag(parser, "--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    add_flag(parser, "--dtype", choices=sorted(DTYPES), default="bfloat16", help="(default: %(default)s)")
    add_flag(parser, "--device-memory", type=float, default=None, metavar="GIB",
             help="say whether the total fits in this much memory per device")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    from ..bench.common import markdown_table
    from ..format import SUPPORTED_BLOCK_SIZES
    from ..integration.memory import PROJECTIONS, SEED_TARGETS, Setup, estimate, shape_of

    check_finite(args)
    if not 0.0 <= args.sparsity < 1.0:
        raise CLIError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.block_size not in SUPPORTED_BLOCK_SIZES:
        raise CLIError(f"--block-size must be one of {SUPPORTED_BLOCK_SIZES}, got {args.block_size}")
    for flag, value, low in (("--lora-r", args.lora_r, 0), ("--seqlen", args.seqlen, 1),
                             ("--batch-size", args.batch_size, 1), ("--world-size", args.world_size, 1)):
        if value < low:
            raise CLIError(f"{flag} must be >= {low}, got {value}")
    if args.device_memory is not None and not args.device_memory > 0:
        raise CLIError(f"--device-memory must be > 0 GiB, got {args.device_memory}")
    if args.fsdp and args.world_size < 2:
        raise CLIError(f"--fsdp shards over ranks: give --world-size >= 2 with it, got {args.world_size}")
    try:
        shape = shape_of(args.model)
    except ValueError as err:
        raise CLIError(str(err)) from err
    setup = Setup(sparsity=args.sparsity, block_size=args.block_size, lora_r=args.lora_r,
                  lora_targets=PROJECTIONS if args.lora_targets == "all" else SEED_TARGETS,
                  lora_dropout=not args.no_lora_dropout, train_values=args.train_sparse_values,
                  seqlen=args.seqlen, batch_size=args.batch_size, world_size=args.world_size, fsdp=args.fsdp,
                  gradient_checkpointing=args.gradient_checkpointing, dtype_bytes=DTYPES[args.dtype].itemsize,
                  backend=args.backend)
    parts = estimate(shape, setup)
    gib = 2.0 ** 30
    rows = [[name, f"{value / gib:.2f}"] for name, value in parts.items() if name != "total" and value]
    rows.append(["**total per rank**", f"**{parts['total'] / gib:.2f}**"])
    print(f"{args.model}: {shape.layers} layers, hidden {shape.hidden}, MLP {shape.intermediate}; sparsity "
          f"{args.sparsity:g} at {args.block_size}x{args.block_size}, LoRA r={args.lora_r} "
          f"({args.lora_targets}), {args.batch_size} x {args.seqlen} tokens per rank, {args.world_size} rank(s) "
          f"{'sharded (FSDP)' if args.fsdp else '(DDP)'}, {args.dtype}, "
          f"{args.backend} backend{', gradient checkpointing' if args.gradient_checkpointing else ''}")
    print(markdown_table(["component", "GiB"], rows))
    if args.device_memory is not None:
        fits = parts["total"] / gib <= args.device_memory
        print(f"{'fits' if fits else 'does not fit'} in {args.device_memory:g} GiB per device "
              f"(allocator overhead and fragmentation not counted)")
    return 0
