"""The methods a recipe trains and compares: our bias injection and its control groups.

Each `prepare_<method>(model, recipe)` takes a freshly loaded KerasHub task and sets which weights
train; all return the model to fit (the same object, or the injected one).
"""

from keras_biasinject.rewrite.config import PRESETS
from keras_biasinject.rewrite.inject import inject

HEAD = "logits"  # the Dense layer KerasHub's text classifiers put on the pooled output


def _heads(model, recipe):
    return [HEAD] if recipe.task == "classification" else []


def prepare_base(model, recipe):
    """The frozen base: a trained head for classification; zero-shot (nothing trains) for the LM."""
    model.backbone.trainable = False
    return model


def prepare_full(model, recipe):
    """Every weight trains."""
    model.trainable = True
    return model


def prepare_keras_lora(model, recipe):
    """KerasHub's built-in LoRA at the recipe's rank and targets (matched by layer name, as it does)."""
    targets = recipe.inject.targets
    names = PRESETS.get(targets, targets) if isinstance(targets, str) else targets
    if isinstance(targets, str) and targets not in PRESETS:
        raise ValueError(
            f"recipe: method 'keras_lora' matches layers by name and cannot use the regex targets={targets!r}; "
            "give [inject] targets as a preset or a list of layer names."
        )
    model.backbone.enable_lora(recipe.inject.rank, target_layer_names=[n.rsplit("/", 1)[-1] for n in names])
    return model


def prepare_bias_injection(model, recipe):
    """Bias injection: adapters in the targets, plus the task head for classification."""
    trainable = list(recipe.inject.trainable) + [h for h in _heads(model, recipe) if h not in recipe.inject.trainable]
    return inject(model, recipe.inject, trainable=trainable)


PREPARE = {
    "base": prepare_base,
    "keras_lora": prepare_keras_lora,
    "full": prepare_full,
    "bias_injection": prepare_bias_injection,
}
