"""Logit parity with the reference implementations, on checkpoints they write at test time."""

import json

import keras
import numpy as np
import pytest

import gemma_keras as gk
from conftest import (HF_CASES, HF_ONLY_CASES, hf_logits, keras_hub_logits, logits_of,
                      max_diff_on_real_tokens, token_batch)

TOL = 1e-4


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_checkpoint_logits_match_transformers(case, hf_checkpoint, vocab_size):
    directory, model = hf_checkpoint(case)
    assert (directory / "model.safetensors.index.json").is_file()  # really sharded
    ids, mask = token_batch(vocab_size)
    reference = hf_logits(model, ids, mask)
    lm = gk.GemmaCausalLM.from_preset(directory, dtype="float32")
    ours = logits_of(lm, ids, mask)
    assert ours.shape == (2, ids.shape[1], vocab_size)
    assert max_diff_on_real_tokens(ours, reference, mask) < TOL


@pytest.mark.parametrize("case,change", [
    ("gemma2_gqa", dict(attention_logit_soft_cap=None)),
    ("gemma2_gqa", dict(final_logit_soft_cap=None)),
    ("gemma2_gqa", dict(use_sliding_window_attention=False)),
    ("gemma2_27b_style", dict(query_head_dim_normalize=True)),
    ("gemma3", dict(query_pre_attn_scalar=None)),
    ("gemma3", dict(global_rope_scaling_factor=1.0)),
    ("gemma3", dict(local_rope_max_wavelength=None)),
    ("gemma3", dict(sliding_window_pattern=2)),
    ("gemma3", dict(use_sliding_window_attention=False)),
    ("gemma3_mm", dict(rope_max_wavelength=10_000.0)),
])
def test_features_under_test_change_the_logits(case, change, hf_checkpoint, vocab_size):
    """Guards the parity tests: soft-caps, the sliding window and the query scale must matter
    at this scale, or matching the reference with them would prove nothing."""
    directory, model = hf_checkpoint(case)
    ids, mask = token_batch(vocab_size)
    reference = hf_logits(model, ids, mask)
    base = gk.GemmaCausalLM.from_preset(directory, dtype="float32")
    variant = gk.GemmaCausalLM(gk.GemmaBackbone(base.config.replace(**change)))
    variant.backbone.set_weights(base.backbone.get_weights())
    assert max_diff_on_real_tokens(logits_of(variant, ids, mask), reference, mask) > 1e-2


@pytest.mark.parametrize("case", ["gemma_mqa", "gemma2_gqa"])
def test_configs_written_by_transformers_4_38_to_4_42_load(case, hf_checkpoint, vocab_size):
    """Hub configs of Gemma (transformers 4.38) say hidden_act "gelu" although the model is
    tanh-GELU; Gemma 2 ones (4.42) add sliding_window_size and cache_implementation. Both
    use rope_theta and torch_dtype where transformers 5 writes rope_parameters and dtype."""
    directory, model = hf_checkpoint(case)
    config = json.loads((directory / "config.json").read_text())
    for key in ("hidden_activation", "rope_parameters", "dtype", "layer_types",
                "use_bidirectional_attention"):
        config.pop(key, None)
    config.update(rope_theta=10000.0, torch_dtype="float32", rope_scaling=None)
    if case.startswith("gemma2"):
        config.update(hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                      sliding_window_size=config["sliding_window"],
                      cache_implementation="hybrid", transformers_version="4.42.0.dev0")
    else:
        config.update(hidden_act="gelu", transformers_version="4.38.0.dev0")
    (directory / "config.json").write_text(json.dumps(config))
    ids, mask = token_batch(vocab_size)
    lm = gk.GemmaCausalLM.from_preset(str(directory))
    assert max_diff_on_real_tokens(logits_of(lm, ids, mask), hf_logits(model, ids, mask),
                                   mask) < TOL


def _rename_tensors(directory, rename):
    """Rewrites every safetensors shard (and the index) of `directory` with names rename(n)."""
    from safetensors.numpy import load_file, save_file

    for file in directory.glob("*.safetensors"):
        save_file({rename(k): v for k, v in load_file(file).items()}, file,
                  metadata={"format": "pt"})
    index = directory / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))


