"""Text in and out, tokenized and detokenized with the model's own KerasHub preprocessor, which
`export_saved_model` keeps beside the SavedModel (`assets.extra/preprocessor`; TF Serving ignores
it, and the signatures stay token-level for TF Serving):

- `POST /v1/models/<name>:generate` (causal LMs): `{"prompt": str or [str], "max_tokens"?: int,
  "control"?: [numbers] | "session"?: id, "timestamp"?}` -> `{"completion", "text", "control",
  "usage": {"prompt_tokens", "completion_tokens"}}`; greedy, by the export's `generate` signature.
  Each completion ends at the model's end token or after `max_tokens`.
- `POST /v1/models/<name>:classify` (classifiers): `{"text": str or [str], "control"? | "session"?}`
  -> `{"probabilities", "label"}` (the class index with the highest probability).

The control is the request's `control`, else its session's control at `timestamp` (default now), else
the export's neutral control (the base model's behaviour). Both routes only read session state.
"""

import numpy as np

from keras_biasinject.serving.rest import BadRequest, finite_number, shown

GENERATE_KEYS = ("prompt", "max_tokens", "control", "session", "timestamp")
CLASSIFY_KEYS = ("text", "control", "session", "timestamp")
DEFAULT_MAX_TOKENS = 32


def check_keys(body, allowed, route):
    unknown = sorted(k[:60] for k in set(body) - set(allowed))
    if unknown:
        raise BadRequest(f"{route} takes {list(allowed)}; unknown {unknown}.")


def texts(body, key, limit):
    """(list of strings, whether one string was sent) from `body[key]`: 1 to `limit` strings."""
    value = body.get(key)
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(t, str) for t in items):
        raise BadRequest(f"`{key}` must be a string or a non-empty list of strings. Got {shown(value)}.")
    if len(items) > limit:
        raise BadRequest(f"`{key}` holds {len(items)} texts, over the limit of {limit} (kbi serve --max-batch).")
    return items, isinstance(value, str)


def text_preprocessor(export, task, route):
    """The export's preprocessor if the export is a `task` model that kept one; a 400 otherwise."""
    if export.task != task:
        kind = {"causal_lm": "causal LM", "classifier": "classifier"}[task]
        raise BadRequest(f"{route} needs a {kind} exported with its preprocessor (kbi export keeps it); this export "
                         + ("has none: export it again with this version." if export.task is None else f"is a {export.task}."))
    preprocessor = export.preprocessor()
    if preprocessor is None:
        raise BadRequest(f"{route}: this export's preprocessor folder (assets.extra/preprocessor) is missing; export the model again.")
    return preprocessor


def numpy(tensors):
    """The preprocessor's tensors as the signatures take them: numpy, masks as int32 (0/1)."""
    import keras

    arrays = {k: np.asarray(keras.ops.convert_to_numpy(v)) for k, v in tensors.items()}
    return {k: v.astype("int32") if v.dtype == bool else v for k, v in arrays.items()}


def request_control(server, export, body, signature, n):
    """{"control": n rows} for `signature`, or {} for an export without a control input."""
    if "control" not in export.specs[signature]:
        if "control" in body or "session" in body:
            raise BadRequest("this export has no control input (a control was merged into it); send no `control` or `session`.")
        return {}
    width = int(export.specs[signature]["control"].shape[-1])
    if "control" in body and "session" in body:
        raise BadRequest("send `control` or `session`, not both.")
    if "control" in body:
        control = body["control"]
        if not isinstance(control, list) or len(control) != width:
            raise BadRequest(f"`control` must be a list of {width} numbers. Got {shown(control)}.")
        control = [finite_number(v, "each control value") for v in control]
    elif "session" in body:
        control = server.session_control(export, body)
    elif export.neutral_control is not None and len(export.neutral_control) == width:
        control = list(export.neutral_control)
    else:
        raise BadRequest("send `control` (a list of numbers) or `session`: this export does not record its neutral control.")
    return {"control": np.array([control] * n, "float32")}


