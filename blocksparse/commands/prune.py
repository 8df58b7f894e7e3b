"""`blocksparse prune`: prune a model to b x b blocks and save it as a sparse checkpoint.

    blocksparse prune --model default --sparsity 0.5 --out runs/pruned50

calibrates on --calib (random --nsamples windows of --seqlen tokens), prunes
every decoder layer in sequence (`blocksparse.prune.prune_model`), converts the
pruned linears to BlockSparseLinear and writes the directory with
`save_sparse_pretrained`, plus prune_report.json. With --eval-dataset it also
measures perplexity after (on the block-sparse model) and before (reloading the
dense model), and adds both to prune_report.json; the checkpoint is written first.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from pathlib import Path


from ..dtypes import DTYPES
from ..format import SUPPORTED_BLOCK_SIZES
from ..masks import COMPARISON_GROUPS, SCORES
from ..prune import METHODS, RECONSTRUCT_TARGETS, PruneOptions
from ..prune.allocation import ALLOCATIONS
from ..prune.calibration import DEFAULT_SINK_TOKENS, DEFAULT_SINK_WEIGHT
from ..prune.refine import REFINE_PRECISIONS
from .args import CLIError, add_dataset_flag, add_dtype_flag, add_flag, check_finite, resolve_device

_METHOD_HELP = "; ".join([f"{name}: {score.help}" for name, score in SCORES.items()]
                         + ["obc: greedy block OBS, drops the block costing least output error after "
                            "re-solving the rest"])


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "prune", help="block-prune a model with calibration data and save a sparse checkpoint",
        description="Sequential block pruning (Wanda / OBS scores or greedy block OBS), per block "
                    "row by default, with least-squares reconstruction of the kept weights and a "
                    "gradient refinement of each decoder layer against the dense one. "
                    "Writes a Hugging Face directory with block-sparse safetensors and prune_report.json.")
    add_flag(parser, "--model", default="default",
             help="'default' (embedded SmolLM2-135M-Instruct), a local model directory or a hub id "
                  "(default: %(default)s)")
    add_flag(parser, "--sparsity", type=float, default=0.5,
             help="fraction of all target-linear weights removed, in [0, 1) (default: %(default)s)")
    add_flag(parser, "--block-size", "--sparse-block-size", type=int, default=16, choices=SUPPORTED_BLOCK_SIZES,
             help="sparse block edge b (default: %(default)s)")
    add_flag(parser, "--method", choices=METHODS, default="obc",
             help=f"block score or search: {_METHOD_HELP} (default: %(default)s)")
    add_flag(parser, "--comparison-group", choices=tuple(COMPARISON_GROUPS), default="block-row",
             help="which blocks compete: block-row (every block row keeps the same number of blocks) or "
                  "global (one threshold per matrix, for comparison only) (default: %(default)s)")
    add_flag(parser, "--row-group", type=int, default=8, metavar="G",
             help="grouped masks: every G block rows (chosen by their scores) share one set of block "
                  "columns, so the kernels' grouped schedule computes only that union; 1 = free masks, "
                  "slower where compute-bound (README: the trade-off) (default: %(default)s)")
    add_flag(parser, "--union-density", type=float, default=None, metavar="U",
             help="with --row-group G > 1: the share of block columns a group may use, in (0, 1] "
                  "(default: 1 - sparsity, fully shared: the union is the density)")
    add_flag(parser, "--permute-channels", action=argparse.BooleanOptionalAction, default=True,
             help="first reorder the model's hidden, MLP and value channels by importance so heavy channels "
                  "share blocks: the same function, a better mask (the checkpoint is a plain model in the new "
                  "order; prune_report.json records the hidden one) (default: on)")
    add_flag(parser, "--reconstruct", action=argparse.BooleanOptionalAction, default=True,
             help="re-solve the kept weights of each block row by least squares (default: on)")
    add_flag(parser, "--reconstruct-target", choices=RECONSTRUCT_TARGETS, default="dense",
             help="dense: fit each linear to the dense model's output; pruned: to its own dense weights "
                  "on the pruned model's inputs (default: %(default)s)")
    add_flag(parser, "--allocation", choices=ALLOCATIONS, default="uniform",
             help="per-layer sparsity: uniform, or owl (outlier-weighted; the total stays at "
                  "--sparsity) (default: %(default)s)")
    add_flag(parser, "--owl-spread", type=float, default=0.08,
             help="owl: layer densities span target +- this (default: %(default)s)")
    add_flag(parser, "--module-density", action="append", default=[], metavar="NAME=D",
             help="keep density D in the linears under module NAME (e.g. model.layers.0.mlp=1.0; * matches "
                  "anything: model.layers.*.self_attn.v_proj=1.0); the "
                  "other linears share the rest of the --sparsity budget. Repeatable; replaces --allocation")
    add_flag(parser, "--sink-weight", type=float, default=DEFAULT_SINK_WEIGHT,
             help="the first token of every calibration window (the attention sink) counts as this many "
                  "tokens in the scores and fits; 1 = no weighting (default: %(default)s)")
    add_flag(parser, "--sink-tokens", type=int, default=DEFAULT_SINK_TOKENS,
             help="also fit this many of the calibration text's most frequent tokens (and BOS) as the first "
                  "token of a one-token sequence, so the attention sink forms whatever token a window starts "
                  "with; they share the sink weight; 0 = only the windows' first tokens (default: %(default)s)")
    add_flag(parser, "--refine-steps", type=int, default=100,
             help="after each decoder layer is pruned, this many Adam steps on its kept weights to match "
                  "the dense layer's output on the calibration data; 0 = closed-form fits only "
                  "(default: %(default)s)")
    add_flag(parser, "--refine-lr", type=float, default=0.03,
             help="refinement step size relative to each matrix's RMS weight (default: %(default)s)")
    add_flag(parser, "--refine-precision", choices=tuple(REFINE_PRECISIONS), default="float32",
             help="matmul precision of the refinement steps: bfloat16 runs them under autocast (weights, Adam "
                  "and loss in fp32), about twice as fast where bf16 is native (default: %(default)s)")
    add_flag(parser, "--damp", type=float, default=0.01,
             help="least-squares damping, as a fraction of mean(diag X^T X) (default: %(default)s)")
    add_dataset_flag(parser, "--calib", what="calibration text (its calib split)")
    add_flag(parser, "--nsamples", type=int, default=64, help="calibration windows (default: %(default)s)")
    add_flag(parser, "--seqlen", type=int, default=512, help="tokens per calibration window (default: %(default)s)")
    add_flag(parser, "--seed", type=int, default=0, help="calibration sampling seed (default: %(default)s)")
    add_flag(parser, "--batch-size", type=int, default=8,
             help="calibration windows per forward pass (default: %(default)s)")
    add_flag(parser, "--eval-dataset", default=None,
             help="also report perplexity before and after on this dataset's eval text (a --calib name "
                  "or path, e.g. default)")
    add_flag(parser, "--eval-seqlen", type=int, default=512, help="eval window length (default: %(default)s)")
    add_flag(parser, "--eval-max-windows", type=int, default=None, help="eval at most this many windows")
    add_flag(parser, "--out", required=True, metavar="DIR", help="output directory (sparse checkpoint)")
    add_flag(parser, "--overwrite", action="store_true", help="write into --out even if it is not empty")
    add_flag(parser, "--max-shard-size", default="50GB",
             help="largest weights file; larger checkpoints are written as shards with an index, as "
                  "save_pretrained does (bytes or e.g. 5GB; default: %(default)s, the hub's file limit)")
    add_flag(parser, "--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_dtype_flag(parser, "dtype the model is loaded, pruned and saved in")
    add_flag(parser, "--offload", choices=["cpu", "disk"], default=None,
             help="cpu: keep the model in host memory and move one decoder layer at a time to --device, for "
                  "models larger than the device (docs/DESIGN.md: the peak memory); disk: also keep it out of "
                  "host memory: memory-mapped from its safetensors, each pruned layer written beside --out and "
                  "mapped from there (a local dense safetensors model)")
    add_flag(parser, "--push-to-hub", default=None, metavar="REPO_ID",
             help="upload the finished checkpoint (marker, card and report included) to this hub repository")
    add_flag(parser, "--hub-private", action="store_true", help="with --push-to-hub: create the repository private")
    add_flag(parser, "--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
    return parser


def _check_args(args) -> None:
    check_finite(args)
    if not 0.0 <= args.sparsity < 1.0:
        raise CLIError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.hub_private and not args.push_to_hub:
        raise CLIError("--hub-private is for the repository --push-to-hub creates: give --push-to-hub with it")
    if args.push_to_hub:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError as err:
            raise CLIError(f"--push-to-hub {args.push_to_hub!r} is not a hub repository id "
                           f"(expected user/name)") from err
    size = re.fullmatch(r"(\d+)\s*([KMGT]B)?", args.max_shard_size.strip(), re.IGNORECASE)
    if size is None or int(size.group(1)) < 1:
        raise CLIError(f"--max-shard-size must be a positive number of bytes or of KB, MB, GB or TB (e.g. 5GB), "
                       f"got {args.max_shard_size!r}")
    # The hub's parser takes "5GB", not a bare byte count.
    args.max_shard_size = int(size.group(1)) if size.group(2) is None else size.group(0).replace(" ", "").upper()
    if args.offload and args.eval_dataset is not None:
        raise CLIError("--eval-dataset evaluates the whole model on --device, which --offload says it does not "
                       "fit; evaluate the saved checkpoint with `blocksparse eval` instead")
    for flag, value in (("--nsamples", args.nsamples), ("--batch-size", args.batch_size)):
        if value < 1:
            raise CLIError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--seqlen", args.seqlen), ("--eval-seqlen", args.eval_seqlen)):
        if value < 2:
            raise CLIError(f"{flag} must be >= 2, got {value}")
    if args.eval_max_windows is not None and args.eval_max_windows < 1:
        raise CLIError(f"--eval-max-windows must be >= 1, got {args.eval_max_windows}")
    if args.damp <= 0:
        raise CLIError(f"--damp must be > 0, got {args.damp}")
    if args.sink_weight < 1:
        raise CLIError(f"--sink-weight must be >= 1 (1 = no weighting), got {args.sink_weight}")
    if args.sink_tokens < 0:
        raise CLIError(f"--sink-tokens must be >= 0 (0 = only the windows' first tokens), got {args.sink_tokens}")
    if args.refine_steps < 0:
        raise CLIError(f"--refine-steps must be >= 0 (0 = no refinement), got {args.refine_steps}")
    if args.refine_lr <= 0:
        raise CLIError(f"--refine-lr must be > 0, got {args.refine_lr}")
    _module_densities(args.module_density)
    if args.method == "obc" and args.comparison_group != "block-row":
        raise CLIError("--method obc picks blocks per block row; use --comparison-group block-row")
    if args.method == "obc" and not args.reconstruct:
        raise CLIError("--method obc re-solves the kept weights by construction; drop --no-reconstruct")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        raise CLIError(f"--out {args.out} exists and is not an empty directory (pass --overwrite to write into it)")


def _module_densities(specs: list[str]) -> dict[str, float]:
    densities = {}
    for spec in specs:
        name, sep, value = spec.rpartition("=")
        try:
            density = float(value)
        except ValueError:
            density = None
        if not sep or not name or density is None or not 0.0 < density <= 1.0:
            raise CLIError(f"--module-density expects NAME=D with D in (0, 1], got {spec!r}")
        densities[name] = density
    return densities


def run(args) -> int:
    from ..integration.checkpoint import REPORT_NAME, push_sparse_checkpoint, save_sparse_pretrained
    from ..integration.data import DatasetError, calibration_samples, load_text, tokenize_text
    from ..integration.evaluate import count_windows, perplexity
    from ..integration.model import ModelNotFoundError, load_mapped, load_model
    from ..integration.model_card import sparse_checkpoint_card, write_card
    from ..prune import prune_model
    from ..sparsify import check_block_divisible, target_linears

    _check_args(args)
    device = resolve_device(args.device)
    started = time.perf_counter()
    try:
        if args.offload == "disk":
            from transformers import AutoTokenizer

            model, tokenizer = load_mapped(args.model, dtype=DTYPES[args.dtype])
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(args.model)
        else:
            model, tokenizer = load_model(args.model, device=args.offload or device, dtype=DTYPES[args.dtype])
        check_block_divisible(target_linears(model), args.block_size)
        calib = calibration_samples(tokenizer, args.calib, args.nsamples, args.seqlen, seed=args.seed)
        eval_tokens = None
        if args.eval_dataset is not None:
            eval_tokens = tokenize_text(tokenizer, load_text(args.eval_dataset, "eval"))
            count_windows(eval_tokens.shape[1], args.eval_seqlen, args.eval_max_windows)
    except (ModelNotFoundError, DatasetError, ValueError, OSError) as err:
        raise CLIError((str(err).splitlines() or [type(err).__name__])[0]) from err

    progress = not args.no_progress
    allocation = _module_densities(args.module_density) or args.allocation
    try:
        options = PruneOptions(sparsity=args.sparsity, block_size=args.block_size, method=args.method,
                               comparison_group=args.comparison_group, row_group=args.row_group,
                               union_density=args.union_density, permute_channels=args.permute_channels,
                               reconstruct=args.reconstruct,
                               allocation=allocation, reconstruct_target=args.reconstruct_target, damp=args.damp,
                               sink_weight=args.sink_weight, sink_tokens=args.sink_tokens,
                               refine_steps=args.refine_steps, refine_lr=args.refine_lr,
                               refine_precision=args.refine_precision, owl_spread=args.owl_spread,
                               batch_size=args.batch_size)
    except ValueError as err:
        raise CLIError(str(err)) from err
    prune_started = time.perf_counter()
    offload_dir = None
    if args.offload == "disk":  # the pruned layers wait in files beside --out until the checkpoint is written
        parent = Path(args.out).resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        offload_dir = Path(tempfile.mkdtemp(prefix=".offload-", dir=parent))
    try:
        try:
            report = prune_model(model, calib, options, progress=progress, execution_device=device,
                                 offload_dir=offload_dir)
        except ValueError as err:  # options that only the model can check (e.g. --module-density names)
            raise CLIError(str(err)) from err
        report["prune_seconds"] = round(time.perf_counter() - prune_started, 1)
        report["model"] = args.model
        report["calibration"].update(dataset=args.calib, seed=args.seed)
        report["cli_args"] = {key: value for key, value in sorted(vars(args).items())
                              if key not in ("func", "command")}
        # Saved before the (slow) evaluation, so the checkpoint is usable as soon as possible.
        save_sparse_pretrained(model, tokenizer, args.out, report=report, max_shard_size=args.max_shard_size)
    finally:
        if offload_dir is not None:  # the model maps these files: Linux keeps them while it does
            shutil.rmtree(offload_dir, ignore_errors=True)
    print(f"saved {args.out} | total density {report['total_density']:.4f} | "
          f"{report['prune_seconds']:.0f} s pruning")
    if eval_tokens is not None:
        after = perplexity(model, eval_tokens, args.eval_seqlen, args.eval_max_windows, progress=progress)
        del model
        dense_model, _ = load_model(args.model, device=device, dtype=DTYPES[args.dtype])
        before = perplexity(dense_model, eval_tokens, args.eval_seqlen, args.eval_max_windows, progress=progress)
        report["perplexity"] = {"dataset": args.eval_dataset, "seqlen": args.eval_seqlen,
                                "windows": after["windows"], "dense": before["ppl"], "pruned": after["ppl"],
                                "ratio": after["ppl"] / before["ppl"]}
        (Path(args.out) / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        write_card(args.out, sparse_checkpoint_card(report, args.out))  # now with the perplexities
        print(f"ppl dense {before['ppl']:.4f} -> pruned {after['ppl']:.4f} "
              f"({after['ppl'] / before['ppl']:.2f}x) on {after['windows']} windows of {args.eval_dataset}")
    if args.push_to_hub:
        try:
            files = push_sparse_checkpoint(args.out, args.push_to_hub, private=args.hub_private or None)
        except Exception as err:  # the hub's errors (auth, network, name) as one line; the checkpoint stays
            raise CLIError(f"--push-to-hub {args.push_to_hub}: {type(err).__name__}: "
                           f"{(str(err).strip().splitlines() or [''])[0]} (the checkpoint is saved in {args.out})") from err
        print(f"pushed {len(files)} files to {args.push_to_hub}: {', '.join(files)}")
    return 0
