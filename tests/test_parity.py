"""Logit parity with the reference implementations, on checkpoints they write at test time."""

import json

import keras
import numpy as np
import pytest

import gemma_keras as gk
from conftest import (HF_CASES, HF_ONLY_CASES, hf_logits, keras_hub_kwargs, keras_hub_lm,
                      keras_hub_logits, logits_of, max_diff_on_real_tokens, token_batch)

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


@pytest.mark.parametrize("case", ["gemma_mqa", "gemma_mha", "gemma2_gqa", "gemma3_mm"])
@pytest.mark.parametrize("sharded", [False, True])
def test_keras_hub_preset_logits_match_keras_hub(case, sharded, keras_hub_preset, vocab_size):
    directory, reference_lm = keras_hub_preset(case, max_shard_size=1e-4 if sharded else None)
    assert (directory / "model.weights.json").is_file() == sharded
    ids, mask = token_batch(vocab_size)
    lm = gk.GemmaCausalLM.from_preset(directory)
    assert lm.tokenizer is not None
    assert max_diff_on_real_tokens(logits_of(lm, ids, mask),
                                   keras_hub_logits(reference_lm, ids, mask), mask) < TOL


def _keras_hub_text_logits(lm, ids, mask):
    """keras-hub's logits of a Gemma3CausalLM with a vision encoder for a prompt without
    images: its layers in the order its Gemma3CausalLM.call_with_cache runs them when there
    are no images (its graph, given zero images, equals this on JAX, but TensorFlow's Conv2D
    refuses an empty batch)."""
    backbone = lm.backbone
    x = backbone.token_embedding(ids)
    x = x * keras.ops.cast(keras.ops.sqrt(backbone.hidden_dim), x.dtype)
    for block in backbone.transformer_layers:
        x = block(x, padding_mask=mask)
    hidden = backbone.layer_norm(x)
    return keras.ops.convert_to_numpy(backbone.token_embedding(hidden, reverse=True))


