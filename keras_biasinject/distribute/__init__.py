"""Training on several devices, machines or a TPU (TensorFlow backend).

- `make_strategy(name)`: "default", "mirrored", "multi-worker" (from $TF_CONFIG) or "tpu"; on the JAX
  backend also "model-parallel" (`model_parallel` below over every device, 2 on the model axis).
- `per_replica_batch(global_batch, strategy)`: recipes give the global batch; this splits it.
- `keras_fixes()`: works around keras-team/keras#20329 and tensorflow/tensorflow#72388 so that
  `fit` runs under MultiWorkerMirroredStrategy; switches itself off once Keras is fixed.
- `fit_resumable(...)`: a fit that a killed job resumes exactly at its last step-level backup.
- `model_parallel(BackboneClass | LayoutMap, model_devices=N)`: a `keras.distribution.ModelParallel`
  that shards the base weights over N devices (JAX backend only) and lays adapters out like their
  kernels; on other backends, where Keras would silently not shard, it raises.
"""

from keras_biasinject.distribute.resume import StepBackup, fit_resumable
from keras_biasinject.distribute.sharding import AdapterModelParallel, model_parallel
from keras_biasinject.distribute.strategy import STRATEGIES, is_chief, make_strategy, per_replica_batch, read_tf_config
from keras_biasinject.distribute.workarounds import keras_fixes

__all__ = ["AdapterModelParallel", "STRATEGIES", "StepBackup", "fit_resumable", "is_chief", "keras_fixes", "make_strategy", "model_parallel", "per_replica_batch", "read_tf_config"]
