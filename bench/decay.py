"""Decay: a simulated interaction trace (feedback pulses over time) through DecayFeedback, the
resulting control against the configured half-life, and the steering it implies: the share of
positive generations at each moment's control, interpolated from the steering curve measured by
bench/steering.py (controls outside [-1, 1] are clipped to it; without steering.json, no score).
Run: python bench/decay.py  -> bench/results/decay.json and decay.png"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from timing import RESULTS, write  # noqa: E402

from keras_biasinject import DecayFeedback  # noqa: E402


def main():
    half_life = 60.0  # seconds
    layer = DecayFeedback(control_dim=1, half_life=half_life, max_norm=2.0)
    pulses = {0.0: 1.0, 30.0: 1.0, 60.0: 1.0, 300.0: -1.0}  # time -> rating
    times = np.arange(0.0, 600.0, 5.0)
    state, last, controls = None, 0.0, []
    for t in times:
        rating = pulses.get(float(t), 0.0)
        control, state = layer(np.array([[rating]], "float32"), state=state, elapsed=np.float32(t - last))
        last = t
        controls.append(float(np.asarray(control)[0, 0]))
    # After the last pulse (t=300, control c0) the control must follow c0 * 2^(-dt/h) exactly.
    i300 = int(np.where(times == 300.0)[0][0])
    expected = [controls[i300] * 2.0 ** (-(t - 300.0) / half_life) for t in times[i300:]]
    err = float(np.max(np.abs(np.array(controls[i300:]) - expected)))
    measured_half_life = None
    for t, c in zip(times[i300:], controls[i300:]):
        if abs(c) <= abs(controls[i300]) / 2:
            measured_half_life = float(t - 300.0)
            break
    score = None
    if (RESULTS / "steering.json").is_file():
        import json

        curve = json.loads((RESULTS / "steering.json").read_text())["steering"]
        score = np.interp(np.clip(controls, -1.0, 1.0), curve["controls"], curve["positive_share"]).tolist()
    write("decay", {"half_life_s": half_life, "pulses": {str(k): v for k, v in pulses.items()}, "times_s": times.tolist(),
                    "control": controls, "max_abs_error_vs_formula": err, "measured_half_life_s": measured_half_life,
                    "steering_positive_share": score, "steering_source": "steering.json, interpolated" if score else None})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(times, controls, label="control (DecayFeedback)")
    for t, r in pulses.items():
        ax.axvline(t, color="green" if r > 0 else "red", alpha=0.3)
    ax.set_xlabel("seconds")
    ax.set_ylabel("control")
    ax.set_title(f"Feedback pulses (+1 at 0, 30, 60 s; -1 at 300 s), half-life {half_life:.0f} s")
    lines = ax.get_lines()[:1]  # the control (not the pulse markers)
    if score is not None:
        twin = ax.twinx()
        lines += twin.plot(times, score, color="tab:orange", linestyle="--", label="share of positive reviews (SmolLM2)")
        twin.set_ylabel("share judged positive")
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "decay.png", dpi=100)


if __name__ == "__main__":
    main()