@pytest.mark.parametrize("case", ["gemma3", "gemma3_mm"])
def test_gemma3_as_transformers_4_50_wrote_it_loads(case, hf_checkpoint, vocab_size):
    """The hub's Gemma 3 files were written by transformers 4.50: rope_theta,
    rope_local_base_freq, rope_scaling and sliding_window_pattern instead of rope_parameters
    and layer_types; a multimodal config's text_config omits every default (heads, head dim,
    vocabulary, ...); multimodal weights under language_model.model.* and vision_tower.*."""
    directory, model = hf_checkpoint(case)
    config = json.loads((directory / "config.json").read_text())
    text = config["text_config"] if case == "gemma3_mm" else config
    for key in ("rope_parameters", "layer_types", "dtype"):
        text.pop(key, None)
    text.update(rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window_pattern=6,
                torch_dtype="float32", transformers_version="4.50.0.dev0")
    if case == "gemma3_mm":
        # 4.50 left out of text_config what equals Gemma3TextConfig's defaults.
        for key in ("rms_norm_eps", "max_position_embeddings", "hidden_activation",
                    "final_logit_softcapping", "attn_logit_softcapping"):
            text.pop(key, None)
        _rename_tensors(directory, lambda n: n.replace(
            "model.language_model.", "language_model.model.").replace(
            "model.vision_tower.", "vision_tower.").replace(
            "model.multi_modal_projector.", "multi_modal_projector."))
    (directory / "config.json").write_text(json.dumps(config))
    ids, mask = token_batch(vocab_size)
    with pytest.warns(UserWarning, match="image tower is not read") if case == "gemma3_mm" \
            else _no_warning():
        lm = gk.GemmaCausalLM.from_preset(str(directory))
    assert lm.config.global_rope_scaling_factor == 8.0
    assert lm.config.local_rope_max_wavelength == 10_000.0
    assert max_diff_on_real_tokens(logits_of(lm, ids, mask), hf_logits(model, ids, mask),
                                   mask) < TOL


class _no_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


@pytest.mark.parametrize("case", ["gemma_mqa", "gemma_mha", "gemma2_gqa"])
@pytest.mark.parametrize("sharded", [False, True])
def test_keras_hub_preset_logits_match_keras_hub(case, sharded, keras_hub_preset, vocab_size):
    directory, reference_lm = keras_hub_preset(case, max_shard_size=1e-4 if sharded else None)
    assert (directory / "model.weights.json").is_file() == sharded
    ids, mask = token_batch(vocab_size)
    lm = gk.GemmaCausalLM.from_preset(directory)
    assert lm.tokenizer is not None
    assert max_diff_on_real_tokens(logits_of(lm, ids, mask),
                                   keras_hub_logits(reference_lm, ids, mask), mask) < TOL


def test_keras_hub_27b_style_preset_keeps_its_query_scale(keras_hub_preset, hf_checkpoint,
                                                          vocab_size):
    """keras-hub 0.32 ignores query_head_dim_normalize=False in its layers, so its logits are
    no reference for a 27B-style config; HF's are. Load the same weights both ways."""
    _, model = hf_checkpoint("gemma2_27b_style")
    directory, _ = keras_hub_preset("gemma2_27b_style")
    lm = gk.GemmaCausalLM.from_preset(directory)
    assert lm.config.query_head_dim_normalize is False
    assert lm.config.query_scale == pytest.approx(1 / 4)
    # Same weights from the HF model, put in through the HF reader, must give HF's logits.
    hf_lm = gk.GemmaCausalLM.from_preset(hf_checkpoint("gemma2_27b_style")[0])
    lm.backbone.set_weights(hf_lm.backbone.get_weights())
    ids, mask = token_batch(vocab_size)
    assert max_diff_on_real_tokens(logits_of(lm, ids, mask), hf_logits(model, ids, mask),
                                   mask) < TOL


def test_old_keras_nlp_registered_name_loads(keras_hub_preset, vocab_size):
    directory, reference_lm = keras_hub_preset("gemma_mqa")
    config = json.loads((directory / "config.json").read_text())
    config["registered_name"] = "keras_nlp>GemmaBackbone"
    config["module"] = "keras_nlp.src.models.gemma.gemma_backbone"
    (directory / "config.json").write_text(json.dumps(config))
    ids, mask = token_batch(vocab_size)
    lm = gk.GemmaCausalLM.from_preset(directory)
    assert max_diff_on_real_tokens(logits_of(lm, ids, mask),
                                   keras_hub_logits(reference_lm, ids, mask), mask) < TOL


