"""`kbi loop`: a closed-loop session on a finished run, turn by turn, with its trace and plot.

Each turn continues the opening words of held-out reviews from the recipe's test split with the
session's control; the feedback head reads what came out; the reading (or `target - reading`) steps
the decaying state that sets the next turn's control (`keras_biasinject.FeedbackLoop`). Turn t
happens at time t, so the half-life is in turns.
"""

import json
from pathlib import Path

import keras

from keras_biasinject.data.pipeline import read_examples
from keras_biasinject.layers import DecayFeedback
from keras_biasinject.loop import FeedbackLoop
from keras_biasinject.recipes.datasets import data_config, splits


def review_prompts(recipe, count, words=4):
    """The first `words` words of the first `count` reviews of the recipe's test split."""
    data, named = splits(recipe)
    texts, _, _ = read_examples(data_config(recipe, data), named["test"])
    return [" ".join(str(t).split()[:words]) for t in texts[:count]]


def run_loop(lm, prompts, turns, target=None, half_life=20.0, gain=2.0, max_norm=1.5, max_length=40, mode="self"):
    """Runs `turns` turns of a `FeedbackLoop` over `prompts` (the same prompts every turn); returns the
    trace: one dict per turn (turn, control used, mean reading, state after, texts)."""
    dim = lm.injection.config.control_dim
    decay = DecayFeedback(dim, half_life=half_life, feedback_dim=lm.feedback_head.feedback_dim if lm.feedback_head else dim,
                          neutral=lm.injection.config.neutral, max_norm=max_norm,
                          gain_initializer=keras.initializers.Constant(gain))
    loop = FeedbackLoop(lm, decay, mode=mode, target=target)
    trace = []
    for t in range(turns):
        texts = loop.generate(prompts, at=float(t), max_length=max_length)
        turn = loop.history[-1]
        trace.append({"turn": t, "control": turn.control, "reading": turn.reading, "state": turn.state,
                      "note": turn.note, "texts": [str(s) for s in texts]})
    return trace


def write_trace(trace, out, target=None):
    """`out` (.json) and the plot beside it (.png): control and reading per turn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"target": target, "turns": trace}, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    turns = [r["turn"] for r in trace]
    ax.plot(turns, [r["control"][0] for r in trace], "-o", ms=3, label="control")
    if trace and trace[0]["reading"] is not None:
        ax.plot(turns, [r["reading"][0] for r in trace], "-s", ms=3, label="feedback head's mean reading")
    if target is not None:
        ax.axhline(float(target[0]), color="grey", ls="--", label="target")
    ax.set(xlabel="turn", title="Closed-loop session")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    plt.close(fig)
    return str(out)
