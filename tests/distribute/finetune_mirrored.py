"""`kbi finetune RECIPE --out OUT --strategy mirrored` over two logical CPU devices.

TensorFlow fixes its devices when it first initializes them, so this process splits the CPU into
two logical devices before anything else touches TensorFlow, then runs the real command line.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ["KERAS_BACKEND"] = "tensorflow"
    sys.path.insert(0, ROOT)
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from keras_biasinject.cli.main import main

    sys.exit(main(["finetune", sys.argv[1], "--out", sys.argv[2], "--strategy", "mirrored"]))
