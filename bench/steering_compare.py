"""Steering compared with what users pick instead, side by side on SmolLM2-135M-Instruct.

Every method continues the same prompts (the first 4 words of held-out Fine Food reviews) with the
same decoding (greedy, the same number of new tokens), and one judge scores every text: seed 0's
MiniLM review classifier from `bench/quality.py` (trained here first if missing), never the model
being steered. For each point: the share judged positive with a Wilson 95% interval, fluency (the
perplexity of the generated text under the base model), repetition (distinct-2 of the
continuations) and forgetting (perplexity of held-out Jane Austen paragraphs with the intervention on).

Methods:
1. base: the untouched model.
2. prompting: an instruction through the chat template ("positive", "negative", and a neutral one).
3. steering vector: the difference of mean activations between 64 positive and 64 negative training
   reviews, added to one middle layer's MLP output (block 15 of 30) at a sweep of multipliers, made
   with `control_from_examples` on a `kind="bias"` injection (no training).
4. two KerasHub `enable_lora` adapters with the recipe's rank and targets, one trained on positive
   reviews only and one on negative reviews only, 64 steps each (the pair together: ours' 128 steps).
5. ours: `recipes/steer_reviews_strong.toml` at controls -2..2 (the trained range is -1..1), and our
   control from examples without training (the recipe's injection, V set by `control_from_examples`).

Run: python bench/steering_compare.py  -> bench/results/steering_compare.json, steering_compare.png
(about two hours on 2 shared CPU cores, 10 s per training step of the recipe; trained runs and finished points are kept in
bench/results/runs/steering_compare and reused; --fresh starts over)
"""

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import RESULTS, write  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = RESULTS / "runs" / "steering_compare"
PROMPT_WORDS = 4  # each prompt: the first words of a held-out review
NEW_TOKENS = 32  # tokens generated after every prompt, for every method
EXAMPLES_PER_SIDE = 64  # contrastive reviews for the steering vectors
SV_BLOCK = 15  # the middle block of 30, where CAA-style vectors are usually added
SV_MULTIPLIERS = (-32.0, -16.0, -8.0, 8.0, 16.0, 32.0)  # x32 starts to break the text; x8 is the fluent end of the sweep
OURS_CONTROLS = (-2.0, -1.0, 0.0, 1.0, 2.0)  # trained on -1 and +1
FROM_EXAMPLES_CONTROLS = (-0.5, 0.5)  # 210 layers each shifted: smaller multipliers
INSTRUCTIONS = {
    "positive": "Continue this food review. The reviewer loved the product: write an enthusiastic, positive review.",
    "negative": "Continue this food review. The reviewer disliked the product: write a disappointed, negative review.",
    "none": "Continue this food review.",
}


def wilson(k, n, z=1.96):
    """The Wilson score 95% interval of k successes in n trials."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def distinct_2(continuations):
    """Distinct bigrams over all bigrams of the continuations' words (1.0: no repetition)."""
    bigrams = [tuple(words[i:i + 2]) for text in continuations for words in [text.split()] for i in range(len(words) - 1)]
    return len(set(bigrams)) / max(len(bigrams), 1)


def chat(instruction, prompt):
    """SmolLM2-Instruct's chat template with the review's first words opening the answer."""
    return f"<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n{prompt}"


def load_judge():
    """Seed 0's MiniLM review classifier from bench/quality.py (trained first on a fresh clone)."""
    import keras

    judge = RESULTS / "runs" / "quality-seed0-control"
    if not (judge / "classifier.keras").is_file():
        from quality import run_group

        run_group(0, "control")
    return keras.models.load_model(judge / "classifier.keras")


