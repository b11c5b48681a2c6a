"""`kbi export`, `kbi serve`, `kbi adapt`: the commands that publish and serve a model.

`parse_control` (a `--control` value) is shared with the model commands in main.py.
"""

import argparse
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


def mix_control(model, control):
    """`a=0.7,b=0.3` (a `--control` naming adapters) -> `model.mix({"a": 0.7, "b": 0.3})`, the control that
    mixes a model's adapters; any other control as it is."""
    if not (isinstance(control, str) and "=" in control):
        return control
    if not hasattr(model, "mix"):
        raise ValueError(f"export: --control {control!r} mixes adapters by name, and this model has none (it was not injected).")
    weights = {}
    for part in control.split(","):
        name, _, value = part.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"export: --control {control!r}: a mix is name=weight pairs separated by commas, e.g. "
                             "a=0.7,b=0.3.") from None
    return model.mix(weights)


def cmd_export(args):
    from keras_biasinject.export import export_onnx, export_saved_model
    from keras_biasinject.recipes.run_folder import load_model_source

    model = load_model_source(args.source)
    control = mix_control(model, parse_control(args.control))
    feedback = None
    if args.feedback_half_life is not None:
        if not hasattr(model, "injection"):
            raise ValueError(f"export: --feedback-half-life gives sessions a decaying control, and {args.source!r} has no "
                             "control input (it was not injected). Export it without --feedback-half-life.")
        head = getattr(model, "feedback_head", None)  # a loop feeds the head's readings to feedback_step
        feedback = DecayFeedback(control_dim=model.injection.config.control_dim, half_life=args.feedback_half_life,
                                 feedback_dim=None if head is None else head.feedback_dim, neutral=model.injection.config.neutral)
    path = export_saved_model(model, args.out, args.name, args.version, control=control, feedback=feedback, overwrite=args.overwrite)
    print(f"SavedModel: {path}")
    if args.onnx:
        print(f"ONNX: {export_onnx(model, args.onnx, control=control, overwrite=args.overwrite)}")


def read_token(path):
    """The bearer token in file `path` (stripped); ValueError if it is empty or not printable ASCII
    (HTTP headers arrive as latin-1, so a non-ASCII token could never match)."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        token = "\ufffd"
    except OSError as error:
        raise ValueError(f"--token-file {path!r}: cannot read it ({error.strerror or error}); give a file holding the token.") from None
    if not token:
        raise ValueError(f"--token-file {path!r} is empty; write a long random token into it (e.g. `openssl rand -hex 32`).")
    if not (token.isascii() and token.isprintable()):
        raise ValueError(f"--token-file {path!r} holds characters other than printable ASCII, which an HTTP header cannot "
                         "carry; write a token of ASCII letters and digits (e.g. `openssl rand -hex 32`).")
    return token


def read_json_file(path, flag):
    """The JSON in file `path` (given as `flag`); ValueError naming both if it is not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"{flag} {path!r}: cannot read it ({error.strerror or error}); give a JSON file.") from None
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{flag} {path!r} is not valid JSON: {str(error)[:200]}") from None


def serving_policy(args):
    """The `AdaptPolicy` of `kbi serve`'s flags, checked (ValueError) before anything starts."""
    from keras_biasinject.serving.rest import AdaptPolicy

    if args.allow_adapt and not args.source:
        raise ValueError("serve --allow-adapt needs --source RUN_OR_KERAS: the Keras model :adapt trains.")
    if args.allow_adapt and not args.adapt_heldout:
        raise ValueError("serve --allow-adapt needs --adapt-heldout FILE.json: the held-out set is the server's.")
    if args.source and not Path(args.source).exists():
        raise ValueError(f"serve --source {args.source!r} does not exist; give the run folder or .keras file behind the export.")
    heldout = read_json_file(args.adapt_heldout, "--adapt-heldout") if args.allow_adapt else None
    return AdaptPolicy(enabled=args.allow_adapt, heldout=heldout, max_loss_increase=args.adapt_max_loss_increase,
                       max_steps=args.adapt_max_steps, max_learning_rate=args.adapt_max_learning_rate,
                       keep_versions=args.keep_versions)


