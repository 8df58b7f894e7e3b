"""Recovery curves: held-out perplexity of a pruned model against training tokens, one line
per recovery recipe (LoRA, distillation, training the kept blocks).

Every recipe starts from the same one-shot checkpoint (`--checkpoint`, or the embedded
model pruned once with the demo's recipe into OUT/one_shot), trains at a constant
learning rate after a short warm-up, and is evaluated (adapter unmerged) each time it
has seen a budget's tokens, so one run gives its whole curve. A recipe's learning rate
comes from a small sweep (`--sweep`, multiples of its base rate) scored at the first
budget on validation windows taken from the end of the eval text, apart from the
reported windows at its start. Finished recipes are skipped when the command is rerun
with the same settings; the table and the plot are rewritten from all results.

A curve's own wall time is not a speed measurement where the machine's speed drifts
(a shared VM's moved 1.6x within a day): `--speed` times every recipe's steps in one
process, interleaved (a few short runs of each, in turn, medians), and the table's tokens/s
and minutes and the plot's per-minute panel then come from that measurement.

    python -m blocksparse.bench.recovery --out runs/recovery --budgets 10000,40000,160000
    python -m blocksparse.bench.recovery --out runs/recovery --recipes seed,lora16 --sweep 1
    python -m blocksparse.bench.recovery --out runs/recovery_bf16 --recipes lora16 --precision bf16
    python -m blocksparse.bench.recovery --out runs/recovery --report-only --speed
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from ..integration.recipes import PRECISIONS, RECOVERY_RECIPES
from . import common

DEFAULT_RECIPES = ",".join(RECOVERY_RECIPES)
VALIDATION_WINDOWS = 12
# The reference fine-tuning budget (the seed's issue: 30,000 training sequences of 1024 tokens,
# scripts/run_lora_finetune_block.sh's MAX_TRAIN_SAMPLES and BLOCK_SIZE), where the report
# extrapolates each curve to.
REFERENCE_TOKENS = 30_000 * 1024
# The first steps of a run (the Trainer's set-up, the allocator settling) are left out of its step times.
SPEED_WARMUP_STEPS = 2


def settings_of(args) -> dict:
    """What a recipe's numbers depend on besides the recipe: results are reused only when these match."""
    return {name: getattr(args, name) for name in ("checkpoint", "model", "dataset", "seqlen", "eval_windows",
                                                   "train_seqlen", "batch_size", "budgets", "sweep", "precision")}


def speed_settings(args) -> dict:
    """What a step's time depends on besides the recipe: speed.json is used only when these match."""
    return {name: getattr(args, name) for name in ("checkpoint", "model", "train_seqlen", "batch_size", "precision")}


def recipe_settings(args, name: str) -> dict:
    """settings_of(args) and what the recipe trains, at which base rate: a recipe's result is
    reused only while its definition stays the same."""
    return settings_of(args) | {"recipe": {k: v for k, v in RECOVERY_RECIPES[name].items() if k != "about"}}


def one_shot_checkpoint(args) -> Path:
    """The checkpoint every recipe starts from: --checkpoint, or the demo's pruning of
    --model, done once and saved in OUT/one_shot."""
    from ..integration.checkpoint import is_sparse_checkpoint, save_sparse_pretrained

    if args.checkpoint:
        return Path(args.checkpoint)
    path = args.out / "one_shot"
    if is_sparse_checkpoint(path):
        return path
    from ..families import family_of
    from ..integration.data import calibration_samples
    from ..integration.model import load_model
    from ..integration.recipes import DEMO_ROW_GROUP, prune_recipe
    from ..prune import prune_model

    model, tokenizer = load_model(args.model)
    print(f"pruning {args.model!r} to {args.sparsity:.0%} with the demo's recipe (once; saved in {path})")
    start = time.perf_counter()
    report = prune_model(model, calibration_samples(tokenizer, args.dataset, 16, args.seqlen),
                         sparsity=args.sparsity, row_group=DEMO_ROW_GROUP, **prune_recipe(family_of(model)))
    report.update(model=args.model, prune_seconds=round(time.perf_counter() - start, 1))
    save_sparse_pretrained(model, tokenizer, path, report=report)
    return path


