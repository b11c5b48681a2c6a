"""Tiny random configs of the KerasHub families `inject` covers (hidden 16, 2 layers; no downloads).

`TINY`: family -> `Family` (backbone class, constructor kwargs, inputs, task class, presets) for the
backbones A..L here, merged with `MORE` (M..Z) from `tiny_models_more.py`; `UNCOVERED`: backbone
class -> why `inject` cannot cover it. Also the helpers shared by the rewrite tests (a 2-layer GPT-2,
token batches, controls, weight snapshots).
"""

import keras
import keras_hub
import numpy as np

from tests.rewrite.family_spec import (  # noqa: F401  (V, SEGMENTS, ...: other tests import them from here)
    DECODER, ENCODER, GQA, NO_ATTENTION, NO_MLP, NO_QUERY_VALUE, SEGMENTS, SEQ2SEQ, TOKENS, V, Family,
)
from tests.rewrite.tiny_models_more import MORE, UNCOVERED_MORE  # the M..Z families



TINY = {
    "Albert": Family("AlbertBackbone", dict(ENCODER, embedding_dim=8, num_groups=2), SEGMENTS, "AlbertTextClassifier"),
    "Bart": Family("BartBackbone", ENCODER, SEQ2SEQ, "BartSeq2SeqLM"),
    "BERT": Family("BertBackbone", ENCODER, SEGMENTS, "BertTextClassifier"),
    "Bloom": Family("BloomBackbone", dict(DECODER, num_heads=2), TOKENS, "BloomCausalLM"),
    # DeBERTa runs its query and key projections on the relative-position buckets too: per-example controls only.
    "DebertaV3": Family("DebertaV3Backbone", dict(ENCODER, bucket_size=8), TOKENS, "DebertaV3TextClassifier", per_token=False),
    "DistilBERT": Family("DistilBertBackbone", ENCODER, TOKENS, "DistilBertTextClassifier"),
    "EdRec": Family(
        "EdRecBackbone", dict(vocab_size=V, num_layers_enc=2, num_layers_dec=2, hidden_dim=16, intermediate_dim=32, num_heads=2),
        SEQ2SEQ, "EdRecSeq2SeqLM",
    ),
    "Electra": Family(  # no task class in KerasHub 0.32: the backbone itself (fit regresses its pooled output)
        "ElectraBackbone",
        dict(vocab_size=V, num_layers=2, num_heads=2, hidden_dim=16, embedding_dim=8, intermediate_dim=32, max_sequence_length=32),
        SEGMENTS,
    ),
    "ESM": Family("ESMBackbone", ENCODER, {"token_ids": "tokens"}, "ESMProteinClassifier", presets=NO_QUERY_VALUE),
    "ESM2": Family("ESM2Backbone", ENCODER, {"token_ids": "tokens"}, "ESMProteinClassifier", presets=NO_QUERY_VALUE),
    "FNet": Family(
        "FNetBackbone", dict(vocabulary_size=V, num_layers=2, hidden_dim=16, intermediate_dim=32, max_sequence_length=32),
        {"token_ids": "tokens", "segment_ids": "zeros"}, "FNetTextClassifier", presets=NO_ATTENTION,
    ),
    "Falcon": Family("FalconBackbone", dict(DECODER, num_attention_heads=2), TOKENS, "FalconCausalLM"),
    "GPT2": Family("GPT2Backbone", dict(DECODER, num_heads=2, max_sequence_length=32), TOKENS, "GPT2CausalLM"),
    "GPTNeoX": Family(
        "GPTNeoXBackbone", dict(DECODER, num_heads=2, max_sequence_length=32), TOKENS, "GPTNeoXCausalLM", presets=NO_QUERY_VALUE
    ),
    "Gemma": Family("GemmaBackbone", dict(DECODER, num_query_heads=4, num_key_value_heads=1, head_dim=4), TOKENS, "GemmaCausalLM"),
    "Gemma3": Family(
        "Gemma3Backbone", dict(DECODER, num_query_heads=4, num_key_value_heads=1, head_dim=4, image_size=16, vision_encoder=None),
        TOKENS, "Gemma3CausalLM",
    ),
    "Gemma4": Family(
        "Gemma4Backbone", dict(DECODER, num_query_heads=4, num_key_value_heads=1, head_dim=4, image_size=16, sliding_window_size=8),
        dict(TOKENS, position_ids="positions"), "Gemma4CausalLM", presets=("query_value", "attention"),
    ),  # takes position ids; its blocks multiply by the feed-forward kernels directly, past any spliced layer
    "GptOss": Family("GptOssBackbone", dict(GQA, num_experts=2, top_k=1, head_dim=4), TOKENS, "GptOssCausalLM", presets=NO_MLP),
    "Llama": Family("LlamaBackbone", GQA, TOKENS, "LlamaCausalLM"),
    "Llama3": Family("Llama3Backbone", GQA, TOKENS, "Llama3CausalLM"),
}

