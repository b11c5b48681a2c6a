"""The closed loop on SmolLM2-135M-Instruct: the model's own feedback head sets its next control.

The model is `recipes/loop_reviews_lm.toml`: the bias injection of recipe 3 (steer_reviews_strong)
plus a feedback head that reads P(great) from the text. One judge scores every text: seed 0's MiniLM
review classifier from `bench/quality.py` (as in bench/steering_compare.py), never the head itself.
Every session continues the same prompts (turn t: held-out reviews 16t..16t+15, their first 4
words), greedy, 32 new tokens. Measured:
1. head quality: the head's reading of 128 generations (controls -1..1) against the judge
   (agreement, AUC), and its accuracy on held-out reviews (from the run's report);
2. set-point tracking: `FeedbackLoop` sessions toward a low and a high target share (20 turns of 16
   generations), against the open loop at the neutral control and the best fixed control read off
   the steering curve (bench/results/steering_compare.json: an oracle that needs the curve first);
3. decay: the high session's final state left alone, with a 4-turn half-life: the control against
   2^(-t/4), and the judged share following it back;
4. stability: a gain 25x too high, held by max_norm.
Run: python bench/closed_loop.py -> bench/results/closed_loop.json, closed_loop.png (about an hour on
2 CPU cores; the adapters of bench/steering_compare.py's run of recipe 3 are reused when present,
since recipe 4 trains them identically; --quick: a smoke run, nothing kept)
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from steering_compare import load_judge, wilson  # noqa: E402
from timing import RESULTS, write  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = RESULTS / "runs" / "closed_loop"
STRONG_RUN = RESULTS / "runs" / "steering_compare" / "ours"
PROMPT_WORDS, NEW_TOKENS, PER_TURN, TURNS = 4, 32, 16, 20
HALF_LIFE, GAIN, MAX_NORM = 20.0, 2.0, 1.2  # turns; max_norm keeps the control where the curve is monotonic (|c| <= ~1)
TARGETS = {"low": 0.45, "high": 0.80}  # base 0.61: each at least 0.15 away, inside ours' 0.43..0.93 (controls -1..1)
DECAY_HALF_LIFE, DECAY_TURNS = 4.0, 8
UNSTABLE_GAIN, UNSTABLE_TURNS = 50.0, 6


def judged_positive(judge, texts):
    """1 where the judge calls a text positive (Fine Foods: class 0 = great)."""
    import keras

    x = judge.preprocessor(keras.ops.convert_to_tensor(texts))
    x = {**x, "control": np.ones((len(texts), judge.injection.config.control_dim), "float32")}
    return (np.argmax(keras.ops.convert_to_numpy(judge(x)), axis=-1) == 0).astype(int)


def auc(scores, labels):
    """The probability that a random positive text reads higher than a random negative one."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return None
    return float(np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])))


def seed_from_strong_run(recipe, run):
    """Recipe 4's bias_injection is recipe 3's, step for step: reuse a finished run of recipe 3."""
    from keras_biasinject.recipes.run_folder import run_recipe

    report = STRONG_RUN / "report.json"
    if (run / "report.json").exists() or not report.is_file():
        return None
    def shared(r):  # everything but the name, the methods and the head, as report.json holds it
        data = json.loads(json.dumps(r.to_dict()))
        return {**{k: v for k, v in data.items() if k not in ("name", "feedback")}, "train": {**data["train"], "methods": None}}

    same = shared(run_recipe(STRONG_RUN)) == shared(recipe)
    if not same:
        return None
    rows = [r for r in json.loads(report.read_text())["results"] if r["method"] == "bias_injection"]
    run.mkdir(parents=True, exist_ok=True)
    shutil.copytree(STRONG_RUN / "adapter", run / "adapter")
    as_json = json.loads(json.dumps(recipe.to_dict()))
    (run / "report.json").write_text(json.dumps({"recipe": as_json, "results": rows, "history": {}}, indent=2))
    return str(STRONG_RUN.relative_to(ROOT))


