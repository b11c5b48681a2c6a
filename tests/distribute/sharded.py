"""The sharded-training process for test_sharding.py: `python tests/distribute/sharded.py OUT`.

Runs on the JAX backend with two host devices (XLA_FLAGS=--xla_force_host_platform_device_count=2,
set here before JAX starts). Trains the same injected tiny Llama twice from the same weights on the
same batches: once unsharded, once under `model_parallel(LlamaBackbone, model_devices=2)`; writes
both runs' trainable weights and logits, and the sharding spec of every weight, to OUT (.npz + .json).
"""

import contextlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _spec(variable):
    """The mesh axis each dimension of `variable` is sharded over (None: whole)."""
    spec = list(getattr(variable.value.sharding, "spec", ()))  # a single-device sharding has no spec
    return spec + [None] * (len(variable.shape) - len(spec))


def main():
    out = sys.argv[1]
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.path.insert(0, ROOT)
    import jax
    import keras
    import keras_hub
    import numpy as np

    from keras_biasinject import inject
    from keras_biasinject.distribute.sharding import model_parallel

    assert len(jax.devices()) == 2, jax.devices()
    config = dict(vocabulary_size=64, num_layers=2, hidden_dim=16, intermediate_dim=32, num_query_heads=4,
                  num_key_value_heads=2)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):
        ids = rng.integers(1, 64, size=(4, 8)).astype("int32")
        batches.append(({"token_ids": ids, "padding_mask": np.ones_like(ids, bool),
                         "control": rng.normal(size=(4, 1)).astype("float32")}, ids))
    keras.utils.set_random_seed(0)
    start = keras_hub.models.LlamaBackbone(**config).get_weights()

    initial = {}  # the adapters' random initial values, from the first run, given to the second

    def run():
        backbone = keras_hub.models.LlamaBackbone(**config)
        backbone.set_weights(start)
        lm = inject(keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None), targets="all-linear", rank=2)
        for w in lm.trainable_weights:
            w.assign(initial.setdefault(w.path, keras.ops.convert_to_numpy(w)))
        lm.compile(optimizer=keras.optimizers.SGD(0.5), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        for x, y in batches:
            lm.train_on_batch(x, y)
        logits = keras.ops.convert_to_numpy(lm(batches[0][0]))
        weights = {w.path: keras.ops.convert_to_numpy(w) for w in lm.trainable_weights}
        specs = {w.path: _spec(w) for w in lm.weights}
        return logits, weights, specs

    plain_logits, plain, _ = run()
    with model_parallel(keras_hub.models.LlamaBackbone, model_devices=2).scope():
        sharded_logits, sharded, specs = run()
    # 3 heads do not divide over 2 devices: KerasHub's map would split them and fail; that axis stays whole.
    odd = dict(config, hidden_dim=18, num_query_heads=3, num_key_value_heads=3)
    keras.utils.set_random_seed(1)
    odd_weights = keras_hub.models.LlamaBackbone(**odd).get_weights()
    x = {k: v for k, v in batches[0][0].items() if k != "control"}
    outputs = []
    for distribution in (None, model_parallel(keras_hub.models.LlamaBackbone, model_devices=2)):
        with distribution.scope() if distribution else contextlib.nullcontext():
            backbone = keras_hub.models.LlamaBackbone(**odd)
            backbone.set_weights(odd_weights)
            backbone = inject(backbone, targets="all-linear", rank=2)
            outputs.append(keras.ops.convert_to_numpy(backbone({**x, "control": np.ones((4, 1), "float32")})))
    specs.update({f"odd:{w.path}": _spec(w) for w in backbone.weights})
    np.savez(out + ".npz", plain_logits=plain_logits, sharded_logits=sharded_logits, odd_plain=outputs[0], odd_sharded=outputs[1],
             **{f"plain:{k}": v for k, v in plain.items()}, **{f"sharded:{k}": v for k, v in sharded.items()})
    with open(out + ".json", "w") as f:
        json.dump({k: [a if a is None or isinstance(a, str) else list(a) for a in v] for k, v in specs.items()}, f, indent=1)


if __name__ == "__main__":
    main()
