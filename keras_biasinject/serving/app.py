"""`create_app`: TF Serving's REST API over an export, plus sessions with decaying feedback state.

Routes (TF Serving's, so its clients work unchanged):
- `GET  /v1/models/<name>`, `GET /v1/models/<name>/metadata`: status and signatures.
- `POST /v1/models/<name>:predict`: `{"signature_name"?, "instances": [...]}` (rows) or
  `{"inputs": {...}}` (columns). Ours on top: `"session": id` (and `"timestamp"`) fills a missing
  `control` input with that session's control, decayed to the request's time. With `"loop": "self"`
  (or `kbi serve --loop self`) and an export with a feedback head, the head's reading of the answer
  also updates the session (`"target"` optional), committed before the answer, which says how
  under `"loop"` (loop.py).
- `POST /v1/models/<name>:generate` (`{"prompt", "max_tokens"?, "control"? | "session"?}`) and
  `POST /v1/models/<name>:classify` (`{"text", "control"? | "session"?}`): text in and out through the
  model's own preprocessor, kept beside the export (text.py). They only read sessions.
With `kbi serve --batching`, concurrent predict, generate and classify requests of one signature and
shape share one signature call, each row with its own control (batching.py).
Sessions (need an export with a `feedback_step` signature: `kbi export --feedback-half-life`):
- `POST /v1/sessions/<id>/feedback`: `{"feedback": [...]}` or `{"rating": r}`, `"timestamp"`
  optional (seconds; default now; at most `max_clock_skew` ahead of the server's clock), `"reset":
  true` to start the session over. Acknowledged means committed to the store; an update that would
  leave the state non-finite is refused and stores nothing. Ids: 1 to 128 of `A-Z a-z 0-9 . _ ~ : @ -`.
- `GET  /v1/sessions/<id>?at=T`: the state and control decayed to `T` (default now).
Guarded self-tuning (off unless `kbi serve --allow-adapt --source RUN --adapt-heldout FILE`):
- `POST /v1/models/<name>:adapt`: `{"examples": {inputs..., "labels"}, "steps"?, "learning_rate"?}`
  -> a new version if the loss on the server's held-out set did not worsen beyond the server's
  threshold (409 with the reason, and the weights rolled back, otherwise). The bounds are the
  server's (`AdaptPolicy`); versions beyond `keep_versions` are pruned after a publish.
With a token (`--token-file`), what changes state needs `Authorization: Bearer <token>` (401
otherwise): `:adapt`, session feedback, and predicts that update a session through the loop.
Before any route, `RequestGuard` (guard.py) refuses cross-origin requests and, without a token,
non-loopback Host names and proxied requests (403), and gives every answer an `X-Request-Id`.
Every bad request gets a 4xx with `{"error": message}`; the server never answers 500 to bad input.
Anything else is logged with its request id and answered 500 with that id only.

`SessionServer` answers them, one method per route. Beside it: `rest.py` (request bodies checked,
`Limits`, `BadRequest`), `models.py` (`LoadedExport`, `AdaptableModel`), `store.py` (session
states: SQLite, or PostgreSQL shared by replicas; a store that is down answers 503 with Retry-After),
`guard.py` (the checks before any route), `loop.py` (the serving loop's checks and arithmetic),
`adapt.py` (the guarded training steps), `text.py` (the text routes) and `batching.py`.
"""

import contextlib
import hmac
import json
import logging
import math
import shutil
import threading
import time

import keras
import numpy as np
import tensorflow as tf
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.routing import Route

from keras_biasinject.export.saved_model import export_saved_model
from keras_biasinject.serving.adapt import guarded_adapt
from keras_biasinject.serving import text as text_routes
from keras_biasinject.serving.batching import Batcher
from keras_biasinject.serving.guard import RequestGuard, loopback_name
from keras_biasinject.serving.loop import (
    LoopSettings, SessionMoved, check_settings, loop_request, mean_reading, self_feedback,
)
from keras_biasinject.serving.models import AdaptableModel, LoadedExport, find_version, is_version
from keras_biasinject.serving.rest import (
    AdaptPolicy, BadRequest, Limits, Unauthorized, adapt_batch, feedback_values, finite_number, input_columns,
    predict_answer, session_id as checked_session_id, shown, signature_tensors, text_value,
)
from keras_biasinject.serving.store import SessionLimitError, StoreUnavailable, open_store

