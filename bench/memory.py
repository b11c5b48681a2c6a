"""Peak memory of a training run: bias injection against full fine-tuning and KerasHub LoRA, each
in its own process (peak resident set size, which includes the TensorFlow runtime every method
pays alike). Run: python bench/memory.py  -> bench/results/memory.json"""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import write  # noqa: E402

CHILD = """
import os, resource, sys, json
sys.path.insert(0, {bench!r})
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras, numpy as np
from train_step import gpt2
from keras_biasinject import inject
method = sys.argv[1]
rng = np.random.default_rng(0)
x = {{"token_ids": rng.integers(1, 5000, (8, 128)).astype("int32"), "padding_mask": np.ones((8, 128), "int32")}}
y = rng.integers(1, 5000, (8, 128)).astype("int32")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = gpt2()
if method == "keras_lora":
    model.backbone.enable_lora(8)
elif method == "bias_injection":
    model = inject(model, rank=8)
    x["control"] = np.ones((8, 1), "float32")
model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
for _ in range(5):
    model.train_on_batch(x, y)
print(json.dumps({{"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_model_mb": before / 1024}}))
"""


def main():
    bench = os.path.dirname(os.path.abspath(__file__))
    rows = {}
    for method in ("full", "keras_lora", "bias_injection"):
        out = subprocess.run([sys.executable, "-c", CHILD.format(bench=bench), method], capture_output=True, text=True, check=True)
        rows[method] = json.loads(out.stdout.strip().splitlines()[-1])
        rows[method]["training_mb"] = rows[method]["peak_rss_mb"] - rows[method]["rss_before_model_mb"]
        print(method, rows[method])
    write("memory", {"model": "GPT2 4 layers, hidden 256, vocab 5000", "batch": 8, "sequence_length": 128, "runs": rows,
                     "ratio_training_mb_vs_full": rows["bias_injection"]["training_mb"] / rows["full"]["training_mb"]})


if __name__ == "__main__":
    main()
