"""The steering curve's reference model: the base without adapters, also for an int8 base."""

import numpy as np

from keras_biasinject import inject
from keras_biasinject.recipes.config import Recipe
from keras_biasinject.recipes.run_folder import base_model
from keras_biasinject.recipes.steering import _plain_base


def test_an_int8_base_that_cannot_merge_is_loaded_afresh_and_equals_the_neutral_control():
    """`merge` refuses a quantized base, so the curve's base is loaded and quantized again: the same
    integer weights, so greedy text at the neutral control equals it token for token."""
    recipe = Recipe(task="causal_lm", model={"spec": "smollm2-135m", "sequence_length": 16, "quantize": "int8"},
                    data={"source": "small_fine_foods", "text_column": "review", "label_column": "label",
                          "control_map": {"great": 1.0, "other": -1.0}},
                    inject={"rank": 2, "gate": "control"})
    lm = inject(base_model(recipe), targets="query_value", rank=2, gate="control")
    rng = np.random.default_rng(0)
    for v in lm.trainable_weights:  # a trained-looking adapter: every weight non-zero
        v.assign(rng.normal(scale=0.5, size=v.shape).astype("float32"))
    plain = _plain_base(lm, recipe)
    assert not hasattr(plain, "injection") and type(plain).__name__ == "Llama3CausalLM"
    assert plain.backbone.transformer_layers[0]._self_attention_layer._query_dense.quantization_mode == "int8"
    plain.preprocessor = lm.preprocessor
    plain.compile(sampler="greedy")
    lm.compile(sampler="greedy")
    text = plain.generate("This tea is", max_length=12, stop_token_ids=None)
    assert lm.generate("This tea is", max_length=12, stop_token_ids=None, control=[0.0]) == text
    assert lm.generate("This tea is", max_length=12, stop_token_ids=None, control=[1.0]) != text
