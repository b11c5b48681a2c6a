"""`kbi`: fine-tune, evaluate, generate, list models and run the demo from the command line.

    kbi demo --out runs/demo                      # the main job: MiniLM on Fine Food reviews
    kbi finetune recipes/classify_fine_foods.toml --out runs/cls --set train.epochs=3
    kbi finetune recipes/classify_fine_foods.toml --out runs/cls --strategy mirrored   # all local GPUs
    KERAS_BACKEND=jax kbi finetune recipes/classify_fine_foods.toml --out runs/cls --strategy model-parallel
    kbi evaluate runs/cls --control 1 --control 0
    kbi generate smollm2-135m --adapter runs/lm/adapter --prompt "This tea" --control 1
    kbi loop runs/loop --target 0.8 --turns 20         # closed loop: the model's own readings set its control
    kbi export runs/cls --out serving --name reviews       # serving/reviews/1, for TF Serving
    kbi serve serving/reviews --port 8501              # TF Serving's REST API with sessions (cli/serving.py)
    kbi models
"""

import argparse
import ast
import linecache
import os
import sys
from pathlib import Path

from keras_biasinject.cli.serving import add_serving_commands, parse_control
from keras_biasinject.distribute.strategy import STRATEGIES

# The commands import what they use when they run (recipes, export, serving pull in keras_hub and
# starlette): `kbi --help` and argument errors stay fast.
RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes" / "files"  # -> the top-level recipes/
DEMO_RECIPE = "classify_fine_foods"


MAX_SET_CHARS = 1000  # a --set value longer than this is refused (under Python's cap of 4,300 digits on ints)


