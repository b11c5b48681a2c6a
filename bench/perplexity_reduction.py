"""How much Keras' default loss reduction understated perplexity: the base SmolLM2 on 128 held-out
Jane Austen paragraphs at the steering recipe's sequence length, with the summed token losses divided
by every position (Keras' "sum_over_batch_size", which the steering benchmarks used before) and by the
real tokens only ("mean_with_sample_weight", what recipes and benchmarks use now).
Run: python bench/perplexity_reduction.py  -> bench/results/perplexity_reduction.json
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from timing import write  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    import keras
    import numpy as np

    from keras_biasinject import load
    from keras_biasinject.data import load_dataset
    from keras_biasinject.recipes import load_recipe
    from keras_biasinject.rewrite.kerashub import preprocessor_detached

    recipe = load_recipe(os.path.join(ROOT, "recipes", "steer_reviews_lm.toml"))
    lm = load(recipe.model.spec, task="causal_lm", sequence_length=recipe.model.sequence_length)
    texts = [ex["text"].numpy().decode() for ex in load_dataset("jane_austen", "test").take(128)]
    x, y, w = lm.preprocessor(texts)
    perplexity = {}
    for reduction in ("sum_over_batch_size", "mean_with_sample_weight"):
        lm.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction), metrics=None)
        with preprocessor_detached(lm):  # x is token ids already
            loss = lm.evaluate(dict(x), y, sample_weight=w, batch_size=16, verbose=0, return_dict=True)["loss"]
        perplexity[reduction] = math.exp(loss)
    write("perplexity_reduction", {
        "lm": recipe.model.spec, "austen_paragraphs": len(texts), "sequence_length": recipe.model.sequence_length,
        "real_token_share": float(np.mean(np.asarray(w))), "base_austen_perplexity": perplexity,
    })


if __name__ == "__main__":
    main()
