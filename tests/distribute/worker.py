"""One training process for the distribution tests: `python tests/distribute/worker.py OUT MODE [...]`.

MODE: "single" (one device), "mirrored" (two logical CPU devices, one process) or "multi-worker"
(this process is worker INDEX of the cluster on 127.0.0.1:PORTS). Every mode trains the same
injected 2-layer GPT-2 on the same 32 examples, global batch 4 (8 steps per epoch), 2 epochs, no
shuffling, and writes its trainable weights to OUT (.npz, keyed by weight path).
`--backup DIR --save-freq N` trains through `fit_resumable`; `--stall-after K` makes worker 1 write
OUT.stalled after step K and sleep, so that the test can SIGKILL it there.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GLOBAL_BATCH, EXAMPLES, EPOCHS = 4, 32, int(os.environ.get("KBI_TEST_EPOCHS", 2))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("mode", choices=["single", "mirrored", "multi-worker"])
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--ports", default="")
    parser.add_argument("--backup")
    parser.add_argument("--save-freq", type=int, default=3)
    parser.add_argument("--stall-after", type=int)
    args = parser.parse_args()
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ["KERAS_BACKEND"] = "tensorflow"
    if args.mode == "multi-worker":
        workers = [f"127.0.0.1:{p}" for p in args.ports.split(",")]
        os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": args.index}})
    sys.path.insert(0, ROOT)
    import tensorflow as tf

    if args.mode == "mirrored":  # before anything initializes the devices
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import keras_hub
    import numpy as np

    from keras_biasinject import inject
    from keras_biasinject.distribute import fit_resumable, is_chief, keras_fixes, make_strategy
    from tests.rewrite.tiny_models import SEQ, VOCAB, tokens

    def gpt2():  # tiny_models.gpt2 without dropout: random masks would differ between devices
        keras.utils.set_random_seed(0)
        return keras_hub.models.GPT2Backbone(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16,
                                             intermediate_dim=32, max_sequence_length=SEQ, dropout=0.0)

    strategy = make_strategy({"single": "default"}.get(args.mode, args.mode))
    with strategy.scope():
        lm = inject(keras_hub.models.GPT2CausalLM(backbone=gpt2(), preprocessor=None), rank=2)
        lm.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = tokens(seed=3, batch=EXAMPLES)
    x["control"] = np.random.default_rng(4).normal(size=(EXAMPLES, 1)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, x["token_ids"])).batch(GLOBAL_BATCH)
    if args.mode == "multi-worker":  # each worker takes its slice of every global batch
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        ds = ds.with_options(options)
    started = []  # the step count at the first train begin: 0, or the step restored from a backup
    callbacks = [keras.callbacks.LambdaCallback(on_train_begin=lambda logs: started.append(int(lm.optimizer.iterations.numpy())))]
    if args.stall_after is not None and args.index == 1:
        def stall(batch, logs):
            if int(lm.optimizer.iterations.numpy()) == args.stall_after:
                open(args.out + ".stalled", "w").close()
                time.sleep(600)

        callbacks.append(keras.callbacks.LambdaCallback(on_train_batch_end=stall))
    with keras_fixes():
        if args.backup:
            fit_resumable(lm, ds, EPOCHS, args.backup, args.save_freq, chief=is_chief(strategy), callbacks=callbacks, verbose=0)
        else:
            lm.fit(ds, epochs=EPOCHS, callbacks=callbacks, verbose=0)
    np.savez(args.out, started=started[0], steps=int(lm.optimizer.iterations.numpy()), **{w.path: keras.ops.convert_to_numpy(w) for w in lm.trainable_weights})


if __name__ == "__main__":
    main()
