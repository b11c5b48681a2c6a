"""Steering and forgetting with SmolLM2-135M. The judge is seed 0's classifier from `bench/quality.py` (trained here first if missing).

7. Steering: the LM recipe (control from the review label, +1 great / -1 other), then for controls
   -1, -0.5, 0, 0.5, 1 the share of 64 generated reviews the fine-tuned MiniLM judges positive; the
   neutral control's generations must equal the base model's.
8. Forgetting: perplexity on held-out Jane Austen paragraphs of the base model and of the injected
   model at the neutral control and at +/-1.
Run: python bench/steering.py  -> bench/results/steering.json, steering.png
(training and generation take about 10 minutes on 2 CPU cores; the run folder
bench/results/runs/steering is reused when it holds this recipe's finished run)"""

import math
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import RESULTS, write  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def perplexities(lm, texts, controls):
    import keras
    import numpy as np

    from keras_biasinject.rewrite.kerashub import preprocessor_detached

    x, y, w = lm.preprocessor(texts)
    lm.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight"), metrics=None)
    out = {}
    with preprocessor_detached(lm):  # x is token ids already
        for name, value in controls.items():
            inputs = dict(x) if value is None else {**x, "control": np.full((len(texts), 1), value, "float32")}
            loss = lm.evaluate(inputs, y, sample_weight=w, batch_size=16, verbose=0, return_dict=True)["loss"]
            out[name] = math.exp(loss)
    return out


def main():
    from keras_biasinject.data import load_dataset
    from keras_biasinject.recipes import finetune, load_recipe
    from keras_biasinject.recipes.run_folder import load_run_model
    from keras_biasinject.rewrite.merge import merge

    judge = RESULTS / "runs" / "quality-seed0-control"
    if not (judge / "classifier.keras").is_file():  # a fresh clone: train the judge as bench/quality.py does
        from quality import run_group

        run_group(0, "control")
    run = RESULTS / "runs" / "steering"  # finetune reuses a finished run of the same recipe; delete it to retrain
    recipe = load_recipe(os.path.join(ROOT, "recipes", "steer_reviews_lm.toml"), [
        ("steer.judge", str(judge)), ("steer.samples", 64), ("steer.max_length", 32),
    ])
    report = finetune(recipe, run, verbose=2)
    shutil.copy(run / "steering.png", RESULTS / "steering.png")

    _, lm = load_run_model(run)
    texts = [t.decode() if isinstance(t, bytes) else str(t) for t, _ in
             ((ex["text"].numpy(), None) for ex in load_dataset("jane_austen", "test").take(128))]
    ppl = perplexities(lm, texts, {"control 0 (neutral)": 0.0, "control +1": 1.0, "control -1": -1.0})
    base = merge(lm)
    base.preprocessor = lm.preprocessor
    ppl["base model"] = perplexities(base, texts, {"base": None})["base"]
    write("steering", {
        "lm": recipe.model.spec, "train_examples": recipe.train.max_train_examples, "epochs": recipe.train.epochs,
        "results": report["results"], "steering": report["steering"], "austen_perplexity": ppl,
        "austen_paragraphs": len(texts), "sequence_length": recipe.model.sequence_length,
    })


if __name__ == "__main__":
    main()