class Bench:
    def __init__(self, samples, work):
        import keras_biasinject as kbi
        from keras_biasinject.data.pipeline import DataConfig, read_examples

        self.kbi = kbi
        data = DataConfig("small_fine_foods", text_column="review", label_column="label",
                          control_map={"great": 1.0, "other": -1.0})
        texts, _, _ = read_examples(data, "test")
        self.prompts = [" ".join(str(t).split()[:PROMPT_WORDS]) for t in texts[:samples]]
        train, _, labels = read_examples(data, "train[:90%]")
        names = data.class_names
        self.positive = [str(t) for t, c in zip(train, labels) if names[c] == "great"]
        self.negative = [str(t) for t, c in zip(train, labels) if names[c] == "other"]
        self.work = work
        austen = kbi.load_dataset("jane_austen", "test").take(min(128, 8 * samples))
        self.austen = [ex["text"].numpy().decode() for ex in austen]
        self.judge = self._judge()
        self.base = self.fresh_lm()
        self.points = json.loads((work / "points.json").read_text()) if (work / "points.json").is_file() else {}

    def _judge(self):
        return load_judge()

    def fresh_lm(self):
        import keras

        lm = self.kbi.load("smollm2-135m", task="causal_lm", sequence_length=64)
        lm.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight"), metrics=None, sampler="greedy")
        return lm

    # Measurements.

    def generate(self, lm, inputs, control=None):
        """Continuations of `inputs` (texts), NEW_TOKENS each, greedy."""
        longest = max(len(lm.preprocessor.tokenizer(t)) for t in inputs)
        kwargs = {} if control is None else {"control": [float(control)]}
        out = lm.generate(inputs, max_length=longest + NEW_TOKENS, strip_prompt=True, **kwargs)
        return [str(t) for t in out]

    def perplexity(self, lm, texts, control=None):
        import numpy as np

        from keras_biasinject.rewrite.kerashub import preprocessor_detached

        x, y, w = lm.preprocessor(texts)
        inputs = dict(x) if control is None else {**x, "control": np.full((len(texts), 1), control, "float32")}
        with preprocessor_detached(lm):  # x is token ids already
            loss = lm.evaluate(inputs, y, sample_weight=w, batch_size=32, verbose=0, return_dict=True)["loss"]
        return math.exp(loss)

    def point(self, name, lm, inputs=None, control=None, austen=True):
        """Generates, judges and measures one point (kept in points.json, so a rerun skips it)."""
        from keras_biasinject.recipes.steering import positive_share

        if name in self.points:
            return self.points[name]
        continuations = self.generate(lm, inputs or self.prompts, control)
        texts = [p + c for p, c in zip(self.prompts, continuations)]
        share = positive_share(self.judge, texts, positive_label=0)
        k = round(share * len(texts))
        self.points[name] = {
            "share_positive": share, "wilson_95": wilson(k, len(texts)), "n": len(texts),
            "fluency_perplexity": self.perplexity(self.base, texts),
            "distinct_2": distinct_2(continuations),
            "austen_perplexity": self.perplexity(lm, self.austen, control) if austen else None,
            "texts_sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest(),
            "examples": texts[:3],
        }
        (self.work / "points.json").write_text(json.dumps(self.points, indent=2))
        print(name, json.dumps({k: v for k, v in self.points[name].items() if k != "examples"}), flush=True)
        return self.points[name]


def train_ours(bench, recipe):
    """The stronger recipe's bias injection (trained once; the run folder is reused)."""
    import keras

    from keras_biasinject.recipes import finetune
    from keras_biasinject.recipes.run_folder import load_run_model

    report = finetune(recipe, bench.work / "ours", verbose=2)
    _, lm = load_run_model(bench.work / "ours")
    lm.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight"), metrics=None, sampler="greedy")
    return report, lm


def train_lora(bench, recipe, side, texts):
    """KerasHub's LoRA at the recipe's rank and targets, trained on one side's reviews only."""
    import keras

    from keras_biasinject.recipes.methods import prepare_keras_lora
    from keras_biasinject.recipes.run_folder import base_model

    folder = bench.work / f"lora_{side}"
    weights = folder / "adapter.lora.h5"
    side_recipe = _side_recipe(recipe, folder, texts)
    if not weights.is_file():
        from keras_biasinject.recipes.finetune import run_method

        rows, _, lm = run_method(side_recipe, "keras_lora", folder, verbose=2)
        lm.backbone.save_lora_weights(str(weights))
        (folder / "rows.json").write_text(json.dumps(rows, indent=2))
    lm = prepare_keras_lora(base_model(side_recipe), side_recipe)
    lm.backbone.load_lora_weights(str(weights))
    lm.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight"), metrics=None, sampler="greedy")
    return lm


