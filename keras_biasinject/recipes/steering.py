"""The steering curve: how the control moves the sentiment of what a causal LM generates.

Prompts are the opening words of held-out reviews; for each control value the LM continues every
prompt (greedy), and a judge (the classifier that `classify_fine_foods` trains, saved as
`classifier.keras` in its run folder) scores each text. The neutral control's generations are
checked to equal the base model's token for token.
"""

from pathlib import Path

import keras
import numpy as np

from keras_biasinject.data.pipeline import read_examples
from keras_biasinject.recipes.datasets import control_vector, data_config, splits
from keras_biasinject.recipes.run_folder import base_model
from keras_biasinject.rewrite.merge import merge


def _prompts(recipe, steer):
    data, named = splits(recipe)
    texts, _, _ = read_examples(data_config(recipe, data), named["test"])
    return [" ".join(str(t).split()[: steer.prompt_words]) for t in texts[: steer.samples]]


def _judge(run):
    path = Path(run) / "classifier.keras"
    if not path.is_file():
        raise FileNotFoundError(
            f"steer: no judge at {str(path)!r}. Run the classification recipe first "
            "(`kbi finetune classify_fine_foods --out runs/classify`) and set [steer] judge to its folder."
        )
    return keras.models.load_model(path)


def positive_share(judge, texts, positive_label):
    """The share of `texts` that `judge` (an injected classifier, control on) assigns `positive_label`."""
    x = judge.preprocessor(keras.ops.convert_to_tensor(texts))
    x = {**x, "control": np.ones((len(texts), judge.injection.config.control_dim), "float32")}
    probs = keras.ops.convert_to_numpy(keras.ops.softmax(judge(x), axis=-1))
    return float(np.mean(np.argmax(probs, axis=-1) == positive_label))


def _plain_base(lm, recipe):
    """The base model without adapters, to compare the neutral control against. A float base is
    `merge(lm)` at the neutral control; a quantized one cannot be merged, so it is loaded afresh
    (quantizing is deterministic: the same integer weights and scales)."""
    if recipe.model.quantize is None:
        return merge(lm)
    return base_model(recipe)


def steering_curve(lm, recipe, steer):
    """{"controls", "positive_share", "base_positive_share", "neutral_equals_base", "examples"}.

    Each control value is the control the model receives (a number in every control dimension);
    "neutral" is the injection's neutral control (see `keras_biasinject.recipes.datasets`)."""
    prompts = _prompts(recipe, steer)
    judge = _judge(steer.judge)
    lm.compile(sampler="greedy")

    def generate(control):
        controls = np.tile(control, (len(prompts), 1))
        return [str(t) for t in lm.generate(prompts, max_length=steer.max_length, control=controls)]

    base = _plain_base(lm, recipe)
    base.compile(sampler="greedy")
    base.preprocessor = lm.preprocessor
    base_texts = [str(t) for t in base.generate(prompts, max_length=steer.max_length)]
    shares, examples = [], {}
    for value in steer.controls:
        texts = generate(control_vector(recipe, float(value)))
        shares.append(positive_share(judge, texts, steer.positive_label))
        examples[str(value)] = texts[:3]
    neutral_texts = generate(control_vector(recipe))
    return {
        "controls": [float(c) for c in steer.controls],
        "positive_share": shares,
        "base_positive_share": positive_share(judge, base_texts, steer.positive_label),
        "neutral_equals_base": neutral_texts == base_texts if recipe.inject.gate == "control" else None,
        "examples": examples,
    }
