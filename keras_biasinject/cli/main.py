"""`kbi`: fine-tune, evaluate, generate, list models and run the demo from the command line.

    kbi demo --out runs/demo                      # the main job: MiniLM on Fine Food reviews
    kbi finetune recipes/classify_fine_foods.toml --out runs/cls --set train.epochs=3
    kbi finetune recipes/classify_fine_foods.toml --out runs/cls --strategy mirrored   # all local GPUs
    kbi evaluate runs/cls --control 1 --control 0
    kbi generate smollm2-135m --adapter runs/lm/adapter --prompt "This tea" --control 1
    kbi loop runs/loop --target 0.8 --turns 20         # closed loop: the model's own readings set its control
    kbi export runs/cls --out serving --name reviews       # serving/reviews/1, for TF Serving
    kbi models
"""

import argparse
import ast
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from keras_biasinject.distribute.strategy import STRATEGIES
from keras_biasinject.layers import DecayFeedback

# The commands import what they use when they run (recipes, export, serving pull in keras_hub and
# starlette): `kbi --help` and argument errors stay fast.
RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes" / "files"  # -> the top-level recipes/
DEMO_RECIPE = "classify_fine_foods"


def _value(text):
    """A `--set` value: a Python/TOML-like literal (3, 1e-4, "x", [1, 2], true) or a bare string."""
    lowered = {"true": True, "false": False, "none": None, "null": None}
    if text.lower() in lowered:
        return lowered[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _overrides(pairs):
    out = []
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"kbi: --set takes KEY=VALUE (e.g. train.epochs=3). Got {pair!r}.")
        out.append((key.strip(), _value(value.strip())))
    return out


def parse_control(text):
    """"1" -> [1.0]; "1,-0.5" -> [1.0, -0.5]; anything else is a stored control name."""
    if text is None:
        return None
    try:
        return np.asarray([float(v) for v in str(text).split(",")], "float32")
    except ValueError:
        return str(text)


def _recipe_path(name):
    path = Path(name)
    if path.is_file():
        return path
    builtin = RECIPE_DIR / f"{name}.toml"
    if builtin.is_file():
        return builtin
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.toml")) if RECIPE_DIR.is_dir() else []
    raise SystemExit(f"kbi: no recipe file {name!r}. Give a .toml/.yaml path or a built-in recipe: {names}.")


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


def cmd_export(args):
    from keras_biasinject.export import export_onnx, export_saved_model
    from keras_biasinject.recipes.run_folder import load_model_source

    model = load_model_source(args.source)
    control = parse_control(args.control)
    feedback = None
    if args.feedback_half_life is not None:
        head = getattr(model, "feedback_head", None)  # a loop feeds the head's readings to feedback_step
        feedback = DecayFeedback(control_dim=model.injection.config.control_dim, half_life=args.feedback_half_life,
                                 feedback_dim=None if head is None else head.feedback_dim, neutral=model.injection.config.neutral)
    path = export_saved_model(model, args.out, args.name, args.version, control=control, feedback=feedback, overwrite=args.overwrite)
    print(f"SavedModel: {path}")
    if args.onnx:
        print(f"ONNX: {export_onnx(model, args.onnx, control=control, overwrite=args.overwrite)}")


def cmd_serve(args):
    from keras_biasinject.serving.app import Limits, LoopSettings, serve

    try:
        target = None if args.loop_target is None else [float(v) for v in args.loop_target.split(",")]
    except ValueError:
        raise ValueError(f"serve: --loop-target takes numbers (comma-separated, one per feedback value). Got {args.loop_target!r}.") from None
    store = args.store or str(Path(args.export_dir) / "sessions.sqlite")
    print(f"serving {args.export_dir} on http://{args.host}:{args.port} (sessions: {store})", flush=True)
    serve(args.export_dir, store, host=args.host, port=args.port, source=args.source,
          limits=Limits(max_batch=args.max_batch, max_sequence=args.max_sequence, max_sessions=args.max_sessions),
          loop=LoopSettings(args.loop, target))


