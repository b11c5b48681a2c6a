"""Quality on Fine Food reviews with MiniLM: the frozen base plus head, KerasHub LoRA, and bias
injection with each gate, on the same data and epochs, over 3 seeds (mean and spread). Every group's
head reads the checkpoint's own pooling (mean over tokens for all-MiniLM-L6-v2). Beside accuracy: the
majority baseline of the test slice, macro-F1, and a Wilson 95% interval of each run's accuracy.
Run: python bench/quality.py [--full]  -> bench/results/quality.json (and run folders per seed
under bench/results/runs/; seed 0's bias-injection classifier judges the steering benchmark).
A run folder holding the same recipe's finished run is reused (so adding --full later trains only
full fine-tuning); --fresh deletes them first."""

import argparse
import json
import math
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import RESULTS, write  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


GROUPS = {"control": ["base", "keras_lora", "bias_injection"], "always": ["bias_injection"], "full": ["full"],
          "full-lr2e-4": ["full"]}  # full fine-tuning at the recipe's 5e-5 (BERT's usual) and at 2e-4


def run_group(seed, group, train=512, fresh=False):
    """Trains (or reuses) one seed's run of a method group; returns (recipe, report)."""
    from keras_biasinject.recipes import finetune, load_recipe

    recipe = load_recipe(os.path.join(ROOT, "recipes", "classify_fine_foods.toml"), [
        ("train.seed", seed), ("train.max_train_examples", train), ("train.max_eval_examples", 512),
        ("inject.gate", "always" if group == "always" else "control"), ("train.methods", GROUPS[group]),
    ] + ([("train.full_learning_rate", 2e-4)] if group == "full-lr2e-4" else []))
    run = RESULTS / "runs" / f"quality-seed{seed}-{group}"
    if fresh:
        shutil.rmtree(run, ignore_errors=True)
    report = finetune(recipe, run, verbose=0)
    for folder in ("checkpoints", "logs", "backup"):
        shutil.rmtree(run / folder, ignore_errors=True)
    return recipe, report


def wilson(p, n, z=1.96):
    """Wilson score 95% interval of a proportion `p` measured on `n` examples."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [centre - half, centre + half]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="also full fine-tuning (slow)")
    parser.add_argument("--train", type=int, default=512, help="training reviews per run")
    parser.add_argument("--fresh", action="store_true", help="retrain everything instead of reusing finished runs")
    args = parser.parse_args()
    scores, f1s, majority, pooling = {}, {}, set(), set()
    for seed in (0, 1, 2):
        for group in [g for g in GROUPS if not g.startswith("full") or args.full]:
            recipe, report = run_group(seed, group, args.train, args.fresh)
            gate = recipe.inject.gate
            for row in report["results"]:
                name = row["method"] if not row["method"].startswith("bias_injection") else f"{row['method']} [gate {gate}]"
                if name == "full":
                    name = f"full (lr {recipe.train.full_learning_rate:g})"
                scores.setdefault(name, []).append(row["value"])
                f1s.setdefault(name, []).append(row.get("macro_f1"))
                majority.add(row.get("majority_baseline"))
                pooling.add(row.get("pooling"))
            print(seed, group, json.dumps(report["results"]), flush=True)
    summary = {name: {"mean": statistics.mean(v), "stdev": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v,
                      "wilson95": [wilson(x, 512) for x in v]}
               for name, v in scores.items()}
    macro_f1 = {name: {"mean": statistics.mean(v), "values": v} for name, v in f1s.items() if None not in v}
    write("quality", {"model": "minilm-l6", "data": "small_fine_foods", "train_examples": args.train, "epochs": 2,
                      "eval_examples": 512, "seeds": [0, 1, 2], "pooling": sorted(map(str, pooling)),
                      "majority_baseline": sorted(m for m in majority if m is not None), "accuracy": summary,
                      "macro_f1": macro_f1})


if __name__ == "__main__":
    main()
