"""Model-level invariants that need no reference library."""

import keras
import numpy as np

import gemma_keras as gk
from conftest import keras_hub_kwargs


def test_parameter_count_formula_equals_built_model_and_keras_hub(vocab_size):
    import keras_hub

    for case in ("gemma_mqa", "gemma2_27b_style"):
        kwargs = keras_hub_kwargs(case, vocab_size)
        ours = gk.GemmaBackbone(**kwargs)
        assert ours.count_params() == ours.config.parameter_count()
        assert keras_hub.models.GemmaBackbone(**kwargs).count_params() == ours.count_params()


def test_padding_does_not_change_real_token_logits(vocab_size):
    keras.utils.set_random_seed(1)
    lm = gk.GemmaCausalLM(gk.GemmaBackbone(**keras_hub_kwargs("gemma2_gqa", vocab_size)))
    ids = np.random.RandomState(0).randint(4, vocab_size, size=(1, 9)).astype("int32")
    alone = keras.ops.convert_to_numpy(lm({"token_ids": ids, "padding_mask": np.ones_like(ids)}))
    padded = np.concatenate([ids, np.zeros((1, 4), "int32")], axis=1)
    mask = (padded != 0).astype("int32")
    mask[:, :9] = 1
    out = keras.ops.convert_to_numpy(lm({"token_ids": padded, "padding_mask": mask}))
    np.testing.assert_allclose(out[:, :9], alone, atol=1e-5)
    assert np.isfinite(out).all()  # masked rows stay finite
