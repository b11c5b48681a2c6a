"""`control_from_examples`: a steering vector from contrastive examples, set as the control's own
weights, in seconds and without training.

Activation steering (CAA, ActAdd, "DiffMean" in AxBench, llama.cpp's `--control-vector`) adds the
difference between the mean activations on positive and on negative examples to a layer's output.
An injected model already has that hook: every adapter adds `(c - neutral) V` to the output of the
layer it wraps. `control_from_examples` runs the examples through the model at the neutral control,
takes the mean output of each adapted layer over the tokens of each example (padding excluded),
averages over examples, and sets

    V[dimension] = scale * (mean over positive examples - mean over negative examples)

so that a control of `neutral + a` in that dimension adds `a` times the difference of means to every
adapted layer's output (`a` is CAA's multiplier), per request and per example, and the neutral
control still gives the base model exactly. `fit` can refine the result: it is an ordinary warm start
of `V` (the LoRA factors of a `kind="lora_bias"` injection are left as they are).
"""

import keras
import numpy as np
from keras import ops

from keras_biasinject.layers.checks import check_positive_int
from keras_biasinject.rewrite.injected_model import InjectedModel
from keras_biasinject.rewrite.merge import splices_of


def _token_batches(model, examples, batch_size, what):
    """Token-input dicts of at most `batch_size` examples each, from texts or from token arrays."""
    if isinstance(examples, dict):
        if "token_ids" not in examples or "padding_mask" not in examples:
            raise ValueError(f"control_from_examples: `{what}` as token inputs needs `token_ids` and `padding_mask`. "
                             f"Got keys {sorted(examples)}.")
        arrays = {k: np.asarray(v) for k, v in examples.items()}
        n = len(arrays["token_ids"])
        return [{k: v[i:i + batch_size] for k, v in arrays.items()} for i in range(0, n, batch_size)], n
    if isinstance(examples, str) or not all(isinstance(t, str) for t in examples) or not examples:
        raise ValueError(f"control_from_examples: `{what}` must be a non-empty list of strings (or a dict of token "
                         f"inputs). Got {examples!r:.80}.")
    preprocessor = getattr(model, "preprocessor", None)
    if preprocessor is None:
        raise ValueError("control_from_examples: texts need the model's preprocessor, and this model has none. "
                         "Pass a task with a preprocessor, or token inputs ({'token_ids', 'padding_mask'}).")
    batches = []
    for i in range(0, len(examples), batch_size):
        out = preprocessor(list(examples[i:i + batch_size]))
        x = out[0] if isinstance(out, tuple) else out
        batches.append({k: ops.convert_to_numpy(v) for k, v in x.items()})
    return batches, len(examples)


def _example_means(y, mask, feature_rank):
    """`y` `[batch, (seq,) *features]` -> the mean over each example's tokens, `[batch, *features]`."""
    if y.ndim - feature_rank == 1:  # one vector per example already (no token axis)
        return y
    weights = mask.astype("float64").reshape(mask.shape + (1,) * (y.ndim - 2))
    return (y * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0)


def _mean_outputs(model, adapters, batches):
    """{id(adapter): the sum over examples of each example's mean output of the wrapped layer}."""
    sums = {id(a): 0.0 for a in adapters}
    current = {}

    def recording(adapter, call):
        def call_and_record(inputs, *args, **kwargs):
            current[id(adapter)] = ops.convert_to_numpy(adapter.projection.pre_activation(inputs)).astype("float64")
            return call(inputs, *args, **kwargs)

        return call_and_record

    for adapter in adapters:  # this instance only, for this function's duration
        adapter.call = recording(adapter, adapter.call)
    try:
        for x in batches:
            current.clear()
            model(x, training=False)  # eager: the neutral control (no `control` input)
            mask = np.asarray(x["padding_mask"]).astype(bool)
            for adapter in adapters:
                features = len(adapter.projection.feature_shape)
                sums[id(adapter)] = sums[id(adapter)] + _example_means(current[id(adapter)], mask, features).sum(axis=0)
    finally:
        for adapter in adapters:
            del adapter.call  # the class's method again
    return sums


def control_from_examples(model, positive, negative, *, scale=1.0, dimension=0, batch_size=8, name=None):
    """Sets the control weights `V` of every adapter of `model` to the difference of mean outputs of the
    layer it wraps between `positive` and `negative` examples (CAA's steering vector); returns `model`.

    Args:
        model: a model returned by `inject` (any kind; `kind="bias"` is the plain steering vector).
        positive, negative: lists of texts (tokenized by the model's preprocessor), or token inputs
            (`{"token_ids": [n, seq], "padding_mask": [n, seq]}`).
        scale: multiplies the difference: the control `neutral + a` adds `a * scale` differences.
        dimension: which control dimension the vector goes to (the other rows of `V` are kept), counted
            within the adapter's own part of the control.
        batch_size: examples per forward pass.
        name: the adapter to set, in a model holding several (`model.adapters`); required there.

    Example:
    >>> lm = inject(load("smollm2-135m", task="causal_lm"), kind="bias", targets="mlp")
    >>> control_from_examples(lm, ["I love this tea."], ["I hate this tea."])
    >>> lm.generate("This tea is", control=[4.0])     # CAA's multiplier 4, per request
    """
    if not isinstance(model, InjectedModel):
        raise ValueError("control_from_examples: the model has no adapters to hold a control; call "
                         "`inject(model, kind='bias', targets=...)` first.")
    adapters_by_name = model.adapters
    if name is None and len(adapters_by_name) > 1:
        raise ValueError(f"control_from_examples: this model holds several adapters {list(adapters_by_name)}; say which "
                         "one gets the steering vector with `name=`.")
    if name is not None and name not in adapters_by_name:
        raise ValueError(f"control_from_examples: no adapter named {name!r}; the model holds {list(adapters_by_name)}.")
    splices = splices_of(model, "control_from_examples", name if len(adapters_by_name) > 1 else None)
    dim = (adapters_by_name[name] if name is not None else model.injection).config.control_dim
    if isinstance(dimension, bool) or not isinstance(dimension, int) or not 0 <= dimension < dim:
        raise ValueError(f"control_from_examples: `dimension` must be an integer from 0 to {dim - 1} "
                         f"(control_dim={dim}). Got dimension={dimension!r}.")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale):
        raise ValueError(f"control_from_examples: `scale` must be a finite number. Got scale={scale!r}.")
    check_positive_int(batch_size, "batch_size", "control_from_examples")
    adapters = [adapter for _, adapter in splices]
    (pos_batches, n_pos), (neg_batches, n_neg) = (
        _token_batches(model, examples, batch_size, what)
        for examples, what in ((positive, "positive"), (negative, "negative"))
    )
    pos, neg = _mean_outputs(model, adapters, pos_batches), _mean_outputs(model, adapters, neg_batches)
    kernels = []
    for adapter in adapters:  # every value computed before any weight changes
        kernel = np.array(ops.convert_to_numpy(adapter.control_kernel))
        kernel[dimension] = scale * (pos[id(adapter)] / n_pos - neg[id(adapter)] / n_neg)
        kernels.append(kernel)
    if not all(np.all(np.isfinite(k)) for k in kernels):
        raise ValueError("control_from_examples: the examples gave non-finite activations; the model was not changed.")
    for adapter, kernel in zip(adapters, kernels):
        adapter.control_kernel.assign(kernel.astype(keras.backend.standardize_dtype(adapter.control_kernel.dtype)))
    return model
