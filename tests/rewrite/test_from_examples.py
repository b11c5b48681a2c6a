"""`control_from_examples`: the difference of means, by hand, on a tiny GPT-2; exact at neutral."""

import keras
import keras_hub
import numpy as np
import pytest

from keras_biasinject import control_from_examples, inject
from tests.rewrite.tiny_models import BATCH, SEQ, gpt2, tokens


def _examples(seed, lengths):
    x = tokens(seed, batch=len(lengths))
    for row, length in enumerate(lengths):  # padded examples of different lengths
        x["padding_mask"][row, length:] = 0
    return x


def _query_means_by_hand(backbone, x):
    """Block 0's query projection output, averaged over each example's tokens, then over examples."""
    emb = backbone.token_embedding(x["token_ids"])
    h = backbone.embeddings_add((emb, backbone.position_embedding(emb)))
    block = backbone.transformer_layers[0]
    q = keras.ops.convert_to_numpy(block._self_attention_layer._query_dense(block._self_attention_layer_norm(h)))
    mask = x["padding_mask"].astype("float64")[:, :, None, None]  # (B, T, 1, 1)
    per_example = (q.astype("float64") * mask).sum(axis=1) / mask.sum(axis=1)  # (B, heads, head_dim)
    return per_example.mean(axis=0)


def test_the_control_kernel_is_the_difference_of_means_and_neutral_stays_exact():
    backbone = gpt2()
    positive, negative = _examples(1, [SEQ, 5, 3]), _examples(2, [4, SEQ])
    expected = _query_means_by_hand(backbone, positive) - _query_means_by_hand(backbone, negative)
    probe = tokens(3)
    base = keras.ops.convert_to_numpy(backbone(probe))
    model = inject(backbone, kind="bias", targets=r".*transformer_layer_0/self_attention/query", control_dim=2)
    assert control_from_examples(model, positive, negative, scale=2.0, dimension=1, batch_size=2) is model
    (adapter,) = [layer for layer in model._flatten_layers() if hasattr(layer, "control_kernel")]
    kernel = keras.ops.convert_to_numpy(adapter.control_kernel)
    assert np.array_equal(kernel[0], np.zeros_like(kernel[0]))  # the other control dimension is untouched
    # float32 forward passes summed in float64: agreement to float32 rounding of the activations.
    np.testing.assert_allclose(kernel[1], 2.0 * expected, rtol=0, atol=1e-5)
    assert np.abs(kernel[1]).max() > 1e-2  # a real difference, not zeros
    neutral = keras.ops.convert_to_numpy(model({**probe, "control": np.zeros((BATCH, 2), "float32")}))
    assert np.array_equal(neutral, base)  # ==: the neutral control is the base model, bit for bit
    steered = keras.ops.convert_to_numpy(model({**probe, "control": np.array([[0.0, 1.0]] * BATCH, "float32")}))
    assert not np.allclose(steered, base, atol=1e-4)


def test_texts_through_the_preprocessor_and_a_warm_start_that_fit_refines():
    vocabulary = {"<|endoftext|>": 0, "a": 1, "b": 2, "c": 3, "Ġ": 4, "ab": 5, "Ġab": 6, "?": 7, "Ġc": 8}
    tokenizer = keras_hub.tokenizers.GPT2Tokenizer(vocabulary=vocabulary, merges=["a b", "Ġ ab", "Ġ c"])
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(tokenizer, sequence_length=SEQ)
    lm = inject(keras_hub.models.GPT2CausalLM(backbone=gpt2(), preprocessor=preprocessor), kind="bias", targets="mlp")
    control_from_examples(lm, ["ab ab ab", "ab c"], ["c c", "c ?"])
    start = [keras.ops.convert_to_numpy(v) for v in lm.trainable_weights]
    assert all(np.abs(v).max() > 0 for v in start)
    lm.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y, w = preprocessor(["ab c ab", "c c ?"])
    lm.preprocessor = None
    lm.fit({**x, "control": np.array([[1.0], [-1.0]], "float32")}, y, sample_weight=w, epochs=2, verbose=0)
    assert any(not np.array_equal(keras.ops.convert_to_numpy(v), s) for v, s in zip(lm.trainable_weights, start))


def test_bad_input_names_the_argument_and_changes_nothing():
    backbone = gpt2()
    x = tokens(0)
    with pytest.raises(ValueError, match=r"no adapters to hold a control; call `inject\(model, kind='bias'"):
        control_from_examples(backbone, x, x)
    model = inject(backbone, kind="bias", targets="mlp")
    before = [keras.ops.convert_to_numpy(v) for v in model.weights]
    cases = [
        (dict(positive=["a text"], negative=x), "texts need the model's preprocessor"),
        (dict(positive=[], negative=x), r"`positive` must be a non-empty list of strings"),
        (dict(positive=x, negative={"token_ids": x["token_ids"]}), r"`negative` as token inputs needs `token_ids` and `padding_mask`"),
        (dict(positive=x, negative=x, dimension=1), r"`dimension` must be an integer from 0 to 0 \(control_dim=1\). Got dimension=1"),
        (dict(positive=x, negative=x, scale=float("inf")), r"`scale` must be a finite number. Got scale=inf"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            control_from_examples(model, **kwargs)
    assert all(np.array_equal(keras.ops.convert_to_numpy(v), b) for v, b in zip(model.weights, before))