VISION = "vision only: image backbone (convolutions or a ViT on pixels, no token inputs); inject targets text models"
UNCOVERED = {
    "BASNetBackbone": VISION,
    "BLIP2Backbone": "image-to-text: needs a vision encoder and a Q-Former for every call; inject targets text-only backbones",
    "CLIPBackbone": "image-text contrastive: needs pixels for every call; its blocks sit in vision and text sub-encoders",
    "CSPNetBackbone": VISION,
    "DFineBackbone": VISION,
    "DINOV2Backbone": VISION,
    "DINOV3Backbone": VISION,
    "DeepLabV3Backbone": VISION,
    "DeiTBackbone": VISION,
    "DenseNetBackbone": VISION,
    "DepthAnythingBackbone": VISION,
    "EfficientNetBackbone": VISION,
    "FeaturePyramidBackbone": "base class of vision backbones (feature pyramids of image models), not a model",
    "FluxBackbone": "image generation (diffusion transformer on latents and text embeddings), no token inputs",
    "HGNetV2Backbone": VISION,
    "Gemma3nBackbone": "KerasHub 0.32's own .keras round trip of Gemma3nCausalLM changes its output (the base model, "
                       "no injection), so the save/load guarantee cannot hold; not tested further",
}

TINY = {**TINY, **MORE}
UNCOVERED = {**UNCOVERED, **UNCOVERED_MORE}


AUDIO_SAMPLES = 1600  # raw audio: Moonshine's convolutions (strides 64, 3, 2) leave 2 frames


def build_family(family, seed=0):
    """The backbone of `TINY[family]` and, when the family has one, its task (preprocessor None)."""
    spec = TINY[family]
    keras.utils.set_random_seed(seed)
    backbone = getattr(keras_hub.models, spec.backbone)(**spec.kwargs)
    if spec.task is None:
        return backbone
    task_class = getattr(keras_hub.models, spec.task)
    if issubclass(task_class, (keras_hub.models.CausalLM, keras_hub.models.Seq2SeqLM)):
        return task_class(backbone=backbone, preprocessor=None)
    return task_class(backbone=backbone, preprocessor=None, num_classes=2)


def widest(family):
    """The preset `test_families`' family test uses (with fit, save and generate): `all-linear` where possible."""
    presets = TINY[family].presets
    return "all-linear" if "all-linear" in presets else presets[-1]


def takes_per_token(family):
    """Whether `TINY[family]` takes per-token controls: not encoder-decoders (their two sequences differ
    in length) nor families whose `per_token` is False (DeBERTa runs its projections on position buckets)."""
    spec = TINY[family]
    return spec.per_token and not any(name.startswith("encoder_") for name in spec.inputs)


def family_inputs(family, batch=2, seq=8, seed=0):
    """A batch of inputs for `TINY[family]`'s backbone: token ids in [1, V), masks of ones."""
    rng = np.random.default_rng(seed)
    make = {
        "tokens": lambda: rng.integers(1, V, (batch, seq)).astype("int32"),
        "mask": lambda: np.ones((batch, seq), "int32"),
        "zeros": lambda: np.zeros((batch, seq), "int32"),
        "positions": lambda: np.tile(np.arange(seq, dtype="int32"), (batch, 1)),
        "features": lambda: rng.normal(size=(batch, seq, TINY[family].kwargs.get("num_mels", 8))).astype("float32"),
        "audio": lambda: rng.normal(size=(batch, AUDIO_SAMPLES, 1)).astype("float32"),
        "audio_mask": lambda: np.ones((batch, AUDIO_SAMPLES), bool),
    }
    return {name: make[kind]() for name, kind in TINY[family].inputs.items()}


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
