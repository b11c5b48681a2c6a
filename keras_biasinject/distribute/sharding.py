"""Sharding a model too large for one device: `keras.distribution.ModelParallel`, JAX backend.

    distribution = model_parallel(keras_hub.models.LlamaBackbone, model_devices=8)
    with distribution.scope():                      # every weight is created sharded
        lm = keras_biasinject.load("smollm2-135m", task="causal_lm")
        lm = inject(lm, rank=8)                     # adapter weights follow their kernel's layout
        lm.compile(...); lm.fit(...)

The base weights are sharded by KerasHub's own `LayoutMap` for the backbone (`get_layout_map`:
Llama, Mistral-style Llama3, Gemma, Qwen...) or by a `LayoutMap` you pass. Adapter weights the map
does not name get the layout of the kernel they adapt, as each adapter class says
(`ControlAdapter.weight_layout`): `A` (the kernel's shape, last axis -> rank) is sharded like the
kernel's input axes, `B` (`[rank, out]`) like its last axis, the control kernel `V`
(`[control_dim, *features]`) like its feature axes; the rank and control axes are never sharded.
So `x A B` and `c V` need no more communication than the base projection `x K` does.

Only the JAX backend shards: on TensorFlow (and torch) Keras accepts a `ModelParallel` and then
silently keeps every weight whole on one device. `model_parallel`, `inject` and `finetune` raise
instead; for several devices on TensorFlow use
`make_strategy("mirrored" | "multi-worker" | "tpu")`, which replicates the model.
"""

import keras

from keras_biasinject.layers import adapter_weight


class AdapterModelParallel(keras.distribution.ModelParallel):
    """`ModelParallel` whose adapter weights, unless the `LayoutMap` names them, follow their kernel,
    and where an axis that does not divide over its mesh axis stays whole instead of failing (e.g.
    SmolLM2's 9 attention heads over 2 devices, which KerasHub's Llama map would split)."""

    @property
    def num_replicas_in_sync(self):
        """The size of the data axis: how many parts each global batch is split into (as tf.distribute names it)."""
        return dict(zip(self.device_mesh.axis_names, self.device_mesh.shape))[self.batch_dim_name]

    def get_variable_layout(self, variable):
        if getattr(variable, "_layout", None) is None and self._layout_map[variable.path] is None:
            derived = self._adapter_layout(variable)
            if derived is not None:
                return derived
        return self._divisible(super().get_variable_layout(variable), variable.shape)

    def _divisible(self, layout, shape):
        if not isinstance(layout, keras.distribution.TensorLayout) or len(layout.axes) != len(shape):
            return layout
        sizes = dict(zip(self.device_mesh.axis_names, self.device_mesh.shape))
        axes = [a if a is None or shape[i] % sizes[a] == 0 else None for i, a in enumerate(layout.axes)]
        return layout if list(axes) == list(layout.axes) else keras.distribution.TensorLayout(axes, self.device_mesh)

    def _adapter_layout(self, variable):
        found = adapter_weight(variable.path)  # (adapter class, weight name, kernel path) or None
        if found is None:
            return None
        adapter_class, weight, kernel_path = found
        kernel = self._layout_map[kernel_path]
        rank = len(variable.shape)
        axes = [None] * rank if kernel is None else adapter_class.weight_layout(weight, list(kernel.axes), rank)
        if len(axes) != rank:
            axes = [None] * rank
        return self._divisible(keras.distribution.TensorLayout(axes, self.device_mesh), variable.shape)


def model_parallel(layout, model_devices=None, devices=None, model_dim="model", batch_dim="batch"):
    """A `ModelParallel` distribution over `devices` (default: all) as a (batch, model) mesh.

    `layout`: a KerasHub backbone class with `get_layout_map` (e.g. `keras_hub.models.LlamaBackbone`)
    or a `keras.distribution.LayoutMap` (its mesh is used as is). `model_devices`: how many devices
    each weight is sharded over (default: all of them); the rest form the data-parallel axis."""
    if keras.backend.backend() != "jax":
        raise ValueError(
            f"model_parallel: keras.distribution shards weights only on the JAX backend; the backend is "
            f"{keras.backend.backend()!r}, where Keras would silently keep every weight whole on one device. "
            "Set KERAS_BACKEND=jax before importing Keras, or use make_strategy('mirrored' | 'multi-worker' | 'tpu') "
            "to replicate the model over several devices with tf.distribute."
        )
    if isinstance(layout, keras.distribution.LayoutMap):
        return AdapterModelParallel(layout_map=layout, batch_dim_name=batch_dim)
    if not hasattr(layout, "get_layout_map"):
        raise ValueError(
            f"model_parallel: layout={getattr(layout, '__name__', layout)!r} has no get_layout_map. Pass a KerasHub backbone "
            "class that has one (LlamaBackbone, Llama3Backbone, GemmaBackbone, QwenBackbone, ...) or your own "
            "keras.distribution.LayoutMap."
        )
    devices = list(devices or keras.distribution.list_devices())
    model_devices = len(devices) if model_devices is None else model_devices
    if isinstance(model_devices, bool) or not isinstance(model_devices, int) or model_devices < 1 or len(devices) % model_devices:
        raise ValueError(
            f"model_parallel: model_devices must be a positive integer dividing the {len(devices)} devices; got "
            f"model_devices={model_devices!r}. Use e.g. model_devices={len(devices)} (every weight over every device)."
        )
    mesh = keras.distribution.DeviceMesh((len(devices) // model_devices, model_devices), (batch_dim, model_dim), devices)
    layout_map = layout.get_layout_map(mesh, model_parallel_dim_name=model_dim, data_parallel_dim_name=batch_dim)
    return AdapterModelParallel(layout_map=layout_map, batch_dim_name=batch_dim)
