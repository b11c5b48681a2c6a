"""Completion-only loss for prompt/response data: the loss counts the response, not the prompt.

KerasHub's `CausalLMPreprocessor` packs `[start] + tokens + [end] + padding` into `sequence_length
+ 1` ids and returns `x = ids[:-1]`, `y = ids[1:]` and the padding mask of `y` as the sample
weight. Here the weight of target position `j` (which predicts packed token `j + 1`) is 1 exactly
when that token is a response token or the end token after a whole response, 0 on the prompt and
the padding (as TRL's completion-only collator and `completion_mask` do):

    packed   [<s>  p0   p1   r0   r1   </s> pad]     S = 1 start token, P = 2 prompt tokens
    y        [p0   p1   r0   r1   </s> pad]
    weight   [0    0    1    1    1    0  ]         1 on targets S + P - 1 .. S + n + E - 2

The prompt's length in tokens is where the tokens of the prompt alone stop agreeing with those of
the whole text (the text the model sees is tokenized whole, so nothing changes in `x` or `y`).

Prompt/response pairs are tokenized once, in Python, when the pipeline is made (`tokenized_pairs`),
and packed in the `tf.data` map with the preprocessor's own packer (`pack`): KerasHub 0.32's
graph-mode BPE tokenizer, which `tf.data` would run, mangles special tokens written in the text
when a tokenizer has more than ten of them (SmolLM2 has 17: its `<|im_start|>` may come out as
the pieces of "<jupyter_output>A", depending on the process's hash seed; the alternates "ĴB" and
"ĴBA" it swaps them for overlap), which would break every chat template.
A prompt that fills the whole sequence raises ValueError naming the example; a response cut at the
sequence length keeps the weight of the tokens that fit, its end token gets weight 0 (the model is
not taught to stop there), and one warning names the examples cut.
"""

import warnings

import numpy as np
import tensorflow as tf

from keras_biasinject.data.chat import chat_template_of, render_pair

_NAMED = 3  # examples named in a warning before "and N more"


def model_texts(preprocessor, prompts, responses, chat_template=True):
    """(prompt texts, full texts) the model sees for each pair.

    Args:
        preprocessor: the `CausalLMPreprocessor`; its tokenizer's start and end tokens fill the template.
        prompts, responses: sequences of strings.
        chat_template: True: the preprocessor's own template when it carries one (`chat_template_of`),
            else `prompt + response`; False: `prompt + response`, joined as is; a string: this Jinja template.

    With a template, the prompt is the user turn followed by the assistant's header and the response is
    the assistant turn. Where the packer adds the tokenizer's start or end token itself, the rendered
    text leaves it out: a leading start token (Llama 3's `{{ bos_token }}`), and a final end token
    (ChatML's `<|im_end|>`) with the whitespace after it. The model sees the template's text once,
    ending where `generate` stops.
    """
    template = chat_template_of(preprocessor) if chat_template is True else (chat_template or None)
    if template is None:
        return list(prompts), [p + r for p, r in zip(prompts, responses)]
    tokenizer = preprocessor.tokenizer
    start, end = getattr(tokenizer, "start_token", None) or "", getattr(tokenizer, "end_token", None) or ""
    starts, ends, _ = _packing(preprocessor)
    prompt_texts, full_texts = [], []
    for prompt, response in zip(prompts, responses):
        prompt_text, full_text = render_pair(template, prompt, response, bos_token=start, eos_token=end)
        if starts and start and prompt_text.startswith(start):
            prompt_text, full_text = prompt_text[len(start):], full_text[len(start):]
        if ends and end and full_text.rstrip().endswith(end):
            full_text = full_text.rstrip()[: -len(end)]
        prompt_texts.append(prompt_text)
        full_texts.append(full_text)
    return prompt_texts, full_texts


def tokenized_pairs(preprocessor, prompt_texts, full_texts, places, completion_only=True):
    """(token ids of each full text, a `tf.RaggedTensor` int32 `[n, None]`; `response_spans` or None).

    The ids are the preprocessor's tokenizer's, run eagerly; `pack` turns a batch of them into what
    the preprocessor returns for the same texts (checked here on the first one).
    """
    starts, ends, length = _packing(preprocessor)
    full_ids = token_ids(preprocessor, full_texts)
    _check_packing(preprocessor, full_texts[0], full_ids[0], starts, ends, length)
    lengths = np.array([len(ids) for ids in full_ids], "int64")
    flat = np.fromiter((t for ids in full_ids for t in ids), "int32", count=int(lengths.sum()))
    ragged = tf.RaggedTensor.from_row_lengths(flat, lengths)
    if not completion_only:
        return ragged, None
    return ragged, response_spans(preprocessor, token_ids(preprocessor, prompt_texts), full_ids, places)


def pack(preprocessor, ids):
    """(x, y, padding mask of y) from a batch of token ids `ids` `[batch, None]`, as `preprocessor(texts)`
    returns them: `[start] + ids + [end]` padded to sequence_length + 1, shifted by one for `y`."""
    packed, mask = preprocessor.packer(
        ids,
        sequence_length=preprocessor.sequence_length + 1,
        add_start_value=preprocessor.add_start_token,
        add_end_value=preprocessor.add_end_token,
    )  # (B, T + 1)
    return {"token_ids": packed[..., :-1], "padding_mask": mask[..., :-1]}, packed[..., 1:], mask[..., 1:]