def cmd_serve(args):
    from keras_biasinject.serving.app import Limits, LoopSettings, is_loopback, serve
    from keras_biasinject.serving.batching import check_batching
    from keras_biasinject.serving.store import masked

    try:
        target = None if args.loop_target is None else [float(v) for v in args.loop_target.split(",")]
    except ValueError:
        raise ValueError(f"serve: --loop-target takes numbers (comma-separated, one per feedback value). Got {args.loop_target!r}.") from None
    token = None if args.token_file is None else read_token(args.token_file)
    if token is None and not is_loopback(args.host):
        raise ValueError(f"serve: --host {args.host} reaches beyond this machine; pass --token-file FILE so that only "
                         "holders of the token can change state (or bind 127.0.0.1).")
    if not Path(args.export_dir).is_dir():
        raise ValueError(f"serve: {args.export_dir!r} is not a folder; give BASE/NAME written by `kbi export ... --out BASE --name NAME`.")
    store = args.store or str(Path(args.export_dir) / "sessions.sqlite")
    if "://" not in store and not Path(store).parent.is_dir():
        raise ValueError(f"serve: --store {store!r}: folder {str(Path(store).parent)!r} does not exist; create it first.")
    limits = Limits(max_batch=args.max_batch, max_sequence=args.max_sequence, max_sessions=args.max_sessions,
                    max_clock_skew=args.max_clock_skew, session_ttl=args.session_ttl)  # each checked (ValueError)
    policy = serving_policy(args)
    batching = (args.batch_max_size, args.batch_wait_ms / 1000.0) if args.batching else None
    if batching is not None:
        check_batching(*batching)  # before the server says it is serving
    print(f"serving {args.export_dir} on http://{args.host}:{args.port} (sessions: {masked(store)})", flush=True)
    serve(args.export_dir, store, host=args.host, port=args.port, source=args.source, limits=limits,
          loop=LoopSettings(args.loop, target), policy=policy, token=token, batching=batching)


def cmd_adapt(args):
    if args.heldout is not None or args.max_loss_increase is not None:
        raise ValueError("adapt: --heldout and --max-loss-increase are the server's now (kbi serve --adapt-heldout, "
                         "--adapt-max-loss-increase); leave them out.")
    body = {"examples": read_json_file(args.examples, "--examples"), "steps": args.steps, "learning_rate": args.learning_rate}
    headers = {"Content-Type": "application/json"}
    if args.token_file:
        headers["Authorization"] = f"Bearer {read_token(args.token_file)}"
    url = f"{args.server.rstrip('/')}/v1/models/{args.name}:adapt"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=3600) as response:
            print(json.dumps(json.loads(response.read()), indent=2))
    except urllib.error.HTTPError as error:
        raise ValueError(f"{error.code}: {error_text(error)}") from None
    except (urllib.error.URLError, OSError) as error:  # refused, unreachable, reset
        reason = getattr(error, "reason", error)
        raise ValueError(f"adapt: cannot reach {url}: {reason}. Is `kbi serve` running there?") from None


def error_text(error):
    """The `error` message of an HTTP error's JSON body, or its reason."""
    try:
        return json.loads(error.read()).get("error", str(error))
    except (ValueError, AttributeError, OSError):
        return str(error)


