"""`make_strategy(name)`: the `tf.distribute` strategy a recipe trains under, and batch arithmetic.

    "default"       one device (whatever TensorFlow picks): tf.distribute.get_strategy()
    "mirrored"      every local GPU (else every logical CPU device), one process: MirroredStrategy
    "multi-worker"  one process per machine, cluster from $TF_CONFIG: MultiWorkerMirroredStrategy()
    "tpu"           a Cloud TPU (name or grpc:// address from $TPU_NAME, default "local"): TPUStrategy
    "model-parallel" JAX backend only: keras.distribution.ModelParallel over every device as a
                    (batch, model) mesh, 2 devices on the model axis (an even device count is required),
                    the rest on the data axis; weights sharded by KerasHub's transformer layout
                    (distribute/sharding.py).
                    CPU hosts: XLA_FLAGS=--xla_force_host_platform_device_count=4 gives a 2 x 2 mesh.

The model, `inject` and the optimizer must all be created inside `strategy.scope()` (the recipe
does this). Batch sizes in recipes are GLOBAL: `batch_size = 16` on 2 workers x 2 GPUs means 4
examples per replica per step, and the same 16 examples per step as on one device, so a recipe
gives the same updates however many devices run it. `per_replica_batch` does the split and refuses
a global batch that does not divide evenly (uneven replicas would weight examples unequally).
"""

import json
import os

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi-worker", "tpu", "model-parallel")
TF_CONFIG_EXAMPLE = (
    'TF_CONFIG=\'{"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": {"type": "worker", "index": 0}}\''
)


def read_tf_config():
    """The cluster from $TF_CONFIG, checked: `(cluster dict, task type, task index)`."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise ValueError(
            "strategy='multi-worker' reads the cluster from the TF_CONFIG environment variable, which is not set. "
            f"Set it on every worker, with that worker's index, e.g. {TF_CONFIG_EXAMPLE}"
        )
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}). Got TF_CONFIG={text!r}; expected e.g. {TF_CONFIG_EXAMPLE}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    workers = cluster.get("worker") if isinstance(cluster, dict) else None
    if not isinstance(workers, list) or not workers or not isinstance(task, dict):
        raise ValueError(
            f"TF_CONFIG needs a 'cluster' with a non-empty 'worker' list and a 'task'. Got TF_CONFIG={text!r}; "
            f"expected e.g. {TF_CONFIG_EXAMPLE}"
        )
    kind, index = task.get("type"), task.get("index")
    members = cluster.get(kind)
    if not isinstance(members, list) or isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(members):
        raise ValueError(
            f"TF_CONFIG's task {task!r} is not a member of its cluster {cluster!r}: 'type' must be a key of 'cluster' "
            f"and 'index' an integer below the length of that list. Expected e.g. {TF_CONFIG_EXAMPLE}"
        )
    return cluster, kind, index


def make_strategy(name="default", tpu=None):
    """The strategy called `name` (one of STRATEGIES). `tpu`: TPU name or address for "tpu"
    (default: $TPU_NAME, else "local", a TPU VM's own chips). "model-parallel" returns a
    `keras.distribution.ModelParallel` (JAX only) with the same `scope()` and `num_replicas_in_sync`."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}. Got strategy={name!r}.")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "model-parallel":
        return model_parallel_strategy()
    if name == "mirrored":
        # Every GPU; without GPUs, every logical CPU device (tf.config.set_logical_device_configuration).
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == "multi-worker":
        read_tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    address = tpu or os.environ.get("TPU_NAME") or "local"
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except Exception as error:  # noqa: BLE001 - the resolver raises ValueError, URLError, OpError, ...
        raise ValueError(
            f"strategy='tpu': no TPU at tpu={address!r} ({type(error).__name__}: {error}). Run on a TPU VM "
            "(tpu='local'), or give the TPU's name or grpc://host:8470 address with TPU_NAME=..."
        ) from None
    return tf.distribute.TPUStrategy(resolver)


def model_parallel_strategy():
    """strategy="model-parallel": a `ModelParallel` over every device, 2 of them on the model axis."""
    import keras  # noqa: PLC0415 - only this strategy needs the Keras backend

    if keras.backend.backend() != "jax":
        raise ValueError(
            f"strategy='model-parallel' (kbi finetune --strategy model-parallel) shards with keras.distribution, which "
            f"only the JAX backend implements; the Keras backend is {keras.backend.backend()!r}, where every weight would "
            "silently stay whole on one device. Run with KERAS_BACKEND=jax (on CPU hosts also "
            "XLA_FLAGS=--xla_force_host_platform_device_count=4), or replicate with --strategy mirrored on TensorFlow."
        )
    from keras_hub.models import LlamaBackbone  # noqa: PLC0415 - its layout map names KerasHub's transformer weights

    from keras_biasinject.distribute.sharding import model_parallel  # noqa: PLC0415

    devices = keras.distribution.list_devices()
    if len(devices) % 2:
        raise ValueError(
            f"strategy='model-parallel' shards each weight over 2 devices of a (batch, model) mesh, but JAX sees "
            f"{len(devices)} device(s). Use an even number (on CPU hosts: XLA_FLAGS=--xla_force_host_platform_device_count=4), "
            "or --strategy default on one device."
        )
    return model_parallel(LlamaBackbone, model_devices=2, devices=devices)


def is_chief(strategy):
    """True on the worker that writes shared files (backups, reports): worker 0, or a lone process."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True
    kind, index = resolver.task_type, resolver.task_id
    return kind in (None, "chief") or (kind == "worker" and index == 0 and "chief" not in resolver.cluster_spec().as_dict())


def per_replica_batch(global_batch, strategy):
    """`global_batch / replicas`; raises unless it divides evenly."""
    replicas = strategy.num_replicas_in_sync
    if global_batch % replicas:
        raise ValueError(
            f"batch_size is the global batch and must divide evenly over the {replicas} replicas of this strategy. "
            f"Got batch_size={global_batch}; use a multiple of {replicas}, e.g. {replicas * max(1, round(global_batch / replicas))}."
        )
    return global_batch // replicas