class Sessions:
    def __init__(self, lm, judge, prompts, turns):
        self.lm, self.judge, self.prompts, self.turns = lm, judge, prompts, turns
        self.max_length = max(len(lm.preprocessor.tokenizer(p)) for p in prompts) + NEW_TOKENS

    def turn_prompts(self, t):
        return self.prompts[(t * PER_TURN) % len(self.prompts):][:PER_TURN]

    def record(self, t, texts, control, reading=None):
        hits = judged_positive(self.judge, [str(s) for s in texts])
        return {"turn": t, "control": [float(c) for c in np.reshape(control, -1)], "share": float(hits.mean()),
                "reading": None if reading is None else [float(r) for r in np.reshape(reading, -1)]}

    def fixed(self, control, turns):
        """The open loop: every turn at one control."""
        rows = []
        for t in turns:
            texts, readings = self.lm.generate(self.turn_prompts(t), max_length=self.max_length, control=[control],
                                               return_feedback=True)
            rows.append(self.record(t, texts, [control], readings.mean(0)))
        return rows

    def closed(self, loop, turns):
        rows = []
        for t in turns:
            texts = loop.generate(self.turn_prompts(t), at=float(t), max_length=self.max_length)
            turn = loop.history[-1]
            rows.append({**self.record(t, texts, turn.control, turn.reading), "state": turn.state, "note": turn.note})
        return rows


def head_quality(sessions, report):
    controls = np.resize(np.array([-1.0, -0.5, 0.0, 0.5, 1.0], "float32"), 128)[:, None]
    readings, hits = [], []
    for start in range(0, 128, PER_TURN):
        prompts = sessions.prompts[start:start + PER_TURN]
        texts, reading = sessions.lm.generate(prompts, max_length=sessions.max_length, control=controls[start:start + PER_TURN],
                                              return_feedback=True)
        readings.append(reading[:, 0])
        hits.append(judged_positive(sessions.judge, [str(s) for s in texts]))
    readings, hits = np.concatenate(readings), np.concatenate(hits)
    agree = int(np.sum((readings > 0.5) == (hits == 1)))
    return {"generations": 128, "agreement_with_judge": agree / 128, "agreement_wilson_95": wilson(agree, 128),
            "auc_against_judge": auc(readings, hits), "mean_reading": float(readings.mean()), "judged_share": float(hits.mean()),
            "held_out_reviews": [r for r in report["results"] if r["method"].startswith("feedback_head")]}


def oracle_controls():
    """The fixed control that the steering curve says gives each target share (linear between measured points)."""
    points = json.loads((RESULTS / "steering_compare.json").read_text())["points"]
    curve = sorted((c, points[f"ours {c:+g}"]["share_positive"]) for c in (-1.0, 0.0, 1.0))  # the monotonic part
    cs, shares = [c for c, _ in curve], [s for _, s in curve]
    return {name: float(np.interp(target, shares, cs)) for name, target in TARGETS.items()}, curve


