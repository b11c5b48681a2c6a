"""Tiny random configs of the KerasHub families `inject` covers (hidden 16, 2 layers; no downloads).

family -> (backbone class, constructor kwargs, extra inputs, task class); and helpers shared by the
rewrite tests (a 2-layer GPT-2, token batches, controls, weight snapshots).
"""

import keras
import keras_hub
import numpy as np


V = 256  # vocabulary
DECODER = dict(vocabulary_size=V, num_layers=2, hidden_dim=16, intermediate_dim=32)
GQA = dict(DECODER, num_query_heads=4, num_key_value_heads=2)
ENCODER = dict(vocabulary_size=V, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32, max_sequence_length=32)

TINY = {
    "GPT2": ("GPT2Backbone", dict(DECODER, num_heads=2, max_sequence_length=32), [], "GPT2CausalLM"),
    "OPT": ("OPTBackbone", dict(DECODER, num_heads=2, max_sequence_length=32), [], "OPTCausalLM"),
    "Llama": ("LlamaBackbone", GQA, [], "LlamaCausalLM"),
    "Llama3": ("Llama3Backbone", GQA, [], "Llama3CausalLM"),
    "Mistral": ("MistralBackbone", dict(GQA, sliding_window=32), [], "MistralCausalLM"),
    "Gemma": ("GemmaBackbone", dict(DECODER, num_query_heads=4, num_key_value_heads=1, head_dim=4), [], "GemmaCausalLM"),
    "Gemma3": ("Gemma3Backbone", dict(DECODER, num_query_heads=4, num_key_value_heads=1, head_dim=4, image_size=16, vision_encoder=None), [], "Gemma3CausalLM"),
    "Qwen": ("QwenBackbone", GQA, [], "QwenCausalLM"),
    "Qwen3": ("Qwen3Backbone", dict(GQA, head_dim=4), [], "Qwen3CausalLM"),
    "Phi3": ("Phi3Backbone", dict(GQA, max_sequence_length=32, pretraining_sequence_length=32), [], "Phi3CausalLM"),
    "BERT": ("BertBackbone", ENCODER, ["segment_ids"], "BertTextClassifier"),
    "DistilBERT": ("DistilBertBackbone", ENCODER, [], "DistilBertTextClassifier"),
    "RoBERTa": ("RobertaBackbone", ENCODER, [], "RobertaTextClassifier"),
}


VOCAB, SEQ, BATCH = 64, 8, 3


def gpt2(num_layers=2):
    keras.utils.set_random_seed(0)
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=num_layers, num_heads=2, hidden_dim=16, intermediate_dim=32, max_sequence_length=SEQ
    )


def tokens(seed=0, batch=BATCH):
    rng = np.random.default_rng(seed)
    return {"token_ids": rng.integers(1, VOCAB, (batch, SEQ)), "padding_mask": np.ones((batch, SEQ), "int32")}


def controls(control_dim=1, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(BATCH, control_dim)).astype("float32"), rng.normal(size=(BATCH, SEQ, control_dim)).astype("float32")]


def snapshot(model):
    return {w.path: keras.ops.convert_to_numpy(w) for w in model.weights}


def out(model, inputs):
    return keras.ops.convert_to_numpy(model(inputs))


def train(model, inputs, steps=3):
    extra = {"sampler": "greedy"} if isinstance(model, keras_hub.models.CausalLM) else {}
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), **extra)
    model.fit(inputs, inputs["token_ids"], epochs=steps, batch_size=BATCH, verbose=0)


def state_of(model):
    return (type(model), snapshot(model), [w.trainable for w in model.weights], [id(l) for l in model._flatten_layers()])
