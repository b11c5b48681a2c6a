"""Steering and forgetting with SmolLM2-135M. The judge is seed 0's classifier from `bench/quality.py` (trained here first if missing).

7. Steering: the LM recipe (control from the review label, +1 great / -1 other), then for controls
   -1, -0.5, 0, 0.5, 1 the share of 64 generated reviews the fine-tuned MiniLM judges positive; the
   neutral control's generations must equal the base model's.
8. Forgetting: perplexity on held-out Jane Austen paragraphs of the base model and of the injected
   model at the neutral control and at +/-1.
Run: python bench/steering.py  -> bench/results/steering.json, steering.png
(training and generation take about 10 minutes on 2 CPU cores; the run folder
bench/results/runs/steering is reused when it holds this recipe's finished run)

python bench/steering.py --quantize int8  -> steering_int8.json, steering_int8.png: the same recipe on
a backbone in Keras' int8 (`[model] quantize = "int8"`: the blocks int8, the token embedding, which is the
tied LM head, and the adapters float32). Each control's positive
share is set beside the float32 curve of steering.json and that curve's Wilson 95% interval
(64 generations a point). The base perplexity is the int8 base's (an int8 base cannot be merged).
About an hour on 2 CPU cores: int8 layers train and generate at about half fp32's speed here."""

import argparse
import json
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from steering_compare import wilson  # noqa: E402
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


def against_float(curve, samples):
    """Each control's share beside the float32 curve (steering.json) and its Wilson 95% interval."""
    path = RESULTS / "steering.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing: run `python bench/steering.py` (float32) first.")
    reference = json.loads(path.read_text())["steering"]
    if reference["controls"] != curve["controls"]:
        raise ValueError(f"steering.json has controls {reference['controls']}, this run {curve['controls']}; rerun both.")
    rows = []
    for control, share, fp32 in zip(curve["controls"], curve["positive_share"], reference["positive_share"]):
        low, high = wilson(round(fp32 * samples), samples)
        rows.append({"control": control, "int8": share, "fp32": fp32, "fp32_wilson_95": [low, high],
                     "within": low <= share <= high})
    return {"points": rows, "all_within": all(r["within"] for r in rows),
            "fp32_base_positive_share": reference["base_positive_share"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quantize", choices=["int8"], default=None, help="the backbone in Keras' int8 (steering_int8.json)")
    args = parser.parse_args()

    from keras_biasinject.data import load_dataset
    from keras_biasinject.recipes import finetune, load_recipe
    from keras_biasinject.recipes.run_folder import base_model, load_run_model
    from keras_biasinject.rewrite.merge import merge

    judge = RESULTS / "runs" / "quality-seed0-control"
    if not (judge / "classifier.keras").is_file():  # a fresh clone: train the judge as bench/quality.py does
        from quality import run_group

        run_group(0, "control")
    name = "steering" if args.quantize is None else f"steering_{args.quantize}"
    run = RESULTS / "runs" / name  # finetune reuses a finished run of the same recipe; delete it to retrain
    overrides = [("steer.judge", str(judge)), ("steer.samples", 64), ("steer.max_length", 32)]
    if args.quantize is not None:
        overrides.append(("model.quantize", args.quantize))
    recipe = load_recipe(os.path.join(ROOT, "recipes", "steer_reviews_lm.toml"), overrides)
    report = finetune(recipe, run, verbose=2)
    shutil.copy(run / "steering.png", RESULTS / f"{name}.png")

    _, lm = load_run_model(run)
    texts = [t.decode() if isinstance(t, bytes) else str(t) for t, _ in
             ((ex["text"].numpy(), None) for ex in load_dataset("jane_austen", "test").take(128))]
    ppl = perplexities(lm, texts, {"control 0 (neutral)": 0.0, "control +1": 1.0, "control -1": -1.0})
    base = merge(lm) if args.quantize is None else base_model(recipe)  # an int8 base cannot be merged: loaded afresh
    base.preprocessor = lm.preprocessor
    ppl["base model"] = perplexities(base, texts, {"base": None})["base"]
    data = {
        "lm": recipe.model.spec, "quantize": recipe.model.quantize, "train_examples": recipe.train.max_train_examples,
        "epochs": recipe.train.epochs, "results": report["results"], "steering": report["steering"],
        "austen_perplexity": ppl, "austen_paragraphs": len(texts), "sequence_length": recipe.model.sequence_length,
    }
    if args.quantize is not None:
        data["against_fp32"] = against_float(report["steering"], recipe.steer.samples)
    write(name, data)


if __name__ == "__main__":
    main()
