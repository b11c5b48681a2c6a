"""Plots and the results table of a recipe run (`report.json` is written by `finetune`), reading a
`report.json` back, and the classification metrics beside accuracy (majority baseline, macro-F1,
per-class recall) with the warning for a classifier that learned nothing beyond the majority class."""

import json
from pathlib import Path

import numpy as np


def classification_metrics(labels, predictions, class_names=None):
    """What a classifier's accuracy means on this split: a dict of

    - `accuracy`: share of predictions equal to the label;
    - `majority_baseline`: the accuracy of always answering the split's most frequent label, and
      `majority_class`, that label;
    - `macro_f1`: the unweighted mean over classes of 2 P R / (P + R) (0 where P + R = 0), over the
      classes that occur in the labels or the predictions (as scikit-learn's `f1_score(average="macro")`);
    - `per_class_recall`: {class: share of its examples predicted as it} (None for a class without any);
    - `predicted`: {class: how many examples were predicted as it};
    - `learned_nothing` (and `warning` when true): see `learned_nothing`.

    `labels`, `predictions`: class ids `[n]`; `class_names`: their names in class id order (None: ids)."""
    labels = np.asarray(labels).reshape(-1).astype(int)
    predictions = np.asarray(predictions).reshape(-1).astype(int)
    if labels.shape != predictions.shape or labels.size == 0:
        raise ValueError(f"classification_metrics: labels and predictions must be two non-empty lists of the same length. "
                         f"Got {labels.size} labels and {predictions.size} predictions.")
    size = max(len(class_names or []), int(labels.max()) + 1, int(predictions.max()) + 1)
    names = [str(n) for n in class_names] if class_names else []
    names += [str(c) for c in range(len(names), size)]
    true = np.bincount(labels, minlength=size)  # examples of each class
    guessed = np.bincount(predictions, minlength=size)  # predictions of each class
    hits = np.bincount(labels[labels == predictions], minlength=size)  # true positives of each class
    f1 = [2 * hits[c] / (true[c] + guessed[c]) for c in range(size) if true[c] + guessed[c] > 0]  # = 2PR/(P+R)
    metrics = {
        "accuracy": float(hits.sum() / labels.size),
        "majority_baseline": float(true.max() / labels.size),
        "majority_class": names[int(true.argmax())],
        "macro_f1": float(np.mean(f1)),
        "per_class_recall": {names[c]: (float(hits[c] / true[c]) if true[c] else None) for c in range(size)},
        "predicted": {names[c]: int(guessed[c]) for c in range(size)},
    }
    metrics["learned_nothing"] = learned_nothing(metrics, labels.size)
    if metrics["learned_nothing"]:
        top = max(metrics["predicted"], key=metrics["predicted"].get)
        metrics["warning"] = (
            f"accuracy {metrics['accuracy']:.4f} is within one example of the majority baseline "
            f"{metrics['majority_baseline']:.4f} ({metrics['majority_class']!r} every time) and "
            f"{metrics['predicted'][top]} of {labels.size} predictions are {top!r}: it learned nothing beyond answering the "
            "majority class. Try train.class_weight = \"balanced\", more epochs or a higher learning rate.")
    return metrics


def learned_nothing(metrics, n):
    """True when the accuracy is within one example (1/n) of the majority baseline and (nearly) every
    prediction is one class: all but at most max(1, n // 100) of the `n` examples."""
    near_majority = abs(metrics["accuracy"] - metrics["majority_baseline"]) <= 1.0 / n + 1e-12
    return bool(near_majority and max(metrics["predicted"].values()) >= n - max(1, n // 100))


def read_report(path):
    """The report dict in `path` (a run's `report.json`), or ValueError naming the file and the fix
    when it is not valid UTF-8 JSON holding a "recipe" table (truncated, hand-edited, another file)."""
    fix = ("it was cut short or edited by hand. Restore it, or run `kbi finetune` again into a new folder "
           "(finished methods are read from this file).")
    try:
        report = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{str(path)!r} is not a valid report ({error}): {fix}") from None
    if not isinstance(report, dict) or not isinstance(report.get("recipe"), dict) or not isinstance(
        report.get("results", []), list
    ):
        raise ValueError(f"{str(path)!r} is not a valid report (no \"recipe\" table or \"results\" list): {fix}")
    report.setdefault("results", [])
    report.setdefault("history", {})
    return report


def results_table(report):
    """The results as a Markdown table, one row per method; classification adds the majority baseline,
    macro-F1 and per-class recall, and a warning line under the table for each method that learned
    nothing beyond the majority class."""
    rows = report["results"]
    extra = any("macro_f1" in row for row in rows)
    head = "| method | metric | value | majority baseline | macro-F1 | recall per class |" if extra else "| method | metric | value |"
    lines = [head + " trainable params | seconds |", "|---" * (head.count("|") + 1) + "|"]
    for row in rows:
        cells = f"| {row['method']} | {row['metric']} | {row['value']:.4f} |"
        if extra:
            recall = ", ".join(f"{name} {'-' if r is None else f'{r:.2f}'}" for name, r in row.get("per_class_recall", {}).items())
            majority, f1 = row.get("majority_baseline"), row.get("macro_f1")
            cells += f" {'' if majority is None else f'{majority:.4f}'} | {'' if f1 is None else f'{f1:.4f}'} | {recall} |"
        lines.append(f"{cells} {row['trainable_params']:,} | {row['seconds']:.1f} |")
    lines += [f"WARNING: {row['method']}: {row['warning']}" for row in rows if row.get("learned_nothing")]
    return "\n".join(lines)


def write_plots(report, out_dir):
    """`curves.png`: training and validation loss per method; `steering.png` when the report has one."""
    import matplotlib  # lazy: only plots need it (half a second to import)

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    histories = {m: h for m, h in report.get("history", {}).items() if h.get("loss")}
    if histories:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for method, history in histories.items():
            epochs = range(1, len(history["loss"]) + 1)
            axes[0].plot(epochs, history["loss"], marker="o", label=method)
            if history.get("val_loss"):
                axes[1].plot(epochs, history["val_loss"], marker="o", label=method)
        for ax, title in zip(axes, ("training loss", "validation loss")):
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.legend()
        fig.suptitle(report["recipe"]["name"])
        fig.tight_layout()
        fig.savefig(out_dir / "curves.png", dpi=100)
        plt.close(fig)
    steering = report.get("steering")
    if steering:
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot(steering["controls"], steering["positive_share"], marker="o")
        ax.axhline(steering["base_positive_share"], color="grey", linestyle="--", label="base model")
        ax.set_xlabel("control")
        ax.set_ylabel("share of generations judged positive")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.set_title("Steering")
        fig.tight_layout()
        fig.savefig(out_dir / "steering.png", dpi=100)
        plt.close(fig)