@pytest.mark.parametrize("case", ["gemma_mqa", "gemma2_gqa"])
@pytest.mark.parametrize("max_shard_size", [None, 1e-4])
def test_save_to_preset_round_trips_through_keras_hub(case, max_shard_size, hf_checkpoint,
                                                      tmp_path, vocab_size):
    import keras_hub

    directory, _ = hf_checkpoint(case)
    lm = gk.GemmaCausalLM.from_preset(directory)
    out = tmp_path / "saved"
    lm.save_to_preset(out, max_shard_size=max_shard_size)
    ids, mask = token_batch(vocab_size)
    ours = logits_of(lm, ids, mask)

    theirs = keras_hub.models.GemmaCausalLM.from_preset(str(out))
    assert max_diff_on_real_tokens(keras_hub_logits(theirs, ids, mask), ours, mask) < TOL
    # keras-hub's tokenizer reads the same vocabulary we wrote.
    assert theirs.preprocessor.tokenizer.vocabulary_size() == lm.tokenizer.vocabulary_size

    again = gk.GemmaCausalLM.from_preset(out)
    assert again.config == lm.config
    for a, b in zip(again.backbone.get_weights(), lm.backbone.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_27b_style_config_survives_round_trip(hf_checkpoint, tmp_path):
    lm = gk.GemmaCausalLM.from_preset(hf_checkpoint("gemma2_27b_style")[0])
    lm.save_to_preset(tmp_path / "p")
    assert gk.GemmaCausalLM.from_preset(tmp_path / "p").config == lm.config


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_load_stays_close_to_float32(dtype, hf_checkpoint, vocab_size):
    directory, _ = hf_checkpoint("gemma2_gqa")
    ids, mask = token_batch(vocab_size)
    full = logits_of(gk.GemmaCausalLM.from_preset(directory, dtype="float32"), ids, mask)
    lm = gk.GemmaCausalLM.from_preset(directory, dtype=dtype)
    assert {keras.backend.standardize_dtype(w.dtype) for w in lm.backbone.weights} == {dtype}
    low = logits_of(lm, ids, mask).astype("float32")
    drift = max_diff_on_real_tokens(low, full, mask)
    scale = float(np.abs(full).max())
    # Measured drift is ~1% of the logit range in bf16; 5% means something is wrong, and
    # equality would mean the load ignored dtype.
    assert 0 < drift < 0.05 * scale, (drift, scale)
    agree = (low.argmax(-1) == full.argmax(-1))[mask.astype(bool)].mean()
    assert agree > 0.9


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_presets_round_trip_bit_exactly(dtype, hf_checkpoint, tmp_path):
    lm = gk.GemmaCausalLM.from_preset(hf_checkpoint("gemma2_gqa")[0], dtype=dtype)
    lm.save_to_preset(tmp_path / "p", max_shard_size=1e-4)
    again = gk.GemmaCausalLM.from_preset(tmp_path / "p")  # keeps the saved dtype
    assert again.backbone.dtype_policy.name == dtype
    for a, b in zip(again.backbone.weights, lm.backbone.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a.value),
                                      keras.ops.convert_to_numpy(b.value))


@pytest.mark.parametrize("case", list(HF_CASES))
@pytest.mark.parametrize("max_shard_size", [None, 1e-4])
def test_hf_format_save_loads_in_transformers_with_the_same_logits(case, max_shard_size,
                                                                   keras_hub_preset, tmp_path,
                                                                   vocab_size, hf_checkpoint):
    import torch
    import transformers

    # Start from the other layout, so the names and kernels really go through the writer.
    source = (hf_checkpoint(case)[0] if case in HF_ONLY_CASES  # keras-hub: not a reference
              else keras_hub_preset(case)[0])
    lm = gk.GemmaCausalLM.from_preset(source, dtype="float32")
    out = tmp_path / "hf_out"
    lm.save_to_preset(out, max_shard_size=max_shard_size, format="hf")
    assert (out / "model.safetensors.index.json").is_file() == (max_shard_size is not None)
    ids, mask = token_batch(vocab_size)
    ours = logits_of(lm, ids, mask)
    # A multimodal Gemma 3's text part is written as a text-only Gemma 3.
    model_class = {"gemma": transformers.GemmaForCausalLM,
                   "gemma2": transformers.Gemma2ForCausalLM,
                   "gemma3_text": transformers.Gemma3ForCausalLM,
                   "gemma3": transformers.Gemma3ForCausalLM}[HF_CASES[case]["model_type"]]
    kwargs = {} if model_class is transformers.GemmaForCausalLM \
        else {"attn_implementation": "eager"}
    theirs = model_class.from_pretrained(out, torch_dtype=torch.float32, **kwargs).eval()
    assert max_diff_on_real_tokens(hf_logits(theirs, ids, mask), ours, mask) < TOL
    again = gk.GemmaCausalLM.from_preset(out)
    assert again.config == lm.config and again.tokenizer.proto == lm.tokenizer.proto
    for a, b in zip(again.backbone.get_weights(), lm.backbone.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_hf_format_save_keeps_bfloat16_and_refuses_hybrids(hf_checkpoint, tmp_path):
    lm = gk.GemmaCausalLM.from_preset(hf_checkpoint("gemma2_gqa")[0], dtype="bfloat16")
    lm.save_to_preset(tmp_path / "bf16", format="hf")
    again = gk.GemmaCausalLM.from_preset(tmp_path / "bf16")
    assert again.backbone.dtype_policy.name == "bfloat16"
    for a, b in zip(again.backbone.weights, lm.backbone.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a.value),
                                      keras.ops.convert_to_numpy(b.value))
    # Gemma 1 blocks with Gemma 2's soft-cap: no transformers class computes that.
    hybrid = gk.GemmaCausalLM(gk.GemmaBackbone(lm.config.replace(
        use_post_attention_norm=False, use_post_ffw_norm=False,
        use_sliding_window_attention=False)))
    with pytest.raises(gk.ConfigError, match="keras-hub preset"):
        hybrid.save_to_preset(tmp_path / "hybrid", format="hf")
    assert not (tmp_path / "hybrid").exists()
