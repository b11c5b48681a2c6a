"""`create_app`: TF Serving's REST API over an export, plus sessions with decaying feedback state.

Routes (TF Serving's, so its clients work unchanged):
- `GET  /v1/models/<name>`, `GET /v1/models/<name>/metadata`: status and signatures.
- `POST /v1/models/<name>:predict`: `{"signature_name"?, "instances": [...]}` (rows) or
  `{"inputs": {...}}` (columns). Ours on top: `"session": id` (and `"timestamp"`) fills a missing
  `control` input with that session's control, decayed to the request's time.
Sessions (need an export with a `feedback_step` signature: `kbi export --feedback-half-life`):
- `POST /v1/sessions/<id>/feedback`: `{"feedback": [...]}` or `{"rating": r}`, `"timestamp"`
  optional (seconds; default now). Acknowledged means committed to the store.
- `GET  /v1/sessions/<id>?at=T`: the state and control decayed to `T` (default now).
Guarded self-tuning (needs `--source`, the run folder or .keras file behind the export):
- `POST /v1/models/<name>:adapt`: `{"examples": {inputs..., "labels"}, "heldout": {...}, "steps",
  "learning_rate", "max_loss_increase"}` -> a new version if the held-out loss did not worsen
  beyond the threshold (409 with the reason, and the weights rolled back, otherwise).
Every bad request gets a 4xx with `{"error": message}`; the server never answers 500 to bad input.
"""

import dataclasses
import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.routing import Route

from keras_biasinject.serving.store import SessionLimitError, SQLiteStore


@dataclasses.dataclass
class Limits:
    max_body_bytes: int = 1 << 20  # request bodies above this get 413
    max_batch: int = 64  # examples per predict request
    max_sequence: int = 1024  # tokens per example
    max_sessions: int = 100_000  # sessions the store may hold


class BadRequest(Exception):
    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def find_version(export_dir):
    """(model name, version, folder): `<base>/<name>` (highest version) or `<base>/<name>/<version>`."""
    path = Path(export_dir)
    if (path / "saved_model.pb").is_file() and path.name.isdigit():
        return path.parent.name, int(path.name), path
    versions = sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit()) if path.is_dir() else []
    if not versions:
        raise FileNotFoundError(
            f"serve: {str(export_dir)!r} holds no version folder (<name>/<version>/saved_model.pb). "
            "Make one with `kbi export RUN --out BASE --name NAME` and serve BASE/NAME."
        )
    return path.name, versions[-1], path / str(versions[-1])


class Model:
    """A loaded export: its signatures and their input specs."""

    def __init__(self, export_dir):
        self.name, self.version, self.path = find_version(export_dir)
        self.loaded = tf.saved_model.load(str(self.path))
        self.signatures = dict(self.loaded.signatures)
        self.specs = {name: fn.structured_input_signature[1] for name, fn in self.signatures.items()}
        feedback = self.specs.get("feedback_step")
        self.control_dim = int(feedback["state"].shape[-1]) if feedback else None
        self.feedback_dim = int(feedback["feedback"].shape[-1]) if feedback else None

    def feedback_step(self, state, feedback, elapsed):
        out = self.signatures["feedback_step"](
            state=tf.constant([state], tf.float32), feedback=tf.constant([feedback], tf.float32),
            elapsed=tf.constant([elapsed], tf.float32),
        )
        return out["new_state"].numpy()[0].tolist(), out["control"].numpy()[0].tolist()

    def metadata(self):
        def describe(specs):
            return {k: {"dtype": s.dtype.name, "shape": [-1 if d is None else d for d in s.shape]} for k, s in specs.items()}

        return {
            "model_spec": {"name": self.name, "version": str(self.version)},
            "metadata": {"signature_def": {
                name: {"inputs": describe(self.specs[name]),
                       "outputs": describe(fn.structured_outputs)}
                for name, fn in self.signatures.items()
            }},
        }