__all__ = ["AdaptPolicy", "BadRequest", "Limits", "LoopSettings", "SessionServer", "create_app", "find_version", "serve"]

logger = logging.getLogger(__name__)
ADAPT_KEYS = ("examples", "steps", "learning_rate")  # what an :adapt request may send; the guard is the server's

RETRY_AFTER_S = 2  # what a 503 from an unavailable session store asks the client to wait
PURGE_EVERY_S = 60.0  # how often the server deletes expired sessions (in small batches, never holding up requests)
LOOP_ATTEMPTS = 5  # a loop request whose session another update moved meanwhile runs again, this often at most


class PredictJSON(JSONResponse):
    """JSON with NaN and Infinity written as such, as TF Serving's REST API writes them (a model's output
    may hold them; a loop answer says then that the session was not updated)."""

    def render(self, content):
        return json.dumps(content, ensure_ascii=False, allow_nan=True, separators=(",", ":")).encode("utf-8")


def error_response(error):
    """A `BadRequest` as its JSON answer (a 401 says `WWW-Authenticate: Bearer`)."""
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
    return JSONResponse({"error": str(error)}, error.status, headers=headers)


def is_loopback(host):
    """Whether binding `host` reaches only this machine."""
    return loopback_name(host)


def answer(work, *args):
    """`work(*args)` as a JSON answer, or its `BadRequest` as one (for routes that read no body)."""
    try:
        return JSONResponse(work(*args))
    except BadRequest as error:
        return error_response(error)


