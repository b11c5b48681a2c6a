"""`create_app`: TF Serving's REST API over an export, plus sessions with decaying feedback state.

Routes (TF Serving's, so its clients work unchanged):
- `GET  /v1/models/<name>`, `GET /v1/models/<name>/metadata`: status and signatures.
- `POST /v1/models/<name>:predict`: `{"signature_name"?, "instances": [...]}` (rows) or
  `{"inputs": {...}}` (columns). Ours on top: `"session": id` (and `"timestamp"`) fills a missing
  `control` input with that session's control, decayed to the request's time. With `"loop": "self"`
  (or `kbi serve --loop self`) and an export with a feedback head, the head's reading of the answer
  also updates the session (`"target"` optional), committed before the answer, which says how
  under `"loop"` (loop.py).
Sessions (need an export with a `feedback_step` signature: `kbi export --feedback-half-life`):
- `POST /v1/sessions/<id>/feedback`: `{"feedback": [...]}` or `{"rating": r}`, `"timestamp"`
  optional (seconds; default now). Acknowledged means committed to the store.
- `GET  /v1/sessions/<id>?at=T`: the state and control decayed to `T` (default now).
Guarded self-tuning (needs `--source`, the run folder or .keras file behind the export):
- `POST /v1/models/<name>:adapt`: `{"examples": {inputs..., "labels"}, "heldout": {...}, "steps",
  "learning_rate", "max_loss_increase"}` -> a new version if the held-out loss did not worsen
  beyond the threshold (409 with the reason, and the weights rolled back, otherwise).
Every bad request gets a 4xx with `{"error": message}`; the server never answers 500 to bad input.

`SessionServer` answers them, one method per route. Beside it: `rest.py` (request bodies checked,
`Limits`, `BadRequest`), `models.py` (`LoadedExport`, `AdaptableModel`), `store.py` (session
states), `loop.py` (the serving loop's checks and arithmetic) and `adapt.py` (the guarded training
steps).
"""

import json
import threading
import time

import numpy as np
import tensorflow as tf
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.routing import Route

from keras_biasinject.export.saved_model import export_saved_model
from keras_biasinject.serving.adapt import guarded_adapt
from keras_biasinject.serving.loop import (
    LoopSettings, SessionMoved, check_settings, loop_request, mean_reading, self_feedback,
)
from keras_biasinject.serving.models import AdaptableModel, LoadedExport, find_version
from keras_biasinject.serving.rest import (
    BadRequest, Limits, feedback_values, finite_number, input_columns, predict_answer, signature_tensors,
)
from keras_biasinject.serving.store import SessionLimitError, SQLiteStore

__all__ = ["BadRequest", "Limits", "LoopSettings", "SessionServer", "create_app", "find_version", "serve"]

LOOP_ATTEMPTS = 5  # a loop request whose session another update moved meanwhile runs again, this often at most


class PredictJSON(JSONResponse):
    """JSON with NaN and Infinity written as such, as TF Serving's REST API writes them (a model's output
    may hold them; a loop answer says then that the session was not updated)."""

    def render(self, content):
        return json.dumps(content, ensure_ascii=False, allow_nan=True, separators=(",", ":")).encode("utf-8")


def error_response(error):
    """A `BadRequest` as its JSON answer."""
    return JSONResponse({"error": str(error)}, error.status)


def answer(work, *args):
    """`work(*args)` as a JSON answer, or its `BadRequest` as one (for routes that read no body)."""
    try:
        return JSONResponse(work(*args))
    except BadRequest as error:
        return error_response(error)


