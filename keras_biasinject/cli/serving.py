"""`kbi export`, `kbi serve`, `kbi adapt`: the commands that publish and serve a model.

`parse_control` (a `--control` value) is shared with the model commands in main.py.
"""

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from keras_biasinject.layers import DecayFeedback


def parse_control(text):
    """"1" -> [1.0]; "1,-0.5" -> [1.0, -0.5]; anything else is a stored control name."""
    if text is None:
        return None
    try:
        return np.asarray([float(v) for v in str(text).split(",")], "float32")
    except ValueError:
        return str(text)


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



def add_serving_commands(sub):
    """Adds export, serve and adapt to `sub` (the subparsers of `kbi`)."""
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