def _eval_sets(tokens: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """(reported windows from the start of the eval text, validation windows from its end)."""
    need = (args.eval_windows + VALIDATION_WINDOWS) * args.seqlen
    if tokens.shape[1] < need:
        raise SystemExit(f"the eval text has {tokens.shape[1]} tokens; {args.eval_windows} reported and "
                         f"{VALIDATION_WINDOWS} validation windows of {args.seqlen} need {need}")
    return tokens[:, :args.eval_windows * args.seqlen], tokens[:, -VALIDATION_WINDOWS * args.seqlen:]


def train_curve(recipe: str, lr: float, start: Path, teacher, windows: torch.Tensor, budgets: list[int],
                args, folder: Path) -> list[dict]:
    """Train `recipe` at `lr` from `start` at a constant rate after warm-up; perplexity on
    `windows` at each budget of tokens."""
    from transformers import TrainerCallback

    from ..integration.checkpoint import hidden_channel_order
    from ..integration.evaluate import perplexity
    from ..integration.model import load_model
    from ..integration.recipes import recover
    from ..integration.train import own_forward

    model, tokenizer = load_model(str(start))
    tokens_per_step = args.batch_size * args.train_seqlen
    points, started = [], time.perf_counter()
    train_seconds = [0.0]

    class EvaluateAtBudgets(TrainerCallback):
        def __init__(self):
            self.pending = list(budgets)
            self.clock = time.perf_counter()

        def on_step_end(self, args_, state, control, model=None, **kwargs):
            seen = state.global_step * tokens_per_step
            if not self.pending or seen < self.pending[0]:
                return
            train_seconds[0] += time.perf_counter() - self.clock
            self.pending.pop(0)
            was_training = model.training
            with own_forward(model):  # scored in the model's own dtype, as the one-shot baseline
                result = perplexity(model, windows, args.seqlen)
            model.train(was_training)
            points.append({"tokens": seen, "ppl": result["ppl"], "train_s": round(train_seconds[0], 1)})
            print(f"  {seen} tokens: perplexity {result['ppl']:.2f} ({train_seconds[0] / 60:.1f} min of training)")
            self.clock = time.perf_counter()

    recover(model, tokenizer, args.dataset, folder / "run", recipe, math.ceil(budgets[-1] / tokens_per_step),
            args.batch_size, args.train_seqlen, lr, teacher=teacher, hidden_order=hidden_channel_order(start),
            lr_scheduler_type="constant_with_warmup", callbacks=[EvaluateAtBudgets()], progress=False,
            precision=args.precision)
    print(f"  done in {(time.perf_counter() - started) / 60:.1f} min")
    return points


def start_and_teacher(args) -> tuple[Path, str, object, object]:
    """(the one-shot checkpoint, the teacher's name, the teacher, the tokenizer): the teacher is
    the dense model the checkpoint records, else --model; loaded once for the curves and the
    speed measurement."""
    from ..integration.checkpoint import pruned_from
    from ..integration.model import load_model

    start = one_shot_checkpoint(args)
    teacher_name = pruned_from(start) or args.model
    teacher, tokenizer = load_model(teacher_name)
    return start, teacher_name, teacher, tokenizer


def measure_speed(args, start: Path, teacher, tokenizer) -> dict:
    """Seconds per training step of each of --recipes, from the one-shot checkpoint, in one
    process: `--speed-rounds` rounds that run every recipe for `--speed-steps` steps in turn
    (a slow moment of the machine hits them all); per run the median of its step times after
    SPEED_WARMUP_STEPS, per recipe the median over rounds. Written to OUT/speed.json."""
    from transformers import TrainerCallback

    from ..integration.checkpoint import hidden_channel_order
    from ..integration.model import load_model
    from ..integration.recipes import recover

    hidden_order = hidden_channel_order(start)
    runs: dict[str, list[float]] = {name: [] for name in args.recipe_list}

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args_, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    print(f"\n== speed: {args.speed_rounds} rounds of {args.speed_steps} steps per recipe, interleaved")
    for round_ in range(args.speed_rounds):
        for name in args.recipe_list:
            model, _ = load_model(str(start))
            times = StepTimes()
            recover(model, tokenizer, args.dataset, args.out / "speed_run", name, args.speed_steps, args.batch_size,
                    args.train_seqlen, teacher=teacher, hidden_order=hidden_order, callbacks=[times], progress=False, precision=args.precision)
            steps = [b - a for a, b in zip(times.ends[SPEED_WARMUP_STEPS - 1:], times.ends[SPEED_WARMUP_STEPS:])]
            runs[name].append(statistics.median(steps))
            print(f"  round {round_ + 1}, {name}: {runs[name][-1]:.3f} s per step")
    speed = {"s_per_step": {name: statistics.median(t) for name, t in runs.items()}, "runs": runs,
             "steps": args.speed_steps, "rounds": args.speed_rounds,
             "tokens_per_step": args.batch_size * args.train_seqlen, "settings": speed_settings(args),
             "environment": common.environment(torch.device("cpu"))}
    common.write_json(args.out / "speed.json", speed)
    return speed


def read_speed(args) -> dict | None:
    """OUT/speed.json if it was measured with these settings (`speed_settings`), else None."""
    path = args.out / "speed.json"
    if not path.is_file():
        return None
    speed = json.loads(path.read_text())
    return speed if speed.get("settings") == speed_settings(args) else None


def run_recipes(args, start: Path, teacher_name: str, teacher, tokenizer) -> None:
    from ..integration.data import eval_tokens
    from ..integration.evaluate import perplexity
    from ..integration.model import load_model

    settings = settings_of(args)
    reported, validation = _eval_sets(eval_tokens(tokenizer, args.dataset), args)
    baseline = args.out / "baseline.json"
    if _read(baseline, settings) is None:
        one_shot, _ = load_model(str(start))
        common.write_json(baseline, {"dense": perplexity(teacher, reported, args.seqlen)["ppl"],
                                     "one_shot": perplexity(one_shot, reported, args.seqlen)["ppl"],
                                     "windows": args.eval_windows, "teacher": teacher_name, "settings": settings})
    for name in args.recipe_list:
        folder = args.out / name
        result_file = folder / "result.json"
        if _read(result_file, recipe_settings(args, name)) is not None:
            print(f"{name}: done earlier with the same settings, skipped")
            continue
        recipe = RECOVERY_RECIPES[name]
        print(f"\n== {name}: {recipe['about']}")
        sweep = []
        if len(args.sweep_list) > 1:
            for factor in args.sweep_list:
                lr = recipe["lr"] * factor
                print(f" sweep: lr {lr:g} for {args.budget_list[0]} tokens")
                point = train_curve(name, lr, start, teacher, validation, args.budget_list[:1], args,
                                    folder / f"sweep_{factor:g}")[-1]
                sweep.append({"lr": lr, "validation_ppl": point["ppl"]})
        lr = min(sweep, key=lambda s: s["validation_ppl"])["lr"] if sweep else recipe["lr"] * args.sweep_list[0]
        print(f" curve: lr {lr:g}")
        points = train_curve(name, lr, start, teacher, reported, args.budget_list, args, folder)
        common.write_json(result_file, {"recipe": name, "about": recipe["about"], "lr": lr, "sweep": sweep,
                                        "points": points, "settings": recipe_settings(args, name)})


def power_law(points: list[dict], dense: float) -> tuple[float, float]:
    """(a, b) of ln(ppl / dense) = a * tokens^-b: the log-perplexity gap as a power law of the
    training tokens, least squares in log-log over a curve's points (>= 2, above dense)."""
    if len(points) < 2 or any(p["ppl"] <= dense for p in points):
        raise ValueError(f"a power law needs >= 2 points above dense {dense}, got "
                         f"{[round(p['ppl'], 2) for p in points]}")
    intercept, slope = common.fit_line([math.log(p["tokens"]) for p in points],
                                       [math.log(math.log(p["ppl"] / dense)) for p in points])
    return math.exp(intercept), -slope


def ratio_after(a: float, b: float, tokens: float) -> float:
    """Perplexity over dense after `tokens` by the power law (a, b)."""
    return math.exp(a * tokens ** -b)


def tokens_for(a: float, b: float, ratio: float) -> float:
    """Training tokens after which the power law (a, b) reaches `ratio` x dense (inf if it never does)."""
    return (a / math.log(ratio)) ** (1.0 / b) if b > 0 else math.inf


def projection_table(results: list[dict], dense: float) -> str:
    """Each curve's power-law fit, extrapolated: the ratio at REFERENCE_TOKENS and the tokens to
    3x and 1.5x dense (a projection beyond the measured points, marked so). Curves with fewer
    than two points, or one at or below dense, have no row."""
    rows = []
    for r in results:
        if len(r["points"]) < 2 or any(p["ppl"] <= dense for p in r["points"]):
            continue  # no gap to fit
        a, b = power_law(r["points"], dense)
        worst = max(abs(ratio_after(a, b, p["tokens"]) * dense / p["ppl"] - 1) for p in r["points"])
        rows.append([r["recipe"], f"{-b:.3f}", f"{worst:.1%}", f"{ratio_after(a, b, REFERENCE_TOKENS):.2f}x",
                     f"{tokens_for(a, b, 3.0):.1e}", f"{tokens_for(a, b, 1.5):.1e}"])
    if not rows:
        return ""
    return common.markdown_table(["recipe", "exponent", "fit's largest error", f"x dense at {REFERENCE_TOKENS:,} "
                                  "tokens (projected)", "tokens to 3x (projected)", "tokens to 1.5x (projected)"],
                                 rows)


# What results written before a setting existed ran with: fp32 before --precision, and LoRA
# dropout 0.05 (the finetune default) before recipes carried their own.
PRECISION_BEFORE = "fp32"
LORA_DROPOUT_BEFORE = 0.05


def _read(path: Path, settings: dict) -> dict | None:
    if path.is_file():
        found = json.loads(path.read_text())
        then = {"precision": PRECISION_BEFORE, **found.get("settings", {})}
        lora = then.get("recipe", {}).get("lora")
        if lora is not None and "dropout" not in lora:
            then["recipe"] = {**then["recipe"], "lora": {**lora, "dropout": LORA_DROPOUT_BEFORE}}
        if then == settings:
            return found
    return None


def write_report(args) -> None:
    """recovery.md (the table) and recovery.png (perplexity against training tokens and minutes)."""
    settings = settings_of(args)
    base = _read(args.out / "baseline.json", settings)
    results = [r for r in (_read(args.out / name / "result.json", recipe_settings(args, name))
                           for name in RECOVERY_RECIPES) if r]
    if base is None or not results:
        raise SystemExit(f"no results in {args.out} for these settings: run the recipes first")
    budgets = sorted({p["tokens"] for r in results for p in r["points"]})
    speed = read_speed(args)
    if speed is not None and not all(r["recipe"] in speed["s_per_step"] for r in results):
        missing = [r["recipe"] for r in results if r["recipe"] not in speed["s_per_step"]]
        print(f"speed.json lacks {', '.join(missing)}: tokens/s and minutes from each curve's own run")
        speed = None
    # Seconds of training to each point: the interleaved measurement's, else the curve's own.
    seconds = ({r["recipe"]: [p["tokens"] / speed["tokens_per_step"] * speed["s_per_step"][r["recipe"]]
                              for p in r["points"]] for r in results} if speed is not None else
               {r["recipe"]: [p["train_s"] for p in r["points"]] for r in results})
    timing = "interleaved" if speed is not None else "this run"
    header = (["recipe", "lr"] + [f"{b // 1000}k tokens" for b in budgets]
              + [f"tokens/s ({timing})", f"CPU min ({timing})"])
    rows = []
    for r in results:
        at = {p["tokens"]: p["ppl"] for p in r["points"]}
        rows.append([r["recipe"], f"{r['lr']:g}"] + [f"{at[b]:.1f}" if b in at else "" for b in budgets]
                    + [f"{r['points'][-1]['tokens'] / max(seconds[r['recipe']][-1], 1e-9):.0f}",
                       f"{seconds[r['recipe']][-1] / 60:.1f}"])
    env = common.environment(torch.device("cpu"))
    how = ("each curve's own wall time (runs at different times; not comparable where the machine's speed "
           "drifts: `--speed`)" if speed is None else
           f"from `--speed`: every recipe's steps timed in one process, {speed['rounds']} interleaved rounds of "
           f"{speed['steps']} steps, medians")
    lines = [f"Dense {base['dense']:.2f}, one-shot {base['one_shot']:.2f} ({base['windows']} held-out windows of "
             f"{args.seqlen} tokens); {args.batch_size} x {args.train_seqlen} tokens per step, "
             f"{'bf16 autocast' if args.precision == 'bf16' else 'fp32'}; "
             f"{env.get('device_name', 'CPU')}, torch {env.get('torch', '?')}. Tokens/s and minutes: {how}.", "",
             common.markdown_table(header, rows), ""] + [f"- `{r['recipe']}`: {RECOVERY_RECIPES[r['recipe']]['about']}"
                                                      for r in results]
    fits = projection_table(results, base["dense"])
    if fits:
        lines += ["", "A power law of the log-perplexity gap in tokens, ln(ppl / dense) = a tokens^-b, fitted to "
                  "each curve's points (least squares in log-log) and extrapolated: a projection, not a "
                  "measurement.", "", fits]
    (args.out / "recovery.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    def draw(fig, axes):
        # Left: per training token; right: per minute of training (the cost a recipe's
        # teacher pass or extra parameters add), which is what chooses the demo's recipe.
        minutes_label = ("minutes of training (interleaved speed measurement)" if speed is not None
                         else "minutes of training (each curve's own run)")
        for ax, per_minute, label in ((axes[0][0], False, "training tokens"), (axes[0][1], True, minutes_label)):
            xs = {r["recipe"]: ([s / 60 for s in seconds[r["recipe"]]] if per_minute
                                else [p["tokens"] for p in r["points"]]) for r in results}
            for r in results:
                ax.plot([0] + xs[r["recipe"]], [base["one_shot"]] + [p["ppl"] for p in r["points"]], marker="o",
                        label=r["recipe"])
            ax.axhline(base["dense"], color="gray", linestyle="--", label=f"dense {base['dense']:.1f}")
            first = min(x for v in xs.values() for x in v)
            ax.set_xscale("symlog", linthresh=max(first, 1e-3))
            ax.set_xlim(left=0)  # no negative decades in the margin
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("held-out perplexity")
        axes[0][0].legend(fontsize=8)

    common.plot(args.out / "recovery.png", draw, ncols=2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/recovery"))
    parser.add_argument("--checkpoint", default=None,
                        help="the one-shot sparse checkpoint (default: prune --model with the demo's recipe)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--dataset", default="default")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--recipes", default=DEFAULT_RECIPES, help=f"comma-separated, of {', '.join(RECOVERY_RECIPES)}")
    parser.add_argument("--budgets", default="10000,40000,160000", help="training tokens at which to evaluate")
    parser.add_argument("--sweep", default="0.3,1,3",
                        help="learning-rate multiples tried at the first budget (one value: no sweep)")
    parser.add_argument("--seqlen", type=int, default=512, help="eval window")
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--train-seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="what training computes in: fp32, or bf16 autocast (weights and optimizer fp32; "
                             "the demo's on CPUs with native bf16)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the table and plot from the results")
    parser.add_argument("--speed", action="store_true",
                        help="time every recipe of --recipes in one process, interleaved, for the table's tokens/s "
                             "and minutes and the per-minute plot (with --report-only: no curves are trained)")
    parser.add_argument("--speed-steps", type=int, default=16, help="steps per timed run (default: %(default)s)")
    parser.add_argument("--speed-rounds", type=int, default=3, help="runs per recipe (default: %(default)s)")
    return parser


def resolve_defaults(args) -> None:
    unknown = [r for r in (p.strip() for p in args.recipes.split(",")) if r and r not in RECOVERY_RECIPES]
    if unknown:
        raise SystemExit(f"--recipes: unknown {', '.join(unknown)}; expected some of {', '.join(RECOVERY_RECIPES)}")
    args.recipe_list = [r.strip() for r in args.recipes.split(",") if r.strip()]
    try:
        args.budget_list = sorted(int(b) for b in args.budgets.split(",") if b.strip())
        args.sweep_list = [float(f) for f in args.sweep.split(",") if f.strip()]
    except ValueError:
        raise SystemExit(f"--budgets and --sweep are comma-separated numbers, got {args.budgets!r} / "
                         f"{args.sweep!r}") from None
    if not args.budget_list or args.budget_list[0] < 1 or not args.sweep_list or min(args.sweep_list) <= 0:
        raise SystemExit("--budgets must be positive token counts and --sweep positive multiples")
    if args.speed_steps <= SPEED_WARMUP_STEPS or args.speed_rounds < 1:
        raise SystemExit(f"--speed-steps must be > {SPEED_WARMUP_STEPS} (the first are left out) and "
                         f"--speed-rounds >= 1, got {args.speed_steps} and {args.speed_rounds}")
    for name in ("seqlen", "eval_windows", "train_seqlen", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def run(args) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only or args.speed:
        start, teacher_name, teacher, tokenizer = start_and_teacher(args)
        if not args.report_only:
            run_recipes(args, start, teacher_name, teacher, tokenizer)
        if args.speed:
            measure_speed(args, start, teacher, tokenizer)
    write_report(args)
    return args.out


def main(argv=None) -> int:
    return common.main(build_parser, resolve_defaults, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