def test_keras_hub_gemma3_preset_with_a_vision_encoder_loads_its_text_part(keras_hub_preset,
                                                                           vocab_size):
    import warnings

    directory, reference_lm = keras_hub_preset("gemma3_mm", vision=True)
    assert json.loads((directory / "config.json").read_text())["config"]["vision_encoder"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = gk.GemmaCausalLM.from_preset(directory)
    said = [w for w in caught if issubclass(w.category, UserWarning)
            and "image tower is not read" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]
    assert lm.backbone.count_params() == lm.config.parameter_count()  # the text model alone
    ids, mask = token_batch(vocab_size)
    assert max_diff_on_real_tokens(logits_of(lm, ids, mask),
                                   _keras_hub_text_logits(reference_lm, ids, mask), mask) < TOL


def test_keras_hub_gemma3_config_maps_onto_ours(keras_hub_preset):
    """keras-hub's Gemma3Backbone: one GeGLU branch, RoPE 10k local / 1M global fixed, five
    local layers to one global; no context length recorded (128k when the global RoPE is
    stretched, 32k otherwise); embedding models refused."""
    directory, reference_lm = keras_hub_preset("gemma3_mm")
    config = gk.GemmaCausalLM.from_preset(directory).config
    theirs = reference_lm.backbone
    assert config.intermediate_dim == 2 * theirs.intermediate_dim
    assert config.ffn_branch_dim == theirs.transformer_layers[0].gating_ffw.kernel.shape[1]
    assert (config.sliding_window_pattern, config.rope_max_wavelength,
            config.local_rope_max_wavelength) == (6, 1_000_000.0, 10_000.0)
    assert [config.attention_kind(i) == "local" for i in range(config.num_layers)] == [
        layer.attention.use_sliding_window_attention for layer in theirs.transformer_layers]
    assert [config.rope(config.attention_kind(i)) for i in range(config.num_layers)] == [
        (layer.attention.rope_wavelength, layer.attention.rope_scaling_factor)
        for layer in theirs.transformer_layers]
    assert config.use_query_key_norm and config.query_pre_attn_scalar is None
    assert config.max_sequence_length == 131_072  # global_rope_scaling_factor 8

    path = directory / "config.json"
    data = json.loads(path.read_text())
    data["config"]["global_rope_scaling_factor"] = 1.0
    path.write_text(json.dumps(data))
    assert gk.GemmaCausalLM.from_preset(directory).config.max_sequence_length == 32_768
    for key in ("is_embedding_model", "use_bidirectional_attention"):
        changed = json.loads(json.dumps(data))
        changed["config"][key] = True
        path.write_text(json.dumps(changed))
        with pytest.raises(gk.ConfigError, match=f"embedding model \\({key} is true"):
            gk.GemmaCausalLM.from_preset(directory)


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


@pytest.mark.parametrize("case", ["gemma_mqa", "gemma2_gqa", "gemma3_mm"])
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

    gemma3 = case.startswith("gemma3")
    title = "Gemma3" if gemma3 else "Gemma"
    written = json.loads((out / "config.json").read_text())
    assert written["registered_name"] == f"keras_hub>{title}Backbone"
    assert written["module"] == f"keras_hub.src.models.{title.lower()}.{title.lower()}_backbone"
    if gemma3:  # its vocabulary has the image pieces keras-hub's tokenizer looks up
        assert json.loads((out / "tokenizer.json").read_text())["config"]["has_vision_tokens"]
    theirs = getattr(keras_hub.models, f"{title}CausalLM").from_preset(str(out))
    assert max_diff_on_real_tokens(keras_hub_logits(theirs, ids, mask), ours, mask) < TOL
    # keras-hub's tokenizer reads the same vocabulary we wrote.
    assert theirs.preprocessor.tokenizer.vocabulary_size() == lm.tokenizer.vocabulary_size

    again = gk.GemmaCausalLM.from_preset(out)
    assert again.config == lm.config
    for a, b in zip(again.backbone.get_weights(), lm.backbone.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_gemma3_fields_keras_hub_cannot_take_survive_its_preset(hf_checkpoint, tmp_path):
    """A query_pre_attn_scalar that is neither head_dim nor hidden / heads (the gemma3 case's
    24), another local / global pattern, other RoPE bases and context length: keras-hub's
    Gemma3Backbone cannot say them, metadata.json does, and they load back exactly."""
    lm = gk.GemmaCausalLM.from_preset(hf_checkpoint("gemma3")[0])
    assert lm.config.query_pre_attn_scalar == 24
    changed = gk.GemmaCausalLM(gk.GemmaBackbone(lm.config.replace(
        sliding_window_pattern=3, local_rope_max_wavelength=5_000.0,
        rope_max_wavelength=500_000.0, max_sequence_length=4096)), tokenizer=lm.tokenizer)
    changed.backbone.set_weights(lm.backbone.get_weights())
    for model, name in ((lm, "as_read"), (changed, "changed")):
        model.save_to_preset(tmp_path / name)
        assert json.loads((tmp_path / name / "config.json").read_text())[
            "registered_name"] == "keras_hub>Gemma3Backbone"
        again = gk.GemmaCausalLM.from_preset(tmp_path / name)
        assert again.config == model.config
        for a, b in zip(again.backbone.get_weights(), model.backbone.get_weights()):
            np.testing.assert_array_equal(a, b)


def test_keras_hub_gemma3_27b_style_preset_keeps_its_query_scale(tmp_path, gemma3_spm_path,
                                                                 vocab_size):
    """Gemma 3 27B scales queries by (hidden / heads) ** -0.5 (keras-hub's
    query_head_dim_normalize=False, which its layers ignore): read, kept through our keras-hub
    preset, and computed as transformers does (query_pre_attn_scalar 16 here, head_dim 32)."""
    import keras_hub
    import torch
    import transformers

    reference = keras_hub_lm("gemma3_mm", vocab_size, gemma3_spm_path)
    kwargs = dict(keras_hub_kwargs("gemma3_mm", vocab_size), head_dim=32,
                  query_head_dim_normalize=False)
    backbone = keras_hub.models.Gemma3Backbone(**kwargs)
    rng = np.random.RandomState(0)
    for variable in backbone.weights:
        variable.assign(rng.normal(0, 0.5 if "norm" in variable.path else 0.25,
                                   variable.shape).astype("float32"))
    keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=reference.preprocessor
                                    ).save_to_preset(str(tmp_path / "kh"))
    lm = gk.GemmaCausalLM.from_preset(tmp_path / "kh")
    assert lm.config.query_head_dim_normalize is False
    assert lm.config.query_scale == pytest.approx(1 / 4)
    lm.save_to_preset(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["config"][
        "query_head_dim_normalize"] is False
    assert gk.GemmaCausalLM.from_preset(tmp_path / "ours").config == lm.config
    lm.save_to_preset(tmp_path / "hf", format="hf")
    theirs = transformers.Gemma3ForCausalLM.from_pretrained(
        tmp_path / "hf", torch_dtype=torch.float32, attn_implementation="eager").eval()
    assert theirs.config.query_pre_attn_scalar == 16
    ids, mask = token_batch(vocab_size)
    assert max_diff_on_real_tokens(hf_logits(theirs, ids, mask), logits_of(lm, ids, mask),
                                   mask) < TOL


@pytest.mark.once("torch")  # 84 s on the JAX pass (keras-hub's quantize and loads), the longest
def test_keras_hub_gemma3_int8_presets_load_both_ways(keras_hub_preset, tmp_path):
    """int8 Gemma 3 as for Gemma 1 and 2: keras-hub's quantize("int8") preset loads here as
    our quantize("int8") of the float preset, and ours loads in keras-hub as its own."""
    import keras_hub

    directory, _ = keras_hub_preset("gemma3_mm")

    def variables(backbone):
        return {v.path: keras.ops.convert_to_numpy(v) for v in backbone.weights}

    theirs = keras_hub.models.Gemma3CausalLM.from_preset(str(directory))
    theirs.backbone.quantize("int8")
    theirs.save_to_preset(str(tmp_path / "kh_int8"))
    expected = gk.GemmaCausalLM.from_preset(directory)
    expected.quantize("int8")
    got = variables(gk.GemmaCausalLM.from_preset(tmp_path / "kh_int8").backbone)
    want = variables(expected.backbone)
    assert got.keys() == want.keys() and any(v.dtype == np.int8 for v in want.values())
    for path in want:
        assert got[path].dtype == want[path].dtype and np.array_equal(got[path], want[path])

    expected.save_to_preset(tmp_path / "ours_int8")
    got = variables(keras_hub.models.Gemma3CausalLM.from_preset(
        str(tmp_path / "ours_int8")).backbone)
    assert got.keys() == (want := variables(theirs.backbone)).keys()
    for path in want:
        assert got[path].dtype == want[path].dtype and np.array_equal(got[path], want[path])


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
                   "vaultgemma": transformers.VaultGemmaForCausalLM,
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
    # A post-attention norm without the post-FFN one: no transformers class computes that
    # (Gemma 2 without both post-norms is VaultGemma, which transformers has).
    hybrid = gk.GemmaCausalLM(gk.GemmaBackbone(lm.config.replace(use_post_ffw_norm=False)))
    with pytest.raises(gk.ConfigError, match="keras-hub preset"):
        hybrid.save_to_preset(tmp_path / "hybrid", format="hf")
    assert not (tmp_path / "hybrid").exists()