def add_serving_commands(sub):
    """Adds export, serve and adapt to `sub` (the subparsers of `kbi`)."""
    p = sub.add_parser("export", help="export a run (or a .keras model) as a SavedModel for TF Serving, optionally ONNX")
    p.add_argument("source", help="a run folder written by `kbi finetune`, or a .keras file")
    p.add_argument("--out", required=True, help="TF Serving's model base path; the export goes to OUT/NAME/VERSION")
    p.add_argument("--name", default="model", help="model name in TF Serving's URLs (default: model)")
    p.add_argument("--version", type=int, help="version number (default: one more than the highest there)")
    p.add_argument("--control", help="merge this control (numbers, a stored name, or a mix of adapters such as "
                   "a=0.7,b=0.3) into the weights: no control input")
    p.add_argument("--feedback-half-life", type=float, help="add a feedback_step signature with this half-life")
    p.add_argument("--onnx", help="also write the serve signature as this ONNX file (needs the onnx extra)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing version / file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="serve an export over TF Serving's REST API, with decaying per-session feedback")
    p.add_argument("export_dir", help="BASE/NAME written by `kbi export` (the highest version is served)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8501, help="port (default 8501, as TF Serving's REST)")
    p.add_argument("--store", help="where session state lives: a SQLite file (default: EXPORT_DIR/sessions.sqlite), or "
                   "postgresql://USER[:PASSWORD]@HOST:PORT/DATABASE, which several replicas share")
    p.add_argument("--source", help="the run folder or .keras file behind the export: enables :adapt (self-tuning)")
    p.add_argument("--max-batch", type=int, default=64, help="examples per predict request (default 64)")
    p.add_argument("--batching", action="store_true", help="gather concurrent predict and generate requests, each row "
                   "with its own control or session, into one signature call (as TF Serving's --enable_batching)")
    p.add_argument("--batch-max-size", type=int, default=32, help="with --batching: rows per gathered call (default 32)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="with --batching: how long the first request of a batch waits for others, in ms (default 5)")
    p.add_argument("--max-sequence", type=int, default=1024, help="tokens per example (default 1024)")
    p.add_argument("--max-sessions", type=int, default=100_000, help="sessions kept (default 100000)")
    p.add_argument("--loop", choices=["off", "self"], default="off",
                   help="self: a predict naming a session updates it from the model's own feedback-head reading "
                        "(requests override with \"loop\"; default off)")
    p.add_argument("--loop-target", help="steer the reading towards this (comma-separated numbers inside the head's "
                                         "range): feedback = target - reading; default: feedback = reading")
    p.add_argument("--token-file", help="file holding a bearer token: :adapt, session feedback and loop predicts then "
                                        "need `Authorization: Bearer TOKEN` (required with a non-loopback --host)")
    p.add_argument("--max-clock-skew", type=float, default=300.0,
                   help="refuse stored timestamps more than this many seconds ahead of the server's clock (default 300)")
    p.add_argument("--session-ttl", type=float, default=30 * 86400.0,
                   help="seconds a session may stay idle before it expires (default 30 days; 0: never)")
    p.add_argument("--allow-adapt", action="store_true", help="enable :adapt (needs --source and --adapt-heldout)")
    p.add_argument("--adapt-heldout", help="JSON file: the server's held-out set (inputs plus labels) guarding :adapt")
    p.add_argument("--adapt-max-loss-increase", type=float, default=0.0,
                   help="relative held-out loss increase a published version may have (default 0)")
    p.add_argument("--adapt-max-steps", type=int, default=20, help="most steps an :adapt request may ask for (default 20)")
    p.add_argument("--adapt-max-learning-rate", type=float, default=1e-2,
                   help="highest learning rate an :adapt request may ask for (default 1e-2)")
    p.add_argument("--keep-versions", type=int, default=5, help="versions kept after :adapt publishes one (default 5)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("adapt", help="ask a running `kbi serve --source` for guarded self-tuning on feedback examples")
    p.add_argument("server", help="the server's URL, e.g. http://127.0.0.1:8501")
    p.add_argument("--name", default="model", help="model name (default: model)")
    p.add_argument("--examples", required=True, help="JSON file: {input name: batch, ..., \"labels\": batch}")
    p.add_argument("--token-file", help="file holding the server's bearer token (kbi serve --token-file)")
    p.add_argument("--steps", type=int, default=10, help="gradient steps (at most the server's --adapt-max-steps; default 10)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="at most the server's --adapt-max-learning-rate (default 1e-3)")
    p.add_argument("--heldout", help=argparse.SUPPRESS)  # the server's now: refused with a clear message
    p.add_argument("--max-loss-increase", type=float, help=argparse.SUPPRESS)  # likewise
    p.set_defaults(func=cmd_adapt)
