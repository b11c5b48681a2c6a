"""A llama.cpp control vector on the real SmolLM2: strength 0 is the base exactly; export writes it back."""

import numpy as np

from keras_biasinject.rewrite import remove
from keras_biasinject.rewrite.control_vector import export_control_vector, load_control_vector, read_control_vector
from tests.rewrite.test_control_vector import write_vector


def test_smollm2_control_vector_at_strength_zero_is_the_base_and_round_trips(smollm2_lm, tmp_path):
    lm, backbone = smollm2_lm, smollm2_lm.backbone
    n, hidden = len(backbone.transformer_layers), backbone.hidden_dim  # 30, 576
    rng = np.random.default_rng(0)
    directions = {i: rng.normal(size=hidden).astype("float32") for i in range(1, n)}  # as cvector-generator: 1..29
    path = write_vector(tmp_path / "smollm2.gguf", directions, layer_count=n - 1)
    inputs = {"token_ids": np.array([[1, 504, 3151, 1834, 314]], "int32"), "padding_mask": np.ones((1, 5), bool)}
    base = np.asarray(backbone(inputs))
    load_control_vector(lm, path, strength=4.0)
    try:
        np.testing.assert_array_equal(np.asarray(backbone(dict(inputs, control=[[0.0]]))), base)
        assert np.max(np.abs(np.asarray(backbone(dict(inputs, control="on"))) - base)) > 1e-2
        written = read_control_vector(export_control_vector(lm, tmp_path / "out.gguf"))
        assert written.model_hint == "llama" and written.layer_count == n - 1
        for i in directions:
            np.testing.assert_array_equal(written.directions[i], directions[i])
    finally:
        remove(lm)  # the session's model, as it was
    np.testing.assert_array_equal(np.asarray(backbone(inputs)), base)
