"""Plots and the results table of a recipe run (`report.json` is written by `finetune`), and
reading a `report.json` back."""

import json
from pathlib import Path


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
    """The results as a Markdown table, one row per method."""
    lines = ["| method | metric | value | trainable params | seconds |", "|---|---|---|---|---|"]
    for row in report["results"]:
        lines.append(
            f"| {row['method']} | {row['metric']} | {row['value']:.4f} | {row['trainable_params']:,} | {row['seconds']:.1f} |"
        )
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