def _number(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{what} must be a finite number. Got {value!r}.")
    return float(value)


def _columns(body, specs):
    """Request body -> ({input name: list}, row format?)."""
    if "instances" in body:
        rows = body["instances"]
        if not isinstance(rows, list) or not rows:
            raise BadRequest("`instances` must be a non-empty list.")
        if len(specs) == 1 and not isinstance(rows[0], dict):
            return {next(iter(specs)): rows}, True
        if not all(isinstance(r, dict) for r in rows):
            raise BadRequest("each instance must be an object of named inputs.")
        keys = set(rows[0])
        if any(set(r) != keys for r in rows):
            raise BadRequest("all instances must have the same inputs.")
        return {k: [r[k] for r in rows] for k in keys}, True
    if "inputs" in body:
        inputs = body["inputs"]
        if len(specs) == 1 and not isinstance(inputs, dict):
            return {next(iter(specs)): inputs}, False
        if not isinstance(inputs, dict):
            raise BadRequest("`inputs` must be an object of named, batched inputs.")
        return dict(inputs), False
    raise BadRequest("the body needs `instances` (rows) or `inputs` (columns), as in TF Serving's predict API.")


def _tensor(name, value, spec, limits):
    try:
        array = np.asarray(value, dtype=object if spec.dtype == tf.string else spec.dtype.as_numpy_dtype)
    except (ValueError, TypeError):
        raise BadRequest(f"input {name!r}: values must be {spec.dtype.name} in a rectangular array (rows of equal length).") from None
    if array.ndim != len(spec.shape) or any(d is not None and d != a for d, a in zip(spec.shape, array.shape)):
        want = [-1 if d is None else d for d in spec.shape]
        raise BadRequest(f"input {name!r}: shape {list(array.shape)} does not fit {want} (-1: any).")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise BadRequest(f"input {name!r}: NaN or infinite values.")
    if array.ndim >= 1 and array.shape[0] > limits.max_batch:
        raise BadRequest(f"input {name!r}: batch {array.shape[0]} is over the limit of {limits.max_batch}.")
    if array.ndim >= 2 and spec.dtype.is_integer and array.shape[1] > limits.max_sequence:
        raise BadRequest(f"input {name!r}: sequence length {array.shape[1]} is over the limit of {limits.max_sequence}.")
    return tf.constant(array, spec.dtype)


def _load_feedback(version_dir):
    import keras

    path = Path(version_dir) / "assets.extra" / "keras_biasinject.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())["feedback"]
    layer = keras.saving.deserialize_keras_object(data["config"])
    if not layer.built:
        layer.build()
    layer.set_weights([np.asarray(w, "float32") for w in data["weights"]])
    return layer


class Tuner:
    """The Keras model behind the export, for `:adapt`; one adapt at a time."""

    def __init__(self, source):
        self.source, self.model, self.heldout = source, None, None
        self.lock = threading.Lock()

    def keras_model(self):
        if self.model is None:
            source = Path(self.source)
            if source.is_dir() and (source / "report.json").is_file():
                from keras_biasinject.recipes.evaluate import load_run_model

                _, self.model = load_run_model(source)
            else:
                import keras

                import keras_biasinject  # noqa: F401  (registers the injected model class)

                self.model = keras.models.load_model(source)
        return self.model


def create_app(export_dir, store_path, limits=None, clock=time.time, source=None):
    holder = {"model": Model(export_dir)}  # swapped whole when a new version is published
    store = SQLiteStore(store_path)
    limits = limits or Limits()
    tuner = None if source is None else Tuner(source)

    def adapt(name, body):
        from keras_biasinject.export.saved_model import export_saved_model
        from keras_biasinject.serving.adapt import guarded_adapt

        current = holder["model"]
        if name != current.name:
            raise BadRequest(f"no model {name!r} here; this server serves {current.name!r}.", 404)
        if tuner is None:
            raise BadRequest("self-tuning needs the Keras model: start the server with `kbi serve ... --source RUN_OR_KERAS`.")
        if "examples" not in body:
            raise BadRequest("the body needs `examples` (inputs plus `labels`), and `heldout` the first time.")
        with tuner.lock:
            heldout = body.get("heldout", tuner.heldout)
            if heldout is None:
                raise BadRequest("no held-out set yet: send `heldout` (inputs plus `labels`) with the first adapt.")
            try:
                result = guarded_adapt(tuner.keras_model(), body["examples"], heldout, steps=body.get("steps", 10),
                                       learning_rate=body.get("learning_rate", 1e-3),
                                       max_loss_increase=body.get("max_loss_increase", 0.0))
            except (ValueError, TypeError) as error:
                raise BadRequest(str(error)) from None
            tuner.heldout = heldout
            answer = result.to_dict()
            if not result.accepted:
                raise BadRequest(json.dumps(answer), 409)
            path = export_saved_model(tuner.keras_model(), current.path.parent.parent, current.name,
                                      feedback=_load_feedback(current.path))
            holder["model"] = Model(path)  # atomic swap: requests in flight keep the old one
            return {**answer, "version": holder["model"].version}

    def session_control(session_id, at, model=None):
        model = model or holder["model"]
        if model.control_dim is None:
            raise BadRequest("this export has no feedback_step signature, so it keeps no sessions. "
                             "Export with `kbi export ... --feedback-half-life SECONDS`.")
        current = store.get(session_id)
        state, updated_at = (current[0], current[1]) if current else ([0.0] * model.control_dim, at)
        if at < updated_at:
            raise BadRequest(f"timestamp {at} is before session {session_id!r}'s last update at {updated_at}.")
        state, control = model.feedback_step(state, [0.0] * model.feedback_dim, at - updated_at)
        return current, state, control

    def predict(name, body):
        model = holder["model"]
        if name != model.name:
            raise BadRequest(f"no model {name!r} here; this server serves {model.name!r}.", 404)
        signature = body.get("signature_name", "serve")
        if signature not in model.signatures or signature == "feedback_step":
            raise BadRequest(f"unknown signature_name {signature!r}; choose from {sorted(set(model.signatures) - {'feedback_step'})}.")
        specs = model.specs[signature]
        columns, rows = _columns(body, specs)
        if "session" in body and "control" in specs and "control" not in columns:
            at = _number(body.get("timestamp", clock()), "timestamp")
            _, _, control = session_control(str(body["session"]), at, model)
            batch = len(next(iter(columns.values())))
            columns["control"] = [control] * batch
        unknown = sorted(set(columns) - set(specs))
        missing = sorted(set(specs) - set(columns))
        if unknown or missing:
            raise BadRequest(f"signature {signature!r} takes inputs {sorted(specs)}; missing {missing}, unknown {unknown}.")
        tensors = {k: _tensor(k, columns[k], specs[k], limits) for k in specs}
        batches = {int(t.shape[0]) for t in tensors.values() if t.shape.rank}
        if len(batches) > 1:
            raise BadRequest(f"inputs disagree on the batch size: {sorted(batches)}.")
        token_shapes = {k: t.shape.as_list() for k, t in tensors.items() if t.dtype.is_integer and t.shape.rank >= 2}
        if len({tuple(v) for v in token_shapes.values()}) > 1:  # the model would broadcast them silently
            raise BadRequest(f"token inputs disagree on their shapes: {token_shapes}.")
        try:
            outputs = {k: v.numpy().tolist() for k, v in model.signatures[signature](**tensors).items()}
        except (tf.errors.InvalidArgumentError, ValueError) as error:
            raise BadRequest(f"the model refused the inputs: {str(error).splitlines()[0][:300]}") from None
        if rows:
            keys = sorted(outputs)
            n = len(outputs[keys[0]])
            predictions = [outputs[keys[0]][i] if len(keys) == 1 else {k: outputs[k][i] for k in keys} for i in range(n)]
            return {"predictions": predictions}
        return {"outputs": outputs if len(outputs) > 1 else next(iter(outputs.values()))}

    def feedback(session_id, body):
        model = holder["model"]
        if model.control_dim is None:
            session_control(session_id, 0.0)  # raises the no-sessions error
        if "feedback" in body:
            values = body["feedback"]
            if not isinstance(values, list) or len(values) != model.feedback_dim:
                raise BadRequest(f"`feedback` must be a list of {model.feedback_dim} numbers. Got {values!r}.")
            values = [_number(v, "each feedback value") for v in values]
        elif "rating" in body:
            if model.feedback_dim != 1:
                raise BadRequest(f"`rating` is one number; this export takes feedback of width {model.feedback_dim}: send `feedback`.")
            values = [_number(body["rating"], "`rating`")]
        else:
            raise BadRequest("the body needs `feedback` (a list) or `rating` (a number).")
        at = _number(body.get("timestamp", clock()), "`timestamp`")

        def apply(current):
            state, updated_at = (current[0], current[1]) if current else ([0.0] * model.control_dim, at)
            if at < updated_at:
                raise BadRequest(f"timestamp {at} is before session {session_id!r}'s last update at {updated_at}.")
            new_state, _ = model.feedback_step(state, values, at - updated_at)
            return new_state, at

        try:
            state, updated_at, updates = store.update(session_id, apply, limits.max_sessions)
        except SessionLimitError as error:
            raise BadRequest(str(error), 429) from None
        _, _, control = session_control(session_id, updated_at, model)
        return {"session": session_id, "state": state, "control": control, "updated_at": updated_at, "updates": updates}

    def show(session_id, at):
        current, state, control = session_control(session_id, at)
        if current is None:
            raise BadRequest(f"no session {session_id!r}; it starts with its first feedback.", 404)
        return {"session": session_id, "state": state, "control": control, "updated_at": current[1],
                "updates": current[2], "at": at}

    async def handle(request, work):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            return JSONResponse({"error": f"request body over {limits.max_body_bytes} bytes"}, 413)
        body = {}
        if request.method == "POST":
            raw = await request.body()
            if len(raw) > limits.max_body_bytes:
                return JSONResponse({"error": f"request body over {limits.max_body_bytes} bytes"}, 413)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                return JSONResponse({"error": f"malformed JSON: {error}"}, 400)
            if not isinstance(body, dict):
                return JSONResponse({"error": "the body must be a JSON object"}, 400)
        try:
            return JSONResponse(await run_in_threadpool(work, body))
        except BadRequest as error:
            return JSONResponse({"error": str(error)}, error.status)
        except Exception as error:  # a bug of ours, not the client's: say so, keep serving
            return JSONResponse({"error": f"internal error: {type(error).__name__}: {error}"}, 500)

    async def model_route(request):
        model = holder["model"]
        name, _, verb = request.path_params["name"].partition(":")
        if request.method == "POST":
            if verb == "predict":
                return await handle(request, lambda body: predict(name, body))
            if verb == "adapt":
                return await handle(request, lambda body: adapt(name, body))
            return JSONResponse({"error": f"unknown method {verb!r}; this server answers :predict and :adapt."}, 404)
        if name != model.name:
            return JSONResponse({"error": f"no model {name!r} here; this server serves {model.name!r}."}, 404)
        return JSONResponse({"model_version_status": [
            {"version": str(model.version), "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]})

    async def metadata_route(request):
        model = holder["model"]
        if request.path_params["name"] != model.name:
            return JSONResponse({"error": f"no model {request.path_params['name']!r} here."}, 404)
        return JSONResponse(model.metadata())

    async def feedback_route(request):
        return await handle(request, lambda body: feedback(request.path_params["id"], body))

    async def session_route(request):
        at = request.query_params.get("at")
        try:
            when = clock() if at is None else _number(float(at), "`at`")
        except (ValueError, BadRequest):
            return JSONResponse({"error": f"`at` must be a finite number of seconds. Got {at!r}."}, 400)
        return await handle(request, lambda body: show(request.path_params["id"], when))

    return Starlette(routes=[
        Route("/v1/models/{name}/metadata", metadata_route, methods=["GET"]),
        Route("/v1/models/{name}", model_route, methods=["GET", "POST"]),
        Route("/v1/sessions/{id}/feedback", feedback_route, methods=["POST"]),
        Route("/v1/sessions/{id}", session_route, methods=["GET"]),
    ])


def serve(export_dir, store_path, host="127.0.0.1", port=8501, limits=None, source=None):
    """Runs the server until interrupted (binds loopback unless `host` says otherwise)."""
    import uvicorn

    uvicorn.run(create_app(export_dir, store_path, limits, source=source), host=host, port=port, log_level="warning")