def _side_recipe(recipe, folder, texts):
    """The recipe with its data replaced by one side's reviews: 64 steps of 8 to train, 64 to validate."""
    from keras_biasinject.recipes import Recipe

    folder.mkdir(parents=True, exist_ok=True)
    n = recipe.train.max_train_examples // 2
    files = {"train": (folder / "train.csv", texts[:n]), "validation": (folder / "validation.csv", texts[n:n + 64])}
    for path, rows in files.values():
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["review", "label"])
            writer.writerows([t, "side"] for t in rows)
    splits = {"train": str(files["train"][0]), "validation": str(files["validation"][0]), "test": str(files["validation"][0])}
    fields = recipe.to_dict()
    fields["data"] = {"source": splits["train"], "text_column": "review", "label_column": "label",
                      "control_map": {"side": 1.0}, "splits": splits}
    fields["train"] = {**fields["train"], "max_train_examples": None, "max_eval_examples": None, "methods": ["keras_lora"]}
    return Recipe(**fields)


def run_points(bench, recipe):
    """Every method's points, cheapest first."""
    from keras_biasinject import control_from_examples, inject

    bench.point("base", bench.base)
    for key, instruction in INSTRUCTIONS.items():
        bench.point(f"prompt: {key}", bench.base, [chat(instruction, p) for p in bench.prompts], austen=False)
    side = EXAMPLES_PER_SIDE
    sv = inject(bench.fresh_lm(), kind="bias", targets=["feedforward_output_dense"], blocks=[SV_BLOCK])
    control_from_examples(sv, bench.positive[:side], bench.negative[:side], batch_size=16)
    for m in SV_MULTIPLIERS:
        bench.point(f"steering vector x{m:+g}", sv, control=m)
    del sv
    fe = inject(bench.fresh_lm(), recipe.inject)
    control_from_examples(fe, bench.positive[:side], bench.negative[:side], batch_size=16)
    for c in FROM_EXAMPLES_CONTROLS:
        bench.point(f"ours from examples {c:+g}", fe, control=c)
    del fe
    report, ours = train_ours(bench, recipe)
    for c in OURS_CONTROLS:
        bench.point(f"ours {c:+g}", ours, control=c)
    del ours
    for side_name, texts in (("positive", bench.positive), ("negative", bench.negative)):
        bench.point(f"LoRA {side_name}", train_lora(bench, recipe, side_name, texts))
    return report


def family(name):
    for prefix in ("steering vector", "ours from examples", "ours"):
        if name.startswith(prefix):
            return prefix
    return name


def goals(points):
    """The issue's goals, read off the points (shares within the fluency limit only)."""
    base = points["base"]["fluency_perplexity"]
    fluent = {n: p for n, p in points.items() if p["fluency_perplexity"] <= 1.2 * base}

    def span(fam):
        shares = [p["share_positive"] for n, p in fluent.items() if family(n) == fam]
        return [min(shares), max(shares)] if shares else [None, None]

    def swing(pair):
        return None if pair[0] is None else pair[1] - pair[0]

    ours, examples, vector = span("ours"), span("ours from examples"), span("steering vector")
    prompt_swing = points["prompt: positive"]["share_positive"] - points["prompt: negative"]["share_positive"]
    return {
        "base_fluency_perplexity": base,
        "fluency_limit": 1.2 * base,
        "ours_span_within_fluency_limit": ours,
        "ours_spans_0.2_to_0.8": ours[0] is not None and ours[0] <= 0.2 and ours[1] >= 0.8,
        "ours_from_examples_span_within_fluency_limit": examples,
        "steering_vector_span_within_fluency_limit": vector,
        "ours_swing": swing(ours),
        "ours_from_examples_swing": swing(examples),
        "steering_vector_swing": swing(vector),
        "prompting_swing": prompt_swing,
        "ours_swing_at_least_prompting": ours[0] is not None and swing(ours) >= prompt_swing,
        "ours_neutral_equals_base": "ours +0" in points and points["ours +0"]["texts_sha256"] == points["base"]["texts_sha256"],
    }


