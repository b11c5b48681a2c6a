"""A Ctrl-C swallowed by C code during `fit` (as h5py does mid-checkpoint) still stops training."""

import os
import signal
import time

import keras
import numpy as np
import pytest

from keras_biasinject.recipes.interrupt import interruptible


class SwallowedInterrupt(keras.callbacks.Callback):
    """Sends SIGINT to this process at batch 1 and swallows the KeyboardInterrupt, like Cython code
    that cannot pass exceptions on."""

    def on_train_batch_end(self, batch, logs=None):
        if batch == 1:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the handler runs here
            except KeyboardInterrupt:
                pass


def _fit(callbacks):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.ones((64, 4), "float32")
    model.fit(x, x[:, :1], batch_size=4, epochs=2, callbacks=callbacks, verbose=0)
    return model


def test_a_swallowed_interrupt_stops_at_the_next_batch():
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # Without it, training carries on to the end: the Ctrl-C is lost.
    assert int(_fit([SwallowedInterrupt()]).optimizer.iterations.numpy()) == 32
    with pytest.raises(KeyboardInterrupt):
        with interruptible() as stop:
            _fit([SwallowedInterrupt(), stop])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_an_interrupt_outside_training_is_unaffected():
    with interruptible() as stop:
        stop.check()  # nothing received: no error
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    with pytest.raises(KeyboardInterrupt):  # Python's own handler is back
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