def _value(key, text):
    """A `--set` value: a Python/TOML-like literal (3, 1e-4, "x", [1, 2], true) or a bare string.
    An empty value and a value over MAX_SET_CHARS raise ValueError."""
    lowered = {"true": True, "false": False, "none": None, "null": None}
    if not text:
        raise ValueError(f"--set {key}= has no value. Give one (e.g. {key}=3), or '' for an empty string.")
    if len(text) > MAX_SET_CHARS:
        raise ValueError(f"--set {key}: the value has {len(text):,} characters; at most {MAX_SET_CHARS:,} are read. "
                         "Put long values in the recipe file.")
    if text.lower() in lowered:
        return lowered[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _overrides(pairs):
    out = []
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set takes KEY=VALUE (e.g. train.epochs=3). Got {pair[:80]!r}.")
        out.append((key.strip(), _value(key.strip(), value.strip())))
    return out


def _recipe_path(name):
    path = Path(name)
    if path.is_file():
        return path
    builtin = RECIPE_DIR / f"{name}.toml"
    if builtin.is_file():
        return builtin
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.toml")) if RECIPE_DIR.is_dir() else []
    raise FileNotFoundError(f"no recipe file {name!r}. Give a .toml/.yaml path or a built-in recipe: {names}.")


def _print_table(report):
    from keras_biasinject.recipes.report import results_table

    print(results_table(report))


def cmd_finetune(args):
    from keras_biasinject.recipes import finetune, load_recipe

    overrides = _overrides(args.set)
    if args.methods:
        overrides.append(("train.methods", args.methods.split(",")))
    recipe = load_recipe(_recipe_path(args.recipe), overrides)
    report = finetune(recipe, args.out, verbose=1 if sys.stdout.isatty() else 2, strategy=args.strategy)
    _print_table(report)
    print(f"\nreport: {Path(args.out) / 'report.json'}")


def cmd_demo(args):
    args.recipe = DEMO_RECIPE
    if args.full:
        args.set = list(args.set or []) + ["train.methods=['base','keras_lora','full','bias_injection']"]
    cmd_finetune(args)


def cmd_evaluate(args):
    from keras_biasinject.recipes.evaluate import evaluate_run

    controls = [None if c.strip().lower() == "neutral" else parse_control(c) for c in args.control or ["1", "neutral"]]
    if any(isinstance(c, str) for c in controls):
        raise ValueError(f"evaluate: --control takes numbers (comma-separated for several dimensions) or 'neutral'. Got {args.control}.")
    for row in evaluate_run(args.run, controls=controls):
        print(f"control {row['control']}: {row['metric']} {row['value']:.4f}")


def cmd_generate(args):
    from keras_biasinject.recipes.generate import generate

    control = parse_control(args.control)
    for text in generate(args.model, args.prompt, adapter=args.adapter, control=control, max_length=args.max_length):
        print(text)


def cmd_loop(args):
    from keras_biasinject.recipes.loop_session import review_prompts, run_loop, write_trace
    from keras_biasinject.recipes.run_folder import load_run_model

    target = None if args.target is None else parse_control(args.target)
    if isinstance(target, str):
        raise ValueError(f"loop: --target takes numbers (comma-separated for several readings). Got {args.target!r}.")
    for name in ("turns", "prompts"):
        if getattr(args, name) < 1:
            raise ValueError(f"loop: --{name} must be at least 1. Got {getattr(args, name)}.")
    recipe, lm = load_run_model(args.run)
    if lm.feedback_head is None:
        raise ValueError(f"loop: the run {args.run!r} has no feedback head. Train one: add method 'feedback_head' and a "
                         "[feedback] table to the recipe (see recipes/loop_reviews_lm.toml) and run `kbi finetune` again.")
    lm.compile(sampler="greedy")
    trace = run_loop(lm, review_prompts(recipe, args.prompts), args.turns, target=target, half_life=args.half_life,
                     gain=args.gain, max_norm=args.max_norm, max_length=args.max_length)
    for row in trace:
        print(f"turn {row['turn']:3d}  control {row['control'][0]:+.3f}  reading {row['reading'][0]:.3f}  {row['texts'][0]!r}")
    print(f"trace: {write_trace(trace, args.out, None if target is None else target.tolist())} (and .png)")


def cmd_models(args):
    from keras_biasinject.models import available_models

    for row in available_models():
        state = "ready" if row["cached"] else ("installed, converts on first load" if row["installed"] else "not installed")
        print(f"{row['name']:<14} {state:<34} {row['description']}")
        if not row["installed"]:
            print(f"{'':<14} install: {row['install']}")
    print("\nAlso: any KerasHub preset name (needs network), a local Hugging Face folder, or a Llama .gguf file.")


def _run_options(p):
    p.add_argument("--out", required=True, help="run folder: report.json, plots, logs, checkpoints, adapter")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. train.epochs=3 (repeatable)")
    p.add_argument("--methods", help="comma-separated methods to run, e.g. base,bias_injection")
    p.add_argument("--strategy", choices=list(STRATEGIES), default="default",
                   help="devices to train on: one (default), all local GPUs (mirrored), every worker in $TF_CONFIG "
                        "(multi-worker; run the same command on each), a TPU ($TPU_NAME), or, with KERAS_BACKEND=jax, "
                        "every device as a (batch, model) mesh with weights sharded over 2 of them (model-parallel; "
                        "CPU: XLA_FLAGS=--xla_force_host_platform_device_count=4). train.batch_size is the global batch")


def _add_training_commands(sub):
    p = sub.add_parser("finetune", help="run a recipe: bias injection against the control groups")
    p.add_argument("recipe", help="a recipe file (.toml/.yaml) or a built-in recipe name")
    _run_options(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("demo", help="the main job: MiniLM on Fine Food reviews, bias injection against the control groups")
    _run_options(p)
    p.add_argument("--full", action="store_true", help="also run full fine-tuning (slow)")
    p.set_defaults(func=cmd_demo)


def _add_model_commands(sub):
    p = sub.add_parser("evaluate", help="evaluate a finished run's adapter at one or more controls")
    p.add_argument("run", help="a run folder written by `kbi finetune` / `kbi demo`")
    p.add_argument("--control", action="append",
                   help="control value: a number, comma-separated numbers, or 'neutral' (repeatable; default: 1 and neutral)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("generate", help="generate text from a causal LM, optionally with an adapter and a control")
    p.add_argument("model", help="a built-in name, .gguf file, Hugging Face folder or KerasHub preset")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument("--adapter", help="an adapter folder written by save_adapter (e.g. RUN/adapter)")
    p.add_argument("--control", help="a number, comma-separated numbers, or a named control stored with the adapter")
    p.add_argument("--max-length", type=int, default=64, help="total tokens, prompt included (default 64)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("loop", help="run a closed-loop session on a run with a feedback head: its readings set the control")
    p.add_argument("run", help="a run folder whose recipe trained method 'feedback_head' (recipes/loop_reviews_lm.toml)")
    p.add_argument("--target", help="the reading to steer toward, e.g. 0.8 (feedback = target - reading); "
                                    "default: feedback = the reading itself")
    p.add_argument("--turns", type=int, default=20, help="turns (default 20); turn t happens at time t")
    p.add_argument("--prompts", type=int, default=8, help="held-out review openings continued every turn (default 8)")
    p.add_argument("--half-life", type=float, default=20.0, help="in turns (default 20)")
    p.add_argument("--gain", type=float, default=2.0, help="feedback to control (default 2)")
    p.add_argument("--max-norm", type=float, default=1.5, help="bound on the control's distance from neutral (default 1.5)")
    p.add_argument("--max-length", type=int, default=40, help="total tokens per text, prompt included (default 40)")
    p.add_argument("--out", default="loop_trace.json", help="the trace (JSON; the plot goes beside it as .png)")
    p.set_defaults(func=cmd_loop)


def _add_other_commands(sub):
    p = sub.add_parser("models", help="list the models that can be loaded here")
    p.set_defaults(func=cmd_models)


def build_parser():
    parser = argparse.ArgumentParser(prog="kbi", description="Steer and fine-tune pretrained KerasHub transformers with bias injection.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_training_commands(sub)
    _add_model_commands(sub)
    add_serving_commands(sub)
    _add_other_commands(sub)
    return parser


def _user_error(command, error):
    """Prints `kbi COMMAND: error: ...` on one line (at most 2,000 characters) and returns exit code 2."""
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in message:
        message = f"{message}: {error.filename!r}"
    if len(message) > 2000:
        message = message[:2000] + " ..."
    print(f"kbi {command}: error: {message}", file=sys.stderr)
    return 2


def _raised_by_us(error):
    """True when a `raise TypeError(...)` of keras_biasinject raised it: one of our checks. A TypeError
    that Python or a library raised (`None` where a list belongs, deep in a call) is a bug, not a user error."""
    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    ours = f"{os.sep}keras_biasinject{os.sep}" in filename
    return ours and linecache.getline(filename, tb.tb_lineno).strip().startswith("raise ")


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as error:  # bad input: a value, a file, a folder, a connection
        return _user_error(args.command, error)
    except TypeError as error:
        if not _raised_by_us(error):
            raise  # a TypeError from inside a library is a bug: keep its traceback
        return _user_error(args.command, error)
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        hint = f" Run the same command again to resume from {out}." if out else ""
        print(f"\nkbi {args.command}: interrupted.{hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
