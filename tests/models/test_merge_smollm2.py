"""`merge` on the real SmolLM2 with its preprocessor: the merged model generates from text."""

import numpy as np

from keras_biasinject import inject, merge
from keras_biasinject.rewrite import remove


def test_a_merged_causal_lm_keeps_the_tokenizer_and_generates_what_the_control_generates(smollm2_lm):
    lm = inject(smollm2_lm, targets="query_value", rank=2)
    try:
        rng = np.random.default_rng(0)
        for v in lm.trainable_weights:  # A, B, U non-zero; V zero: q/v have no bias to fold it into
            v.assign(np.zeros(v.shape, "float32") if v.path.endswith("control_kernel")
                     else rng.normal(scale=0.5, size=v.shape).astype("float32"))
        merged = merge(lm, [0.7])
        merged.compile(sampler="greedy")
        assert merged.preprocessor is lm.preprocessor
        steered = lm.generate("This tea is", max_length=12, stop_token_ids=None, control=[0.7])
        assert merged.generate("This tea is", max_length=12, stop_token_ids=None) == steered
        assert steered != lm.generate("This tea is", max_length=12, stop_token_ids=None, control=[0.0])
    finally:
        remove(lm)  # the session's model, as it was
