"""Test-session set-up: keep Keras's config out of the user's home, quiet TensorFlow's C++ logs."""

import os
import tempfile

os.environ.setdefault("KERAS_HOME", tempfile.mkdtemp(prefix="kbi-keras-home-"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
