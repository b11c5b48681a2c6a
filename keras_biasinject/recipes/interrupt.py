"""Ctrl-C during training that is never lost.

Python turns SIGINT into a KeyboardInterrupt at the next bytecode, wherever that is. When it lands
inside C or Cython code that cannot pass exceptions on (h5py writing a checkpoint, for example) it
is printed as "Exception ignored" and dropped, and training carries on as if nothing happened.
`interruptible()` records every SIGINT in a flag as well; its callback raises KeyboardInterrupt at
the next batch or epoch boundary if the first one was swallowed. Put it after the backup callback:
at an epoch's end the backup is written first, so the run resumes after that epoch. (One swallowed
after the last epoch's end lets the finished training complete; a second Ctrl-C stops as usual.)
"""

import contextlib
import signal
import threading

import keras


class StopOnInterrupt(keras.callbacks.Callback):
    """Raises KeyboardInterrupt at the next batch or epoch boundary once SIGINT has been received."""

    def __init__(self, flag):
        super().__init__()
        self.flag = flag

    def check(self, *args, **kwargs):
        if self.flag.is_set():
            raise KeyboardInterrupt

    on_train_batch_end = on_test_batch_end = on_epoch_end = check


@contextlib.contextmanager
def interruptible():
    """Inside: SIGINT raises KeyboardInterrupt as usual and is also remembered. Yields the callback.

    Only the main thread can handle signals, and only Python's default handler is replaced: a
    handler the caller installed is left alone."""
    flag = threading.Event()
    callback = StopOnInterrupt(flag)
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield callback
        return

    def handler(signum, frame):
        flag.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield callback
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
