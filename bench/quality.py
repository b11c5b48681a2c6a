"""Quality on Fine Food reviews with MiniLM: the frozen base plus head, KerasHub LoRA, and bias
injection with each gate, on the same data and epochs, over 3 seeds (mean and spread).
Run: python bench/quality.py [--full]  -> bench/results/quality.json (and one run folder per seed
under bench/results/runs/, whose bias-injection classifier judges the steering benchmark)."""

import argparse
import json
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import RESULTS, write  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="also full fine-tuning (slow)")
    parser.add_argument("--train", type=int, default=512, help="training reviews per run")
    args = parser.parse_args()
    from keras_biasinject.recipes import finetune, load_recipe

    methods = ["base", "keras_lora", "bias_injection"] + (["full"] if args.full else [])
    scores = {}
    for seed in (0, 1, 2):
        for gate in ("control", "always"):
            recipe = load_recipe(os.path.join(ROOT, "recipes", "classify_fine_foods.toml"), [
                ("train.seed", seed), ("train.max_train_examples", args.train), ("train.max_eval_examples", 512),
                ("inject.gate", gate),
                ("train.methods", methods if gate == "control" else ["bias_injection"]),
            ])
            run = RESULTS / "runs" / f"quality-seed{seed}-{gate}"
            shutil.rmtree(run, ignore_errors=True)
            report = finetune(recipe, run, verbose=0)
            for row in report["results"]:
                name = row["method"] if not row["method"].startswith("bias_injection") else f"{row['method']} [gate {gate}]"
                scores.setdefault(name, []).append(row["value"])
            for folder in ("checkpoints", "logs", "backup"):
                shutil.rmtree(run / folder, ignore_errors=True)
            print(seed, gate, json.dumps(report["results"]))
    summary = {name: {"mean": statistics.mean(v), "stdev": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}
               for name, v in scores.items()}
    write("quality", {"model": "minilm-l6", "data": "small_fine_foods", "train_examples": args.train, "epochs": 2,
                      "eval_examples": 512, "seeds": [0, 1, 2], "accuracy": summary})


if __name__ == "__main__":
    main()