def generate(server, export, body):
    check_keys(body, GENERATE_KEYS, ":generate")
    preprocessor = text_preprocessor(export, "causal_lm", ":generate")
    prompts, single = texts(body, "prompt", server.limits.max_batch)
    max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest(f"`max_tokens` must be an integer >= 1. Got {shown(max_tokens)}.")
    control = request_control(server, export, body, "generate", len(prompts))  # every field checked before the model runs
    cap = min(server.limits.max_sequence, export.extra.get("max_sequence_length") or server.limits.max_sequence)
    probe = numpy(preprocessor.generate_preprocess(prompts, sequence_length=cap + 1))
    lengths = probe["padding_mask"].sum(axis=1).astype(int)
    if int(lengths.min()) == 0:
        raise BadRequest("a prompt is empty (no tokens); send at least one character to continue from.")
    if int(lengths.max()) + max_tokens > cap:
        longest = int(lengths.max())
        raise BadRequest(f"the prompt is {longest} tokens (special tokens included); with max_tokens {max_tokens} that is "
                         f"{longest + max_tokens}, over this server's sequence length {cap}. Shorten the prompt or ask for fewer tokens.")
    total = int(lengths.max()) + max_tokens
    x = numpy(preprocessor.generate_preprocess(prompts, sequence_length=total))
    columns = {"token_ids": x["token_ids"], "padding_mask": x["padding_mask"], **control}
    out = server.run(export, "generate", columns)
    ids, mask = np.asarray(out["token_ids"]), np.asarray(out["padding_mask"]).astype(bool)
    new = mask & ~x["padding_mask"].astype(bool)  # the generated positions of each row
    new &= np.cumsum(new, axis=1) <= max_tokens  # a shorter prompt in the batch had room for more: keep max_tokens
    end = getattr(preprocessor.tokenizer, "end_token_id", None)
    if end is not None:  # a completion ends at the model's end token (greedy decoding runs on past it)
        after_end = np.cumsum(new & (ids == end), axis=1) > 0
        new &= ~after_end
    completions = detokenize(preprocessor, ids, new)
    texts_ = detokenize(preprocessor, ids, x["padding_mask"].astype(bool) | new)  # the prompt and its completion
    answer = {"completion": completions, "text": texts_, "control": columns["control"][0].tolist() if "control" in columns else None,
              "usage": {"prompt_tokens": lengths.tolist(), "completion_tokens": new.sum(axis=1).astype(int).tolist()}}
    return unwrap(answer, single, ("completion", "text"), ("prompt_tokens", "completion_tokens"))


def detokenize(preprocessor, ids, mask):
    strings = preprocessor.generate_postprocess({"token_ids": ids, "padding_mask": mask})
    strings = [strings] if isinstance(strings, str) else list(np.asarray(strings).reshape(-1))
    return [s.decode() if isinstance(s, bytes) else str(s) for s in strings]


def classify(server, export, body):
    check_keys(body, CLASSIFY_KEYS, ":classify")
    preprocessor = text_preprocessor(export, "classifier", ":classify")
    items, single = texts(body, "text", server.limits.max_batch)
    control = request_control(server, export, body, "serve", len(items))
    x = numpy(preprocessor(items))
    specs = export.specs["serve"]
    columns = {**{k: v for k, v in x.items() if k in specs}, **control}
    out = server.run(export, "serve", columns)
    if "probabilities" in out:
        probabilities = np.asarray(out["probabilities"], "float64")
    else:
        logits = np.asarray(out["logits"], "float64")
        exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probabilities = exp / exp.sum(axis=-1, keepdims=True)
    answer = {"probabilities": probabilities.tolist(), "label": probabilities.argmax(axis=-1).astype(int).tolist(),
              "control": columns["control"][0].tolist() if "control" in columns else None}
    return unwrap(answer, single, ("probabilities", "label"), ())


def unwrap(answer, single, keys, usage_keys):
    """The answer for one string sent as a string: each per-text list replaced by its one entry."""
    if not single:
        return answer
    answer = {**answer, **{k: answer[k][0] for k in keys}}
    if usage_keys:
        answer["usage"] = {k: answer["usage"][k][0] for k in usage_keys}
    return answer