def response_spans(preprocessor, prompt_ids, full_ids, places):
    """int32 `[n, 2]`: per example, the target positions `[first, stop)` whose weight is 1.

    `prompt_ids` and `full_ids` are the token ids of the prompt alone and of the whole text; `places`
    names each example in messages ("File 'a.jsonl' line 3"). Raises ValueError when a prompt leaves
    no room for any response token; warns once about responses cut at the sequence length.
    """
    starts, ends, length = _packing(preprocessor)
    room = length + 1 - starts - ends  # content tokens the packer keeps
    spans, cut, merged, too_long = np.zeros((len(full_ids), 2), "int32"), [], [], []
    for i, (prompt, full) in enumerate(zip(prompt_ids, full_ids)):
        p = _common_prefix(prompt, full)
        if p < len(prompt):
            merged.append(places[i])
        n = len(full)
        if p >= room and n > room:
            too_long.append((places[i], p, n - p))
        if n > room:
            cut.append(places[i])
        last = min(n, room) + (ends if n <= room else 0)  # packed content + end tokens weighted, after the start
        spans[i] = max(starts + p - 1, 0), starts + last - 1
    if too_long:
        where, p, n = too_long[0]
        raise ValueError(
            f"{_list([t[0] for t in too_long])}: the prompt leaves no room for the response. {where}: the prompt "
            f"takes {p} tokens, but sequence_length={length} leaves room for {room} tokens of text (besides "
            f"{starts} start and {ends} end token(s)), so none of the response's {n} tokens would be trained. "
            "Raise the preprocessor's sequence_length (e.g. `load(..., sequence_length=...)`), shorten the "
            "prompts, drop those examples, or set DataConfig completion_only=False to train the cut text whole."
        )
    if cut:
        warnings.warn(
            f"{_list(cut)}: prompt + response exceed sequence_length={length}; the response is cut there, "
            "its tokens that fit are trained and the end token gets weight 0 (the model is not taught to stop "
            "mid-answer). Raise sequence_length to train whole responses.",
            stacklevel=3,
        )
    if merged:
        warnings.warn(
            f"{_list(merged)}: the prompt's last token merges with the response's first characters (e.g. a "
            "prompt ending in a space); that token is trained as part of the response. End prompts without "
            "the space and start responses with it to keep the boundary exact.",
            stacklevel=3,
        )
    return spans


def completion_weights(sample_weight, spans):
    """The padding mask `sample_weight` `[batch, seq]`, zeroed outside `spans` `[batch, 2]` (same dtype)."""
    positions = tf.range(tf.shape(sample_weight)[-1])[tf.newaxis, :]  # (1, T)
    inside = (positions >= spans[:, :1]) & (positions < spans[:, 1:])  # (B, T)
    return tf.cast(inside & tf.cast(sample_weight, "bool"), sample_weight.dtype)


def _packing(preprocessor):
    """(start tokens, end tokens, sequence_length): what the preprocessor's packer adds to each text."""
    if getattr(preprocessor, "packer", None) is None:
        preprocessor.build(None)  # makes the packer (not again: that would undo changes made to it)
    packer = preprocessor.packer
    starts = len(packer.start_value) if preprocessor.add_start_token and packer.start_value is not None else 0
    ends = len(packer.end_value) if preprocessor.add_end_token and packer.end_value is not None else 0
    return starts, ends, preprocessor.sequence_length


def _check_packing(preprocessor, text, ids, starts, ends, length):
    """Check on `text` (token ids `ids`) that `pack` gives what the preprocessor gives, and that this
    is `[start] + tokens + [end]` padded on the right: the response's positions are counted so."""
    packer = preprocessor.packer
    x, y, weight = preprocessor([text])
    mine = pack(preprocessor, tf.ragged.constant([ids], dtype="int32"))
    ids = ids[: length + 1 - starts - ends]
    expected = (list(packer.start_value) if starts else []) + ids + (list(packer.end_value) if ends else [])
    packed = [int(x["token_ids"][0, 0])] + np.asarray(y[0]).tolist()
    theirs, ours = (x["token_ids"], x["padding_mask"], y, weight), (*mine[0].values(), *mine[1:])
    same = sorted(x) == sorted(mine[0]) and all(np.array_equal(a, b) for a, b in zip(theirs, ours))
    right = getattr(packer, "padding_side", "right") == "right"
    if not same or not right or packed[: len(expected)] != [int(t) for t in expected]:
        raise ValueError(
            f"DataConfig prompt/response data: {type(preprocessor).__name__} does not pack `[start] + tokens + "
            f"[end]` padded on the right into `token_ids` and `padding_mask` as KerasHub's CausalLMPreprocessor "
            f"does (got {packed[:len(expected) + 2]} and inputs {sorted(x)}; expected {expected}), so the "
            "response's positions are unknown. Use text_column (prompt and response joined in one column)."
        )


def token_ids(preprocessor, texts):
    """[[token id, ...], ...]: the tokenizer's ids of each text (it returns a ragged tensor or lists)."""
    ids = preprocessor.tokenizer(list(texts))
    ids = ids.to_list() if isinstance(ids, tf.RaggedTensor) else ids
    return [[int(t) for t in np.asarray(row).reshape(-1)] for row in ids]


def _common_prefix(a, b):
    n = 0
    for u, v in zip(a, b):
        if u != v:
            break
        n += 1
    return n


def _list(places):
    more = f" and {len(places) - _NAMED} more" if len(places) > _NAMED else ""
    return "; ".join(places[:_NAMED]) + more
