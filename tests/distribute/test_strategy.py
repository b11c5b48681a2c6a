"""make_strategy, TF_CONFIG checks, the global-batch split and the self-disabling Keras fixes (in-process, fast)."""

import json

import pytest
import tensorflow as tf

from keras_biasinject.distribute import keras_fixes, make_strategy, per_replica_batch, read_tf_config
from keras_biasinject.distribute import workarounds


def test_default_is_the_current_strategy_and_unknown_names_are_refused():
    assert make_strategy("default") is tf.distribute.get_strategy()
    with pytest.raises(ValueError, match=r"strategy must be one of \['default', 'mirrored', 'multi-worker', 'tpu', 'model-parallel'\]. Got strategy='gpu'"):
        make_strategy("gpu")


@pytest.mark.parametrize("value, match", [
    (None, "TF_CONFIG environment variable, which is not set"),
    ("{not json", "TF_CONFIG is not valid JSON"),
    (json.dumps({"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}), "non-empty 'worker' list"),
    (json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}), "is not a member of its cluster"),
])
def test_multi_worker_needs_a_valid_tf_config(monkeypatch, value, match):
    if value is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", value)
    with pytest.raises(ValueError, match=match) as error:
        make_strategy("multi-worker")
    assert '"task": {"type": "worker", "index": 0}' in str(error.value)  # every message shows an example


def test_a_valid_tf_config_is_read(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}))
    assert read_tf_config() == ({"worker": ["a:1", "b:2"]}, "worker", 1)


def test_tpu_without_a_tpu_is_a_clear_error():
    with pytest.raises(ValueError, match=r"strategy='tpu': no TPU at tpu='kbi-no-such-tpu'.*TPU_NAME"):
        make_strategy("tpu", tpu="kbi-no-such-tpu")


def test_batch_size_is_global_and_must_divide_over_replicas():
    class Two:
        num_replicas_in_sync = 2

    assert per_replica_batch(16, Two()) == 8
    with pytest.raises(ValueError, match=r"divide evenly over the 2 replicas.*Got batch_size=15; use a multiple of 2"):
        per_replica_batch(15, Two())


def test_keras_fixes_apply_only_to_the_faulty_keras_code_and_are_undone():
    from keras.src.backend.tensorflow import trainer

    before = trainer.TensorFlowTrainer.__dict__["_maybe_symbolic_build"], trainer.reduce_per_replica
    # Keras 3.15 still has both bugs; when this fails, upstream changed the code: check the issues
    # (keras-team/keras#20329, tensorflow/tensorflow#72388) and drop the fix that no longer applies.
    assert workarounds.needs_fix_20329() and workarounds.needs_fix_72388()
    with keras_fixes() as patched:
        assert patched == ["_maybe_symbolic_build", "reduce_per_replica"]
        assert trainer.reduce_per_replica is not before[1]
    assert (trainer.TensorFlowTrainer.__dict__["_maybe_symbolic_build"], trainer.reduce_per_replica) == before


def test_keras_fixes_switch_off_once_the_faulty_code_is_gone(monkeypatch):
    from keras.src.backend.tensorflow import trainer

    monkeypatch.setattr(workarounds, "_BUG_20329", "code a fixed Keras no longer has")
    monkeypatch.setattr(workarounds, "_BUG_72388", "code a fixed Keras no longer has")
    original = trainer.reduce_per_replica
    with keras_fixes() as patched:
        assert patched == [] and trainer.reduce_per_replica is original