class SessionServer:
    """What the routes share, and one method per route: the served `LoadedExport`, the session
    store, the limits, the clock, with `--source` the `AdaptableModel` behind `:adapt` and its
    `AdaptPolicy`, the bearer token, and the loop's defaults."""

    def __init__(self, export, store, limits, clock, adaptable=None, loop=None, policy=None, token=None, batching=None):
        self.export = export  # swapped whole when `:adapt` publishes a version; requests in flight keep theirs
        self.store = store  # a `SessionStore`: per session, the state after its last update, and when
        self.limits = limits  # a `Limits`
        self.clock = clock  # () -> seconds: the time of a request that sends no timestamp
        self.adaptable = adaptable  # an `AdaptableModel`, or None: `:adapt` answers 403
        self.policy = policy or AdaptPolicy()  # what `:adapt` may do; off by default
        self.token = token  # the bearer token state-changing requests need, or None (loopback only)
        self.loop = check_settings(export, loop or LoopSettings())  # `kbi serve --loop`, `--loop-target`
        self.loop_locks = [threading.Lock() for _ in range(64)]  # loop requests of one session take turns here
        # `kbi serve --batching`: (max rows, max wait in seconds) -> concurrent requests share signature calls
        self.batcher = None if batching is None else Batcher(self.run_signature, *batching)
        self.heldout = None
        if self.policy.enabled:  # the server's held-out set, checked once at start (ValueError)
            if adaptable is None:
                raise ValueError("serve --allow-adapt needs --source RUN_OR_KERAS: the Keras model :adapt trains.")
            try:
                self.heldout = self.adapt_arrays(export, self.policy.heldout, "heldout", Limits(1 << 62, 1 << 31, 1 << 31))
            except BadRequest as error:
                raise ValueError(f"serve --adapt-heldout: {error}") from None

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
            raise BadRequest(f"no model {shown(name)} here; this server serves {export.name!r}.", 404)
        return export

    def export_with_sessions(self, export=None):
        """`export` (default: the served one) if it keeps sessions (has `feedback_step`); a 400 otherwise."""
        export = export or self.export
        if export.control_dim is None:
            raise BadRequest("this export has no feedback_step signature, so it keeps no sessions. "
                             "Export with `kbi export ... --feedback-half-life SECONDS`.")
        return export

    def authorize(self, authorization, what):
        """Nothing if no token is configured or `authorization` is `Bearer <token>`; a 401 otherwise."""
        if self.token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise Unauthorized(f"{what} changes state on this server: send `Authorization: Bearer <token>` "
                               "(the token `kbi serve --token-file` was given).")

    def stored_time(self, body):
        """A write's time: the body's `timestamp` (finite, at most `max_clock_skew` s ahead of the
        server's clock), or now."""
        now = self.clock()
        at = finite_number(body.get("timestamp", now), "`timestamp`")
        if at > now + self.limits.max_clock_skew:
            raise BadRequest(f"`timestamp` {at} lies more than {self.limits.max_clock_skew} s ahead of the server's "
                             f"clock ({now}); send seconds since the epoch, or leave it out.")
        return at

    @staticmethod
    def decay(export, session_id, current, at, feedback=None):
        """(state, control) of a session decayed to time `at`, then given `feedback` (default: none).

        `current` is what the store holds for it, (state, updated_at, updates), or None: a new session
        starts at the neutral state, at `at`. A time before its last update is a 400; a stored state
        that is not finite (written by an older version) a 409; a result that is not finite (float32
        overflow) a 400, raised before the store commits."""
        state, updated_at = (current[0], current[1]) if current else ([0.0] * export.control_dim, at)
        if not all(math.isfinite(v) for v in state):
            raise BadRequest(f"session {session_id!r} holds a non-finite state {state} (stored by an older version); "
                             "send feedback with `\"reset\": true` to start it over.", 409)
        if at < updated_at:
            raise BadRequest(f"timestamp {at} is before session {session_id!r}'s last update at {updated_at}.")
        if feedback is None:
            feedback = [0.0] * export.feedback_dim
        new_state, control = export.feedback_step(state, feedback, at - updated_at)
        if not all(math.isfinite(v) for v in new_state + control):
            raise BadRequest(f"feedback {feedback} would take session {session_id!r} to a non-finite state "
                             f"{new_state} (float32 overflow); nothing was stored. Send smaller values.")
        return new_state, control

    # What each route does, given its body (run in a worker thread); each returns the JSON answer.

    def status(self, name):
        export = self.export_named(name)
        return {"model_version_status": [
            {"version": str(export.version), "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}

    def metadata(self, name):
        return self.export_named(name).metadata()

    def predict(self, name, body, authorization=None):
        export = self.export_named(name)
        signature = text_value(body.get("signature_name", "serve"), "`signature_name`")
        if signature not in export.signatures or signature == "feedback_step":
            raise BadRequest(f"unknown signature_name {shown(signature)}; choose from {sorted(set(export.signatures) - {'feedback_step'})}.")
        specs = export.specs[signature]
        columns, rows = input_columns(body, specs)
        if "session" in body:
            checked_session_id(body["session"], "`session`")
        loop = loop_request(body, self.loop, export, signature, specs, columns, self.clock)
        if loop is not None:
            self.authorize(authorization, "a predict that updates its session (\"loop\": \"self\")")
            self.stored_time(body)
            return self.predict_in_loop(export, signature, columns, rows, loop)
        if "session" in body and "control" in specs and "control" not in columns:
            columns["control"] = [self.session_control(export, body)] * len(next(iter(columns.values())))
        outputs = self.run(export, signature, columns)
        return predict_answer({k: v.tolist() for k, v in outputs.items()}, rows)

    def run(self, export, signature, columns):
        """{output name: numpy array}: `signature` of `export` on the checked `columns`; with batching,
        in one call with the concurrent requests that fit beside it (batching.py)."""
        tensors = signature_tensors(signature, export.specs[signature], columns, self.limits, export.vocabulary_size)
        if self.batcher is None:
            return self.run_signature(export, signature, tensors)
        return self.batcher.call(export, signature, {k: v.numpy() for k, v in tensors.items()})

    @staticmethod
    def run_signature(export, signature, tensors):
        """One call of `signature`; a 400 when the model refuses the inputs."""
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

    def adapt_arrays(self, export, batch, what, limits, vocabulary_size=None):
        """An `:adapt` batch checked against the export (`rest.adapt_batch`; token ids below
        `vocabulary_size` when known), as the dict `guarded_adapt` reads."""
        logits = export.specs_out("serve").get("logits")
        if logits is None or logits.shape.rank is None or logits.shape[-1] is None:
            raise BadRequest("this export's `serve` signature returns no `logits` of known width to train against.")
        x, y, w = adapt_batch(batch, what, export.specs["serve"], (int(logits.shape[-1]), logits.shape.rank - 1),
                              limits, vocabulary_size or export.vocabulary_size)
        return {**x, "labels": y, "sample_weight": w}

    def adapt_settings(self, body):
        """(steps, learning_rate) a request asks for, within the server's `AdaptPolicy`; a 4xx otherwise."""
        policy = self.policy
        owned = sorted(k for k in body if k in ("heldout", "max_loss_increase"))
        if owned:
            raise BadRequest(f"{owned} are the server's: it trains against its own held-out set "
                             f"(`kbi serve --adapt-heldout`) and allows a loss increase of {policy.max_loss_increase}. "
                             "Leave them out of the request.", 403)
        unknown = sorted(k[:60] for k in set(body) - set(ADAPT_KEYS))
        if unknown:
            raise BadRequest(f"an :adapt request takes {list(ADAPT_KEYS)}; unknown {unknown}.")
        steps = body.get("steps", min(10, policy.max_steps))
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= policy.max_steps:
            raise BadRequest(f"`steps` must be an integer from 1 to {policy.max_steps} (this server's bound). Got {shown(steps)}.")
        rate = finite_number(body.get("learning_rate", min(1e-3, policy.max_learning_rate)), "`learning_rate`")
        if not 0 < rate <= policy.max_learning_rate:
            raise BadRequest(f"`learning_rate` must be above 0 and at most {policy.max_learning_rate} (this server's bound). "
                             f"Got {rate}.")
        return steps, rate

    def adapt(self, name, body, authorization=None):
        """`:adapt`: with the token, when enabled, every value checked first; any failure once training
        began restores the adapter weights bit for bit (the model is as before the request)."""
        self.authorize(authorization, ":adapt")
        export = self.export_named(name)
        if not self.policy.enabled or self.adaptable is None:
            raise BadRequest(":adapt is off on this server: start it with `kbi serve ... --allow-adapt --source RUN_OR_KERAS "
                             "--adapt-heldout HELDOUT.json` (and --token-file beyond loopback).", 403)
        steps, rate = self.adapt_settings(body)
        if "examples" not in body:
            raise BadRequest("the body needs `examples` (inputs plus `labels`).")
        adaptable = self.adaptable
        with adaptable.lock:
            model = adaptable.keras_model()
            vocabulary_size = getattr(getattr(model, "backbone", None), "vocabulary_size", None)
            examples = self.adapt_arrays(export, body["examples"], "examples", self.limits, vocabulary_size)
            saved = [np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_weights]  # bit for bit
            try:
                published = self.train_and_publish(export, model, examples, steps, rate)
            except BaseException:
                for variable, value in zip(model.trainable_weights, saved):  # any failure: as before the request
                    variable.assign(value)
                raise
            try:  # the new version is served whatever happens here: a failure is logged, the publish stands
                prune_versions(self.export.path.parent, self.policy.keep_versions, keep=self.export.path.name)
            except Exception:
                logger.exception("pruning old versions in %s failed", self.export.path.parent)
            return published

    def train_and_publish(self, export, model, examples, steps, rate):
        """The guarded steps, then (accepted) the next version, served from now on."""
        policy = self.policy
        result = guarded_adapt(model, examples, self.heldout, steps=steps, learning_rate=rate,
                               max_loss_increase=policy.max_loss_increase, max_steps=policy.max_steps)
        result_dict = result.to_dict()
        if not result.accepted:
            raise BadRequest(json.dumps(result_dict), 409)
        path = export_saved_model(model, export.path.parent.parent, export.name, feedback=export.feedback_layer())
        try:
            published = LoadedExport(path)
        except BaseException:  # never leave trained weights on disk unserved (a restart or TF Serving would serve them)
            shutil.rmtree(path, ignore_errors=True)
            raise
        self.export = published  # atomic swap: requests in flight keep the old one
        return {**result_dict, "version": published.version}

    def feedback(self, session_id, body, authorization=None):
        self.authorize(authorization, "session feedback")
        checked_session_id(session_id)
        export = self.export_with_sessions()
        values = feedback_values(body, export.feedback_dim)
        at = self.stored_time(body)
        reset = body.get("reset", False)
        if not isinstance(reset, bool):
            raise BadRequest(f"`reset` must be true or false. Got {shown(reset)}.")

        def apply(current):
            new_state, _ = self.decay(export, session_id, None if reset else current, at, values)
            return new_state, at

        try:
            stored = self.store.update(session_id, apply, self.limits.max_sessions)
        except SessionLimitError as error:
            raise BadRequest(str(error), 429) from None
        state, updated_at, updates = stored
        _, control = self.decay(export, session_id, stored, updated_at)
        return {"session": session_id, "state": state, "control": control, "updated_at": updated_at, "updates": updates}

    def session_control(self, export, body):
        """The control of the session `body["session"]` at `body["timestamp"]` (default now); a session
        that does not exist yet is at its neutral state."""
        session_id = body["session"]
        checked_session_id(session_id, "`session`")
        at = finite_number(body.get("timestamp", self.clock()), "`timestamp`")
        sessions = self.export_with_sessions(export)
        _, control = self.decay(sessions, session_id, self.store.get(session_id), at)
        return control

    def show(self, session_id, at):
        checked_session_id(session_id)
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
        authorization = request.headers.get("authorization")
        if request.method == "GET":
            return answer(self.status, name)
        if verb == "predict":
            return await self.handle(request, lambda body: self.predict(name, body, authorization))
        if verb == "adapt":
            return await self.handle(request, lambda body: self.adapt(name, body, authorization))
        if verb == "generate":
            return await self.handle(request, lambda body: text_routes.generate(self, self.export_named(name), body))
        if verb == "classify":
            return await self.handle(request, lambda body: text_routes.classify(self, self.export_named(name), body))
        return JSONResponse({"error": f"unknown method {shown(verb)}; this server answers :predict, :generate, :classify "
                                      "and :adapt."}, 404)

    async def metadata_route(self, request):
        return answer(self.metadata, request.path_params["name"])

    async def feedback_route(self, request):
        session_id = raw_session_id(request)
        authorization = request.headers.get("authorization")
        return await self.handle(request, lambda body: self.feedback(session_id, body, authorization))

    async def session_route(self, request):
        at = request.query_params.get("at")
        try:
            when = self.clock() if at is None else finite_number(float(at), "`at`")
        except (ValueError, BadRequest):
            return JSONResponse({"error": f"`at` must be a finite number of seconds. Got {shown(at)}."}, 400)
        session_id = raw_session_id(request)
        return await self.handle(request, lambda body: self.show(session_id, when))

    async def handle(self, request, work):
        """Answers `work(body)`, run in a worker thread: its result, its `BadRequest` as a 4xx, and any
        other exception (a bug of ours, or a failing disk: not the client's doing) logged with a request
        id (`RequestGuard`'s, which every answer carries as `X-Request-Id`) and answered 500 with that
        id only; the server keeps serving."""
        try:
            body = await self.json_body(request)
            answer_ = await run_in_threadpool(work, body)
        except BadRequest as error:
            return error_response(error)
        except StoreUnavailable as error:  # the database is down or restarting: nothing was acknowledged
            logger.warning("%s", error)
            message = ("the session store failed while committing; the update may or may not be stored. Read the session "
                       "(GET, its `updates`) before sending it again." if error.outcome_unknown else
                       "the session store is unavailable; nothing was stored. Retry in a few seconds.")
            return JSONResponse({"error": message}, 503, headers={"Retry-After": str(RETRY_AFTER_S)})
        except Exception:
            request_id = request.scope.get("state", {}).get("request_id", "-")
            logger.exception("request %s (%s %s) failed", request_id, request.method, request.url.path)
            return JSONResponse({"error": f"internal error; request id {request_id}"}, 500)
        return PredictJSON(answer_)

    async def json_body(self, request):
        """The request's JSON object ({} for a GET); a 413 as soon as more than `max_body_bytes` came in
        (counted while it streams, so a chunked body without Content-Length is cut off too), a 400 if
        it is not a JSON object."""
        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise BadRequest(f"request body over {limit} bytes", 413)
        if request.method != "POST":
            return {}
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(f"request body over {limit} bytes", 413)
            chunks.append(chunk)
        return parse_json(b"".join(chunks))


def parse_json(raw):
    """The JSON object `raw` holds; a 400 for malformed JSON, numbers of over 4,300 digits, nesting
    deeper than Python's recursion limit, or anything but an object."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:  # JSONDecodeError is a ValueError
        raise BadRequest(f"malformed JSON: {str(error)[:200]}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def raw_session_id(request):
    """The session id in the request's path as sent: a percent-encoded id (which could collide with
    another spelling of the same string) is refused, since valid ids never need encoding."""
    session_id = request.path_params["id"]
    raw = request.scope.get("raw_path")
    if raw is not None and b"%" in raw.split(b"?")[0]:
        return f"%{session_id}"  # never a valid id: refused, with the charset, by `session_id`
    return session_id


def prune_versions(folder, keep_versions, keep):
    """Deletes the numeric version folders in `folder` beyond the newest `keep_versions`; never `keep`
    (the served one) and never anything that is not a numeric folder."""
    versions = sorted((p for p in folder.iterdir() if p.is_dir() and is_version(p.name)), key=lambda p: int(p.name))
    for path in versions[:-keep_versions]:
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


def purge_loop(store, stop, every=PURGE_EVERY_S):
    """Deletes expired sessions every `every` seconds until `stop` is set. A store that is down is
    tried again at the next round; requests never wait for a purge."""
    while not stop.wait(every):
        try:
            deleted = store.purge_expired()
            while deleted >= 1000:  # a backlog goes in batches of 1,000
                deleted = store.purge_expired()
        except Exception as error:  # a database that is down: the next round tries again
            logger.warning("purging expired sessions failed: %s", error)


def create_app(export_dir, store_path, limits=None, clock=time.time, source=None, loop=None, policy=None, token=None,
               batching=None):
    """The Starlette app that serves `export_dir` (`<base>/<name>` or one version folder), with its
    sessions in the store `store_path` names (a SQLite file, or a `postgresql://` URL that replicas
    share: `open_store`), expired ones purged in the background, and, given `source` (the run folder or .keras file behind
    the export) and a `policy` that enables it, `:adapt`. `clock` gives the time of requests that send
    none; `loop` (a `LoopSettings`) the serving loop's defaults, checked against the export here
    (ValueError); `token` the bearer token that state-changing requests need (None: none needed);
    `batching` (max rows, max wait in seconds) gathers concurrent requests into shared calls (None: off)."""
    limits = limits or Limits()
    store = open_store(store_path, ttl=limits.session_ttl, clock=clock)  # first: a bad --store fails fast (ValueError)
    export = LoadedExport(export_dir)
    adaptable = None if source is None else AdaptableModel(source)
    server = SessionServer(export, store, limits, clock, adaptable, loop, policy, token, batching)
    stop = threading.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        purger = threading.Thread(target=purge_loop, args=(store, stop), name="kbi-purge", daemon=True)
        purger.start()
        try:
            yield
        finally:
            stop.set()

    return Starlette(routes=server.routes(), middleware=[Middleware(RequestGuard, token_configured=token is not None)],
                     lifespan=lifespan)


def serve(export_dir, store_path, host="127.0.0.1", port=8501, limits=None, source=None, loop=None, policy=None, token=None,
          batching=None):
    """Runs the server until interrupted (binds loopback unless `host` says otherwise; any other
    address needs a `token`)."""
    import uvicorn  # lazy: only `serve` runs a server; `create_app` (tests, other ASGI servers) needs no uvicorn

    if token is None and not is_loopback(host):
        raise ValueError(f"serve: --host {host} reaches beyond this machine; pass --token-file FILE so that only "
                         "holders of the token can change state (or bind 127.0.0.1).")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(export_dir, store_path, limits, source=source, loop=loop, policy=policy, token=token, batching=batching)
    uvicorn.run(app, host=host, port=port, log_level="warning")