def _setting(name):
    """The control or multiplier a point's name ends with ("ours -1" -> -1.0), else 0."""
    tail = name.rsplit(" ", 1)[-1].lstrip("x")
    try:
        return float(tail)
    except ValueError:
        return 0.0


def plot(points, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = points["base"]["fluency_perplexity"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    curves = {}
    for name, p in points.items():
        curves.setdefault(family(name), []).append((p["fluency_perplexity"] / base, p["share_positive"], p["wilson_95"], name))
    for fam, rows in curves.items():
        rows.sort(key=lambda r: _setting(r[3]))  # a curve runs along its sweep, most negative setting first
        xs, ys = [r[0] for r in rows], [r[1] for r in rows]
        err = [[y - r[2][0] for y, r in zip(ys, rows)], [r[2][1] - y for y, r in zip(ys, rows)]]
        ax.errorbar(xs, ys, yerr=err, fmt="-o" if len(rows) > 1 else "s", capsize=3, label=fam, alpha=0.85)
        if len(rows) > 1:
            for x, y, r in zip(xs, ys, rows):
                ax.annotate(f"{_setting(r[3]):+g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)
    ax.axvline(1.2, color="grey", linestyle=":", label="fluency limit (1.2x base)")
    ax.axhline(0.2, color="lightgrey", linestyle="--")
    ax.axhline(0.8, color="lightgrey", linestyle="--")
    ax.set_xscale("log")
    ax.set_xlabel("perplexity of the generations under the base model / the base's own (log)")
    ax.set_ylabel("share judged positive (Wilson 95%)")
    ax.set_ylim(0, 1)
    ax.set_title("Steering SmolLM2-135M: sentiment against fluency")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def expected_points():
    """Every point `run_points` measures, by name."""
    return (["base"] + [f"prompt: {k}" for k in INSTRUCTIONS] + [f"steering vector x{m:+g}" for m in SV_MULTIPLIERS]
            + [f"ours from examples {c:+g}" for c in FROM_EXAMPLES_CONTROLS] + [f"ours {c:+g}" for c in OURS_CONTROLS]
            + ["LoRA positive", "LoRA negative"])


def write_results(name, points, extra):
    """The JSON (with the points not measured yet named) and the plot, from the points measured."""
    plot(points, RESULTS / f"{name}.png")
    missing = [p for p in expected_points() if p not in points]
    write(name, {**extra, "missing_points": missing, "goals": goals(points), "points": points})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=128, help="prompts (generations per point)")
    parser.add_argument("--fresh", action="store_true", help="retrain and regenerate everything")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 8 prompts, 2 training steps, nothing kept")
    parser.add_argument("--write-partial", action="store_true",
                        help="write the JSON and plot from the points measured so far (the missing ones are listed)")
    args = parser.parse_args()
    work = WORK.with_name(WORK.name + "_quick") if args.quick else WORK
    if args.fresh or args.quick:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    from keras_biasinject.recipes import load_recipe

    quick = [("train.max_train_examples", 16), ("train.max_eval_examples", 8)] if args.quick else []
    recipe = load_recipe(os.path.join(ROOT, "recipes", "steer_reviews_strong.toml"), quick)
    name = "steering_compare_quick" if args.quick else "steering_compare"
    extra = {
        "lm": "smollm2-135m", "prompts": 8 if args.quick else args.samples, "new_tokens": NEW_TOKENS, "decoding": "greedy",
        "judge": "MiniLM classifier, bench/results/runs/quality-seed0-control", "austen_paragraphs": 128,
        "steering_vector": {"block": SV_BLOCK, "layer": "feedforward_output_dense", "examples_per_side": EXAMPLES_PER_SIDE},
        "recipe": recipe.to_dict(),
    }
    ours_report = work / "ours" / "report.json"
    if args.write_partial:
        if ours_report.is_file():
            extra["ours_training"] = json.loads(ours_report.read_text())["results"]
        write_results(name, json.loads((work / "points.json").read_text()), extra)
        return
    bench = Bench(8 if args.quick else args.samples, work)
    report = run_points(bench, recipe)
    write_results(name, bench.points, {**extra, "ours_training": report["results"]})


if __name__ == "__main__":
    main()
