"""Quickstart: build a Gemma, save it as a keras-hub preset, load it back, run and generate.

Runs offline in seconds on a tiny Gemma 2-shaped model with random weights (the bundled demo
preset that produces real text is the subject of a later issue). With network access and a
Kaggle account, replace the directory by a preset name such as "gemma2_2b_en".
"""

import os
import sys
import tempfile

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import gemma_keras as gk  # noqa: E402


def main():
    print(f"gemma_keras {gk.__version__} on Keras {keras.__version__} "
          f"({keras.backend.backend()} backend)")
    print(f"{len(gk.list_presets())} built-in presets, e.g. "
          f"{gk.get_preset_card('gemma2_2b_en').description}")

    # Any official architecture is a config; here a miniature Gemma 2 (GQA, sliding window,
    # soft-caps) so the guide runs anywhere.
    config = gk.get_preset_card("gemma2_2b_en").gemma_config().replace(
        vocabulary_size=512, num_layers=4, hidden_dim=128, intermediate_dim=512,
        num_query_heads=4, num_key_value_heads=2, head_dim=32, sliding_window_size=8)
    keras.utils.set_random_seed(0)
    lm = gk.GemmaCausalLM(gk.GemmaBackbone(config))
    print("built:", config.describe())

    with tempfile.TemporaryDirectory() as tmp:
        lm.save_to_preset(f"{tmp}/tiny_gemma2")  # the keras-hub layout: keras-hub loads it too
        loaded = gk.GemmaCausalLM.from_preset(f"{tmp}/tiny_gemma2", dtype="float32")

    token_ids = np.array([[2, 17, 99, 250, 7, 31]], dtype="int32")  # <bos> then 5 tokens
    logits = loaded({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)})
    logits = keras.ops.convert_to_numpy(logits)
    print("logits:", logits.shape, "next-token argmax per position:", logits[0].argmax(-1))
    same = np.allclose(logits, keras.ops.convert_to_numpy(
        lm({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)})), atol=1e-5)
    print("saved and reloaded model gives the same logits:", same)

    # Cached, compiled generation (greedy). With random weights the tokens are noise; the
    # demo preset of issue 6 will make this text.
    out = loaded.generate({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)},
                          max_new_tokens=8, stop_token_ids=None)
    print("generated token ids:", out["token_ids"][0, token_ids.shape[1]:])
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
