"""`inject` on GPT-2, BERT and Llama, on whichever Keras backend this process runs. tests/test_backends.py
runs this module with KERAS_BACKEND=tensorflow, jax and torch, in one pytest process per backend with
tests/layers and strategy.py (its name does not start with test_, so the main run does not collect it).

Per family (tiny random configs, hidden 16, 2 layers, vocabulary 256): exact at insertion, a few `fit`
steps that move only the adapters, the `.keras` round trip, and for the decoders `generate`: the neutral
control generates the base's tokens exactly, a strong control generates others.
"""

import keras
import keras_hub
import numpy as np
import pytest

from keras_biasinject import inject
from tests.rewrite.tiny_models import TINY, V  # the tiny configs every family test uses

FAMILIES = ["GPT2", "BERT", "Llama"]
BATCH, SEQ, PROMPT = 2, 8, 3  # generate: a 3-token prompt, 5 new tokens


def _numpy(x):
    return keras.ops.convert_to_numpy(x)


def _weights(model):
    return {w.path: _numpy(w) for w in model.weights}


class Run:
    """One family, built, injected and trained once for all the tests of this module."""

    def __init__(self, family):
        spec = TINY[family]
        backbone_name, kwargs, task_name = spec.backbone, spec.kwargs, spec.task
        extra = [name for name, kind in spec.inputs.items() if kind == "zeros"]  # BERT's segment_ids
        keras.utils.set_random_seed(0)
        backbone = getattr(keras_hub.models, backbone_name)(**kwargs)
        task_class = getattr(keras_hub.models, task_name)
        self.causal = issubclass(task_class, keras_hub.models.CausalLM)
        extra_args = {} if self.causal else {"num_classes": 2}
        self.task = task_class(backbone=backbone, preprocessor=None, **extra_args)
        rng = np.random.default_rng(0)
        self.x = {"token_ids": rng.integers(1, V, (BATCH, SEQ)).astype("int32"), "padding_mask": np.ones((BATCH, SEQ), "int32")}
        for name in extra:
            self.x[name] = np.zeros((BATCH, SEQ), "int32")
        self.labels = self.x["token_ids"] if self.causal else np.array([0, 1])
        self.control = np.full((BATCH, 1), 3.0, "float32")
        self.base_output = _numpy(self.task(self.x))
        self.base_weights = _weights(self.task)
        if self.causal:
            self.task.compile(sampler="greedy")
            self.base_generation = self.generate()
        self.task = inject(self.task, rank=2, control_dim=1, gate="control")
        self.injected_output = _numpy(self.task({**self.x, "control": self.control}))  # before any training
        self.adapters_before = {w.path: _numpy(w) for w in self.task.trainable_weights}
        extra_compile = {"sampler": "greedy"} if self.causal else {}
        self.task.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          **extra_compile)
        steered = {**self.x, "control": self.control}
        self.loss_before = self.loss(steered)
        self.history = self.task.fit(steered, self.labels, epochs=5, batch_size=BATCH, verbose=0).history
        self.loss_after = self.loss(steered)
        self.trained_weights = _weights(self.task)

    def loss(self, inputs):
        """The training loss without dropout (unlike fit's), eagerly: no compiled evaluate to trace."""
        logits = self.task(inputs, training=False)
        return float(_numpy(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(self.labels, logits)))

    def generate(self, **control):
        prompt = {"token_ids": self.x["token_ids"].copy(), "padding_mask": self.x["padding_mask"].copy()}
        prompt["padding_mask"][:, PROMPT:] = 0
        return _numpy(self.task.generate(prompt, stop_token_ids=None, **control)["token_ids"])


@pytest.fixture(scope="module")
def runs():
    return {}


@pytest.fixture(params=FAMILIES)
def run(request, runs):
    if request.param not in runs:
        runs[request.param] = Run(request.param)
    return runs[request.param]


def test_inject_is_exact_at_insertion(run):
    assert np.array_equal(run.injected_output, run.base_output)
    assert np.array_equal(_numpy(run.task({**run.x, "control": np.zeros((BATCH, 1), "float32")})), run.base_output)


def test_fit_moves_only_the_adapters(run):
    losses = run.history["loss"]
    assert len(losses) == 5 and all(np.isfinite(losses)), losses
    assert run.loss_after < run.loss_before, (run.loss_before, run.loss_after)
    for path, value in run.base_weights.items():
        assert np.array_equal(run.trained_weights[path], value), path
    moved = [p for p, v in run.adapters_before.items() if not np.array_equal(run.trained_weights[p], v)]
    assert any(p.endswith("lora_b") for p in moved) and any(p.endswith("control_kernel") for p in moved), moved
    neutral = _numpy(run.task({**run.x, "control": np.zeros((BATCH, 1), "float32")}))
    assert np.array_equal(neutral, run.base_output)  # trained, and still the base at the neutral control


def test_keras_file_round_trip(run, tmp_path):
    path = str(tmp_path / "model.keras")
    run.task.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is type(run.task)
    assert sorted(_weights(loaded)) == sorted(run.trained_weights)
    for key, value in _weights(loaded).items():
        assert np.array_equal(value, run.trained_weights[key]), key
    steered = {**run.x, "control": run.control}
    assert np.array_equal(_numpy(loaded(steered)), _numpy(run.task(steered)))
    assert np.array_equal(_numpy(loaded(run.x)), run.base_output)


@pytest.mark.parametrize("run", ["GPT2", "Llama"], indirect=True)
def test_generate_neutral_is_the_base_and_a_control_steers(run):
    assert np.array_equal(run.generate(control=np.zeros((BATCH, 1), "float32")), run.base_generation)
    assert np.array_equal(run.generate(), run.base_generation)
    steered = run.generate(control=np.full((BATCH, 1), 3.0, "float32"))
    assert np.array_equal(steered[:, :PROMPT], run.base_generation[:, :PROMPT])
    assert not np.array_equal(steered, run.base_generation)