class SessionServer:
    """What the routes share, and one method per route: the served `LoadedExport`, the session
    store, the limits, the clock, with `--source` the `AdaptableModel` behind `:adapt`, and the
    loop's defaults."""

    def __init__(self, export, store, limits, clock, adaptable=None, loop=None):
        self.export = export  # swapped whole when `:adapt` publishes a version; requests in flight keep theirs
        self.store = store  # a `SessionStore`: per session, the state after its last update, and when
        self.limits = limits  # a `Limits`
        self.clock = clock  # () -> seconds: the time of a request that sends no timestamp
        self.adaptable = adaptable  # an `AdaptableModel`, or None: `:adapt` answers 400
        self.loop = check_settings(export, loop or LoopSettings())  # `kbi serve --loop`, `--loop-target`
        self.loop_locks = [threading.Lock() for _ in range(64)]  # loop requests of one session take turns here

    def routes(self):
        return [
            Route("/v1/models/{name}/metadata", self.metadata_route, methods=["GET"]),
            Route("/v1/models/{name}", self.model_route, methods=["GET", "POST"]),
            Route("/v1/sessions/{id}/feedback", self.feedback_route, methods=["POST"]),
            Route("/v1/sessions/{id}", self.session_route, methods=["GET"]),
        ]

    # The guards, and the one session step.

    def export_named(self, name):
        """The served export if it is called `name`; a 404 otherwise."""
        export = self.export
        if name != export.name:
            raise BadRequest(f"no model {name!r} here; this server serves {export.name!r}.", 404)
        return export

    def export_with_sessions(self, export=None):
        """`export` (default: the served one) if it keeps sessions (has `feedback_step`); a 400 otherwise."""
        export = export or self.export
        if export.control_dim is None:
            raise BadRequest("this export has no feedback_step signature, so it keeps no sessions. "
                             "Export with `kbi export ... --feedback-half-life SECONDS`.")
        return export

    @staticmethod
    def decay(export, session_id, current, at, feedback=None):
        """(state, control) of a session decayed to time `at`, then given `feedback` (default: none).

        `current` is what the store holds for it, (state, updated_at, updates), or None: a new session
        starts at the neutral state, at `at`. A time before its last update is a 400."""
        state, updated_at = (current[0], current[1]) if current else ([0.0] * export.control_dim, at)
        if at < updated_at:
            raise BadRequest(f"timestamp {at} is before session {session_id!r}'s last update at {updated_at}.")
        if feedback is None:
            feedback = [0.0] * export.feedback_dim
        return export.feedback_step(state, feedback, at - updated_at)

    # What each route does, given its body (run in a worker thread); each returns the JSON answer.

    def status(self, name):
        export = self.export_named(name)
        return {"model_version_status": [
            {"version": str(export.version), "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}

    def metadata(self, name):
        return self.export_named(name).metadata()

    def predict(self, name, body):
        export = self.export_named(name)
        signature = body.get("signature_name", "serve")
        if signature not in export.signatures or signature == "feedback_step":
            raise BadRequest(f"unknown signature_name {signature!r}; choose from {sorted(set(export.signatures) - {'feedback_step'})}.")
        specs = export.specs[signature]
        columns, rows = input_columns(body, specs)
        loop = loop_request(body, self.loop, export, signature, specs, columns, self.clock)
        if loop is not None:
            return self.predict_in_loop(export, signature, columns, rows, loop)
        if "session" in body and "control" in specs and "control" not in columns:
            at = finite_number(body.get("timestamp", self.clock()), "timestamp")
            session_id = str(body["session"])
            sessions = self.export_with_sessions(export)
            _, control = self.decay(sessions, session_id, self.store.get(session_id), at)
            columns["control"] = [control] * len(next(iter(columns.values())))
        outputs = self.run(export, signature, columns)
        return predict_answer({k: v.tolist() for k, v in outputs.items()}, rows)

    def run(self, export, signature, columns):
        """{output name: numpy array}: `signature` of `export` on the checked `columns`."""
        tensors = signature_tensors(signature, export.specs[signature], columns, self.limits)
        try:
            return {k: v.numpy() for k, v in export.signatures[signature](**tensors).items()}
        except (tf.errors.InvalidArgumentError, ValueError) as error:
            raise BadRequest(f"the model refused the inputs: {str(error).splitlines()[0][:300]}") from None

    def predict_in_loop(self, export, signature, columns, rows, loop):
        """A predict that updates its session from the head's reading (loop.py), committed before the
        answer. The model runs outside the store's write lock; the update is stored only if the session
        is still as the request read it, otherwise the request runs again with the session's new control."""
        with self.loop_locks[hash(loop.session_id) % len(self.loop_locks)]:  # this server's requests of one session in turn
            for _ in range(LOOP_ATTEMPTS):
                try:
                    return self.loop_once(export, signature, columns, rows, loop)
                except SessionMoved:  # an external rating (or another replica) came in meanwhile
                    continue
        raise BadRequest(f"session {loop.session_id!r} was updated {LOOP_ATTEMPTS} times while this loop request ran; "
                         "send it again.", 409)

    def loop_once(self, export, signature, columns, rows, loop):
        """One try of `predict_in_loop`: the answer, with the session's update (or why there was none)."""
        session_id, at = loop.session_id, loop.at
        seen = self.store.get(session_id)
        state, control = self.decay(export, session_id, seen, at)
        columns["control"] = [control] * len(next(iter(columns.values())))
        outputs = self.run(export, signature, columns)
        reading = mean_reading(outputs, signature)  # (F,)
        report = {"session": session_id, "control_used": control, "reading": reading.tolist(), "target": loop.target}
        if np.all(np.isfinite(reading)):
            feedback = self_feedback(reading, loop.target).tolist()
            try:
                stored = self.store.update(
                    session_id, lambda current: self.loop_step(export, seen, current, loop, feedback), self.limits.max_sessions)
            except SessionLimitError as error:
                raise BadRequest(str(error), 429) from None
            state, (_, control) = stored[0], self.decay(export, session_id, stored, at)  # the new state and its control
            report.update(feedback=feedback, updated=True, skipped=None, updated_at=stored[1], updates=stored[2])
        else:
            report.update(feedback=None, updated=False, skipped=f"the reading {reading.tolist()} is not finite, so the "
                          "session was not updated", updated_at=None if seen is None else seen[1],
                          updates=0 if seen is None else seen[2])
        answer_ = predict_answer({k: v.tolist() for k, v in outputs.items()}, rows)
        return {**answer_, "loop": {**report, "state": state, "control": control}}

    def loop_step(self, export, seen, current, loop, feedback):
        """The store update of a loop request: (state, time) after `feedback` at the request's time, if
        the session is still `seen` (what the request's control came from); SessionMoved otherwise."""
        if current != seen:
            raise SessionMoved(loop.session_id)
        new_state, _ = self.decay(export, loop.session_id, current, loop.at, feedback)
        return new_state, loop.at

    def adapt(self, name, body):
        export = self.export_named(name)
        adaptable = self.adaptable
        if adaptable is None:
            raise BadRequest("self-tuning needs the Keras model: start the server with `kbi serve ... --source RUN_OR_KERAS`.")
        if "examples" not in body:
            raise BadRequest("the body needs `examples` (inputs plus `labels`), and `heldout` the first time.")
        with adaptable.lock:
            heldout = body.get("heldout", adaptable.heldout)
            if heldout is None:
                raise BadRequest("no held-out set yet: send `heldout` (inputs plus `labels`) with the first adapt.")
            try:
                result = guarded_adapt(adaptable.keras_model(), body["examples"], heldout, steps=body.get("steps", 10),
                                       learning_rate=body.get("learning_rate", 1e-3),
                                       max_loss_increase=body.get("max_loss_increase", 0.0))
            except (ValueError, TypeError, FileNotFoundError) as error:  # FileNotFoundError: a bad --source
                raise BadRequest(str(error)) from None
            adaptable.heldout = heldout
            result_dict = result.to_dict()
            if not result.accepted:
                raise BadRequest(json.dumps(result_dict), 409)
            path = export_saved_model(adaptable.keras_model(), export.path.parent.parent, export.name,
                                      feedback=export.feedback_layer())
            self.export = LoadedExport(path)  # atomic swap: requests in flight keep the old one
            return {**result_dict, "version": self.export.version}

    def feedback(self, session_id, body):
        export = self.export_with_sessions()
        values = feedback_values(body, export.feedback_dim)
        at = finite_number(body.get("timestamp", self.clock()), "`timestamp`")

        def apply(current):
            new_state, _ = self.decay(export, session_id, current, at, values)
            return new_state, at

        try:
            stored = self.store.update(session_id, apply, self.limits.max_sessions)
        except SessionLimitError as error:
            raise BadRequest(str(error), 429) from None
        state, updated_at, updates = stored
        _, control = self.decay(export, session_id, stored, updated_at)
        return {"session": session_id, "state": state, "control": control, "updated_at": updated_at, "updates": updates}

    def show(self, session_id, at):
        export = self.export_with_sessions()
        current = self.store.get(session_id)
        if current is None:
            raise BadRequest(f"no session {session_id!r}; it starts with its first feedback.", 404)
        state, control = self.decay(export, session_id, current, at)
        return {"session": session_id, "state": state, "control": control, "updated_at": current[1],
                "updates": current[2], "at": at}

    # HTTP: the routes themselves.

    async def model_route(self, request):
        name, _, verb = request.path_params["name"].partition(":")
        if request.method == "GET":
            return answer(self.status, name)
        if verb == "predict":
            return await self.handle(request, lambda body: self.predict(name, body))
        if verb == "adapt":
            return await self.handle(request, lambda body: self.adapt(name, body))
        return JSONResponse({"error": f"unknown method {verb!r}; this server answers :predict and :adapt."}, 404)

    async def metadata_route(self, request):
        return answer(self.metadata, request.path_params["name"])

    async def feedback_route(self, request):
        return await self.handle(request, lambda body: self.feedback(request.path_params["id"], body))

    async def session_route(self, request):
        at = request.query_params.get("at")
        try:
            when = self.clock() if at is None else finite_number(float(at), "`at`")
        except (ValueError, BadRequest):
            return JSONResponse({"error": f"`at` must be a finite number of seconds. Got {at!r}."}, 400)
        return await self.handle(request, lambda body: self.show(request.path_params["id"], when))

    async def handle(self, request, work):
        """Answers `work(body)`, run in a worker thread: its result, its `BadRequest` as a 4xx, and any
        other exception (a bug of ours, not the client's) as a 500 that says so; the server keeps serving."""
        try:
            body = await self.json_body(request)
        except BadRequest as error:
            return error_response(error)
        try:
            return PredictJSON(await run_in_threadpool(work, body))
        except BadRequest as error:
            return error_response(error)
        except Exception as error:
            return JSONResponse({"error": f"internal error: {type(error).__name__}: {error}"}, 500)

    async def json_body(self, request):
        """The request's JSON object ({} for a GET); a 413 over `max_body_bytes`, a 400 if not a JSON object."""
        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise BadRequest(f"request body over {limit} bytes", 413)
        if request.method != "POST":
            return {}
        raw = await request.body()
        if len(raw) > limit:
            raise BadRequest(f"request body over {limit} bytes", 413)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BadRequest(f"malformed JSON: {error}") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body


def create_app(export_dir, store_path, limits=None, clock=time.time, source=None, loop=None):
    """The Starlette app that serves `export_dir` (`<base>/<name>` or one version folder), with its
    sessions in the SQLite file `store_path` and, given `source` (the run folder or .keras file behind
    the export), `:adapt`. `clock` gives the time of requests that send none; `loop` (a `LoopSettings`)
    the serving loop's defaults, checked against the export here (ValueError)."""
    export = LoadedExport(export_dir)
    store = SQLiteStore(store_path)
    adaptable = None if source is None else AdaptableModel(source)
    return Starlette(routes=SessionServer(export, store, limits or Limits(), clock, adaptable, loop).routes())


def serve(export_dir, store_path, host="127.0.0.1", port=8501, limits=None, source=None, loop=None):
    """Runs the server until interrupted (binds loopback unless `host` says otherwise)."""
    import uvicorn  # lazy: only `serve` runs a server; `create_app` (tests, other ASGI servers) needs no uvicorn

    app = create_app(export_dir, store_path, limits, source=source, loop=loop)
    uvicorn.run(app, host=host, port=port, log_level="warning")
