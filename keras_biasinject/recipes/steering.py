"""The steering curve: how the control moves the sentiment of what a causal LM generates.

Prompts are the opening words of held-out reviews; for each control value the LM continues every
prompt (greedy), and a judge (the classifier that `classify_fine_foods` trains, saved as
`classifier.keras` in its run folder) scores each text. The neutral control's generations are
checked to equal the base model's token for token.
"""

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import keras
import numpy as np


@dataclasses.dataclass
class SteerConfig:
    judge: Optional[str] = None  # run folder of the classification recipe (holds classifier.keras); None: no curve
    controls: Sequence[float] = (-1.0, -0.5, 0.0, 0.5, 1.0)  # control values to generate at
    samples: int = 16  # prompts per control value
    prompt_words: int = 4  # each prompt: the first words of a held-out review
    max_length: int = 40  # tokens per generation, prompt included
    positive_label: int = 0  # the judge's class id for "positive" (Fine Foods: 0 = great)


def _prompts(recipe, steer):
    from keras_biasinject.data.pipeline import DataConfig, read_examples
    from keras_biasinject.recipes.finetune import _splits

    data, splits = _splits(recipe)
    texts, _, _ = read_examples(DataConfig(**data), splits["test"])
    return [" ".join(str(t).split()[: steer.prompt_words]) for t in texts[: steer.samples]]


def _judge(run):
    path = Path(run) / "classifier.keras"
    if not path.is_file():
        raise FileNotFoundError(
            f"steer: no judge at {str(path)!r}. Run the classification recipe first "
            "(`kbi finetune classify_fine_foods --out runs/classify`) and set [steer] judge to its folder."
        )
    return keras.models.load_model(path)


def _positive_share(judge, texts, positive_label):
    x = judge.preprocessor(keras.ops.convert_to_tensor(texts))
    x = {**x, "control": np.ones((len(texts), judge.injection.config.control_dim), "float32")}
    probs = keras.ops.convert_to_numpy(keras.ops.softmax(judge(x), axis=-1))
    return float(np.mean(np.argmax(probs, axis=-1) == positive_label))


def steering_curve(lm, recipe, steer):
    """{"controls", "positive_share", "base_positive_share", "neutral_equals_base", "examples"}."""
    prompts = _prompts(recipe, steer)
    judge = _judge(steer.judge)
    lm.compile(sampler="greedy")
    dim = lm.injection.config.control_dim
    neutral = np.broadcast_to(np.asarray(recipe.inject.neutral, "float32"), (dim,))

    def generate(control):
        controls = np.tile(np.asarray(control, "float32"), (len(prompts), 1))
        return [str(t) for t in lm.generate(prompts, max_length=steer.max_length, control=controls)]

    from keras_biasinject.rewrite.merge import merge

    base = merge(lm)  # a plain model; at the neutral control with gate "control" it is the base exactly
    base.compile(sampler="greedy")
    base.preprocessor = lm.preprocessor
    base_texts = [str(t) for t in base.generate(prompts, max_length=steer.max_length)]
    shares, examples = [], {}
    for value in steer.controls:
        texts = generate(neutral + float(value))
        shares.append(_positive_share(judge, texts, steer.positive_label))
        examples[str(value)] = texts[:3]
    neutral_texts = generate(neutral)
    return {
        "controls": [float(c) for c in steer.controls],
        "positive_share": shares,
        "base_positive_share": _positive_share(judge, base_texts, steer.positive_label),
        "neutral_equals_base": neutral_texts == base_texts if recipe.inject.gate == "control" else None,
        "examples": examples,
    }