def cmd_adapt(args):
    body = {"examples": json.loads(Path(args.examples).read_text()), "steps": args.steps,
            "learning_rate": args.learning_rate, "max_loss_increase": args.max_loss_increase}
    if args.heldout:
        body["heldout"] = json.loads(Path(args.heldout).read_text())
    request = urllib.request.Request(f"{args.server.rstrip('/')}/v1/models/{args.name}:adapt", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=3600) as response:
            print(json.dumps(json.loads(response.read()), indent=2))
    except urllib.error.HTTPError as error:
        raise ValueError(json.loads(error.read()).get("error", str(error))) from None


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
                        "(multi-worker; run the same command on each), or a TPU ($TPU_NAME). "
                        "train.batch_size is the global batch")


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


def _add_serving_commands(sub):
    p = sub.add_parser("export", help="export a run (or a .keras model) as a SavedModel for TF Serving, optionally ONNX")
    p.add_argument("source", help="a run folder written by `kbi finetune`, or a .keras file")
    p.add_argument("--out", required=True, help="TF Serving's model base path; the export goes to OUT/NAME/VERSION")
    p.add_argument("--name", default="model", help="model name in TF Serving's URLs (default: model)")
    p.add_argument("--version", type=int, help="version number (default: one more than the highest there)")
    p.add_argument("--control", help="merge this control (numbers or a stored name) into the weights: no control input")
    p.add_argument("--feedback-half-life", type=float, help="add a feedback_step signature with this half-life")
    p.add_argument("--onnx", help="also write the serve signature as this ONNX file (needs the onnx extra)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing version / file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="serve an export over TF Serving's REST API, with decaying per-session feedback")
    p.add_argument("export_dir", help="BASE/NAME written by `kbi export` (the highest version is served)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8501, help="port (default 8501, as TF Serving's REST)")
    p.add_argument("--store", help="SQLite file for session state (default: EXPORT_DIR/sessions.sqlite)")
    p.add_argument("--source", help="the run folder or .keras file behind the export: enables :adapt (self-tuning)")
    p.add_argument("--max-batch", type=int, default=64, help="examples per predict request (default 64)")
    p.add_argument("--max-sequence", type=int, default=1024, help="tokens per example (default 1024)")
    p.add_argument("--max-sessions", type=int, default=100_000, help="sessions kept (default 100000)")
    p.add_argument("--loop", choices=["off", "self"], default="off",
                   help="self: a predict naming a session updates it from the model's own feedback-head reading "
                        "(requests override with \"loop\"; default off)")
    p.add_argument("--loop-target", help="steer the reading towards this (comma-separated numbers inside the head's "
                                         "range): feedback = target - reading; default: feedback = reading")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("adapt", help="ask a running `kbi serve --source` for guarded self-tuning on feedback examples")
    p.add_argument("server", help="the server's URL, e.g. http://127.0.0.1:8501")
    p.add_argument("--name", default="model", help="model name (default: model)")
    p.add_argument("--examples", required=True, help="JSON file: {input name: batch, ..., \"labels\": batch}")
    p.add_argument("--heldout", help="JSON file of the same form; required the first time, then kept by the server")
    p.add_argument("--steps", type=int, default=10, help="gradient steps (1..100, default 10)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="default 1e-3")
    p.add_argument("--max-loss-increase", type=float, default=0.0, help="allowed relative held-out loss increase (default 0)")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("models", help="list the models that can be loaded here")
    p.set_defaults(func=cmd_models)


def build_parser():
    parser = argparse.ArgumentParser(prog="kbi", description="Steer and fine-tune pretrained KerasHub transformers with bias injection.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_training_commands(sub)
    _add_model_commands(sub)
    _add_serving_commands(sub)
    return parser


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"kbi {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        hint = f" Run the same command again to resume from {out}." if out else ""
        print(f"\nkbi {args.command}: interrupted.{hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
