"""The methods a recipe trains and compares: our bias injection and its control groups.

Each `prepare_<method>(model, recipe)` takes a freshly loaded KerasHub task and sets which weights
train; all return the model to fit (the same object, or the injected one).
"""

from keras_biasinject.rewrite.inject import inject
from keras_biasinject.rewrite.targets import find_targets

HEAD = "logits"  # the Dense layer KerasHub's text classifiers put on the pooled output


def _heads(model, recipe):
    return [HEAD] if recipe.task == "classification" else []


def prepare_base(model, recipe):
    """The frozen base: a head for classification (fitted as a linear probe, recipes/linear_probe.py);
    zero-shot (nothing trains) for the LM."""
    model.backbone.trainable = False
    return model


def prepare_full(model, recipe):
    """Every weight trains."""
    model.trainable = True
    return model


def prepare_keras_lora(model, recipe):
    """KerasHub's built-in LoRA at the recipe's rank, on the layers that the recipe's targets select
    (by their names: `enable_lora` matches layer names, so same-named layers elsewhere adapt too; the
    recipe refuses blocks/exclude with keras_lora, see Recipe)."""
    names = sorted({target.layer.name for target in find_targets(model.backbone, recipe.inject)})
    model.backbone.enable_lora(recipe.inject.rank, target_layer_names=names)
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