def run_sessions(sessions, lm, quick):
    from keras_biasinject import DecayFeedback, FeedbackLoop

    turns = range(sessions.turns)
    last_half = range(sessions.turns // 2, sessions.turns)
    oracle, curve = oracle_controls()
    out = {"oracle_controls": oracle, "steering_curve": curve, "open_loop_neutral": sessions.fixed(0.0, last_half)}
    loops = {}
    for name, target in TARGETS.items():
        decay = DecayFeedback(1, half_life=HALF_LIFE, max_norm=MAX_NORM, gain_initializer=_constant(GAIN))
        loops[name] = FeedbackLoop(lm, decay, mode="self", target=target)
        out[f"closed_{name}"] = sessions.closed(loops[name], turns)
        out[f"oracle_{name}"] = sessions.fixed(oracle[name], last_half)
    start = loops["high"].state.copy()
    fade = FeedbackLoop(lm, DecayFeedback(1, half_life=DECAY_HALF_LIFE, max_norm=MAX_NORM), mode="external", start=0.0)
    fade.state = start  # the high session's final state, then no feedback at all
    out["decay"] = {"start_state": start.tolist(), "half_life": DECAY_HALF_LIFE,
                    "turns": sessions.closed(fade, range(2 if quick else DECAY_TURNS + 1))}
    wild = FeedbackLoop(lm, DecayFeedback(1, half_life=HALF_LIFE, max_norm=MAX_NORM, gain_initializer=_constant(UNSTABLE_GAIN)),
                        mode="self", target=TARGETS["high"])
    out["unstable_gain"] = {"gain": UNSTABLE_GAIN, "turns": sessions.closed(wild, range(2 if quick else UNSTABLE_TURNS))}
    return out


def _constant(value):
    import keras

    return keras.initializers.Constant(value)


def summarize(out, turns):
    last = lambda rows: [r["share"] for r in rows if r["turn"] >= turns // 2]  # noqa: E731
    base = float(np.mean(last(out["open_loop_neutral"])))
    rows = {}
    for name, target in TARGETS.items():
        closed, oracle = last(out[f"closed_{name}"]), last(out[f"oracle_{name}"])
        n = len(closed) * PER_TURN
        rows[name] = {"target": target, "closed_mean_share": float(np.mean(closed)),
                      "closed_wilson_95": wilson(round(np.mean(closed) * n), n),
                      "closed_within_0.1": abs(np.mean(closed) - target) <= 0.1,
                      "closed_mean_reading": float(np.mean([r["reading"][0] for r in out[f"closed_{name}"] if r["turn"] >= turns // 2])),
                      "closed_mean_control": float(np.mean([r["control"][0] for r in out[f"closed_{name}"] if r["turn"] >= turns // 2])),
                      "oracle_control": out["oracle_controls"][name], "oracle_mean_share": float(np.mean(oracle)),
                      "oracle_wilson_95": wilson(round(np.mean(oracle) * n), n), "generations_each": n,
                      "target_at_least_0.15_from_base": abs(target - base) >= 0.15}
    fade = out["decay"]["turns"]
    c0 = fade[0]["control"][0]
    fitted = [-r["turn"] / np.log2(r["control"][0] / c0) for r in fade[1:] if r["control"][0] / c0 > 0]
    wild = out["unstable_gain"]["turns"]
    return {"open_loop_neutral_share": base, "targets": rows,
            "decay": {"measured_half_life": float(np.median(fitted)) if fitted else None,
                      "relative_error": abs(float(np.median(fitted)) - DECAY_HALF_LIFE) / DECAY_HALF_LIFE if fitted else None,
                      "share_first_last": [fade[0]["share"], fade[-1]["share"]]},
            "unstable_gain": {"max_abs_control": max(abs(r["control"][0]) for r in wild), "max_norm": MAX_NORM,
                              "all_finite": all(np.all(np.isfinite(r["control"] + r["state"])) for r in wild)}}


def plot(out, path, turns):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    ax = axes[0]
    for name, colour in (("low", "tab:blue"), ("high", "tab:red")):
        rows = out[f"closed_{name}"]
        ax.plot([r["turn"] for r in rows], [r["share"] for r in rows], "-o", color=colour, ms=3, label=f"closed loop, target {TARGETS[name]}")
        ax.plot([r["turn"] for r in rows], [r["reading"][0] for r in rows], ":", color=colour, label=f"head reading ({name})")
        ax.axhline(TARGETS[name], color=colour, lw=0.8, ls="--")
        oracle = out[f"oracle_{name}"]
        ax.plot([r["turn"] for r in oracle], [r["share"] for r in oracle], "x", color=colour, label=f"oracle fixed control ({name})")
    neutral = out["open_loop_neutral"]
    ax.plot([r["turn"] for r in neutral], [r["share"] for r in neutral], "s", color="grey", ms=3, label="open loop, neutral")
    ax.set(xlabel="turn (16 generations each)", ylabel="share judged positive", ylim=(0, 1), title="Set-point tracking")
    ax.legend(fontsize=6)
    ax = axes[1]
    for name, colour in (("low", "tab:blue"), ("high", "tab:red")):
        rows = out[f"closed_{name}"]
        ax.plot([r["turn"] for r in rows], [r["control"][0] for r in rows], "-o", color=colour, ms=3, label=f"control ({name})")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="turn", ylabel="control", title="The control the loop chose")
    ax.legend(fontsize=7)
    ax = axes[2]
    fade = out["decay"]["turns"]
    t = np.array([r["turn"] for r in fade])
    ax.plot(t, [r["control"][0] for r in fade], "-o", ms=3, label="control, no feedback")
    ax.plot(t, fade[0]["control"][0] * 2.0 ** (-t / DECAY_HALF_LIFE), "k:", label=f"2^(-t/{DECAY_HALF_LIFE:g})")
    ax.plot(t, [r["share"] for r in fade], "-s", ms=3, label="share judged positive")
    wild = out["unstable_gain"]["turns"]
    ax.plot([r["turn"] for r in wild], [r["control"][0] for r in wild], "-^", ms=3, alpha=0.6, label=f"gain {UNSTABLE_GAIN:g}: control")
    ax.axhline(MAX_NORM, color="grey", ls="--", lw=0.8)
    ax.axhline(-MAX_NORM, color="grey", ls="--", lw=0.8, label="max_norm")
    ax.set(xlabel="turn", title="Decay and a too-high gain")
    ax.legend(fontsize=6)
    fig.suptitle("Closed loop on SmolLM2-135M: the model's own feedback head sets its next control")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plain(value):
    return value.item() if hasattr(value, "item") else str(value)  # numpy scalars


def _jsonable(data):
    return json.loads(json.dumps(data, default=_plain))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 turns, 2 training steps, nothing kept")
    args = parser.parse_args()
    work = WORK.with_name(WORK.name + "_quick") if args.quick else WORK
    if args.quick:
        shutil.rmtree(work, ignore_errors=True)
    import keras

    from keras_biasinject.data.pipeline import DataConfig, read_examples
    from keras_biasinject.recipes import finetune, load_recipe
    from keras_biasinject.recipes.run_folder import load_run_model

    quick = [("train.max_train_examples", 16), ("train.max_eval_examples", 8)] if args.quick else []
    recipe = load_recipe(os.path.join(ROOT, "recipes", "loop_reviews_lm.toml"), quick)
    adapters_from = None if args.quick else seed_from_strong_run(recipe, work)
    report = finetune(recipe, work, verbose=2)
    _, lm = load_run_model(work)
    lm.compile(sampler="greedy")
    data = DataConfig("small_fine_foods", text_column="review", label_column="label", control_map={"great": 1.0, "other": -1.0})
    texts, _, _ = read_examples(data, "test")
    turns = 2 if args.quick else TURNS
    prompts = [" ".join(str(t).split()[:PROMPT_WORDS]) for t in texts[: max(turns * PER_TURN, 128)]]
    judge = load_judge()
    sessions = Sessions(lm, judge, prompts, turns)
    out = {"head": head_quality(sessions, report), **run_sessions(sessions, lm, args.quick)}
    name = "closed_loop_quick" if args.quick else "closed_loop"
    summary = _jsonable(summarize(out, turns))
    plot(out, RESULTS / f"{name}.png", turns)
    (work / "sessions.json").write_text(json.dumps(out, default=_plain))  # the raw turns, before anything can fail
    write(name, _jsonable({"lm": "smollm2-135m", "recipe": recipe.to_dict(), "adapters_from": adapters_from, "prompts_per_turn": PER_TURN,
                 "turns": turns, "new_tokens": NEW_TOKENS, "decoding": "greedy", "half_life_turns": HALF_LIFE, "gain": GAIN,
                 "max_norm": MAX_NORM, "judge": "MiniLM classifier, bench/results/runs/quality-seed0-control",
                 "summary": summary, **out}))
    print(json.dumps(summary, indent=2))
    keras.backend.clear_session()


if __name__ == "__main__":
    main()
