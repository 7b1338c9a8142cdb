"""Quantized models as files: quantize() arguments, quantizing while loading (equal to
quantize-after-load, bit for bit), quantized presets saved and loaded back exactly, the
keras-hub interchange of int8 presets, and the clear refusals (HF format, keras-hub's int4).
Round trips run on every backend; the keras-hub interchange (NumPy layout code, the same on
every backend) in one backend's pass."""

import json

import h5py
import keras
import numpy as np
import pytest

import gemma_keras as gk
from conftest import keras_hub_kwargs, keras_hub_logits, logits_of, token_batch

CASE = "gemma2_gqa"  # hidden 64, 4 x 16 query heads, 2 kv heads, FFN branch 96


@pytest.fixture
def float_preset(hf_checkpoint):
    """A small HF checkpoint (float32) with a tokenizer: its directory."""
    directory, _ = hf_checkpoint(CASE, std=0.1)
    return directory


def _variables(lm):
    return {v.path: keras.ops.convert_to_numpy(v) for v in lm.backbone.weights}


def _policies(lm):
    return {layer.path: layer.dtype_policy.name for layer in lm.backbone._flatten_layers()
            if getattr(layer, "quantization_mode", None) is not None}


def _input_quantizers(lm):
    """Which quantized layers round their inputs in Keras' own quantized calls."""
    return {layer.path: getattr(layer, "inputs_quantizer", None) is not None
            for layer in lm.backbone._flatten_layers()
            if getattr(layer, "quantization_mode", None) is not None}


def assert_same_model(a, b):
    """Every variable identical (names, dtypes, values) and the same quantization."""
    va, vb = _variables(a), _variables(b)
    assert va.keys() == vb.keys(), va.keys() ^ vb.keys()
    for path in va:
        assert va[path].dtype == vb[path].dtype, path
        assert np.array_equal(va[path], vb[path]), path
    assert _policies(a) == _policies(b)
    assert _input_quantizers(a) == _input_quantizers(b)


def _generate_ids(lm, ids):
    out = lm.generate({"token_ids": ids, "padding_mask": np.ones_like(ids)}, max_new_tokens=3,
                      stop_token_ids=None)
    return np.asarray(out["token_ids"])


# ---- quantize() ---------------------------------------------------------------------------
def test_quantize_takes_a_block_size_and_refuses_bad_arguments(vocab_size):
    def tiny():
        return gk.GemmaCausalLM(gk.GemmaBackbone(**keras_hub_kwargs(CASE, vocab_size)))

    query = "decoder_block_0/attention/query"
    for kwargs, policy in (({}, "int4/128"), ({"block_size": 32}, "int4/32"),
                           ({"block_size": None}, "int4/-1"), ({"block_size": -1}, "int4/-1"),
                           ({"config": keras.quantizers.Int4QuantizationConfig(block_size=16)},
                            "int4/16")):
        lm = tiny()
        lm.quantize("int4", **kwargs)
        assert _policies(lm)[query] == f"{policy}_from_float32", kwargs
    lm = tiny()
    lm.quantize("int8")
    assert set(_policies(lm).values()) == {"int8_from_float32"}
    assert len(_policies(lm)) == 1 + 7 * lm.config.num_layers  # embedding + 7 per block
    lm = tiny()
    lm.quantize("int8", filters="ffw")  # Keras' filters still apply
    assert all("ffw" in path for path in _policies(lm))
    lm = tiny()
    for bad, message in ((dict(mode="int2"), "mode='int2'"), (dict(mode=None), "mode=None"),
                         (dict(mode="int4", block_size=0), "block_size=0"),
                         (dict(mode="int4", block_size=-2), "block_size=-2"),
                         (dict(mode="int4", block_size=1.5), "block_size=1.5"),
                         (dict(mode="int4", block_size=True), "block_size=True")):
        with pytest.raises(gk.ConfigError, match=message):
            lm.quantize(**bad)
    assert not _policies(lm)  # nothing was quantized by a refused call
    with pytest.raises(gk.ConfigError, match="quantize='int3'"):
        gk.GemmaCausalLM.from_preset("/nonexistent", quantize="int3")  # before any I/O


# ---- quantizing while loading ---------------------------------------------------------------
# Quantizing is NumPy and Keras code common to the backends: the int4 variants each run in
# one backend's pass (suite time), int8 and the default int4 in all.
@pytest.mark.parametrize("mode,block_size,dtype", [
    ("int8", 128, None),
    ("int4", 128, None),     # wider than every input axis: one group per output (in 64, 96)
    pytest.param("int4", 32, None, marks=pytest.mark.once("jax")),  # several groups per row
    pytest.param("int4", None, "bfloat16",  # per channel, bfloat16 weights
                 marks=pytest.mark.once("torch")),
])
def test_quantizing_while_loading_equals_quantizing_after(float_preset, vocab_size, mode,
                                                          block_size, dtype, monkeypatch):
    from gemma_keras.checkpoints import quantizing

    # The embedding table is quantized in chunks of rows while loading: 37 rows here, so
    # there are several chunks and a shorter last one.
    monkeypatch.setattr(quantizing, "TABLE_CHUNK_ELEMENTS", 37 * 64)
    after = gk.GemmaCausalLM.from_preset(float_preset, dtype=dtype)
    after.quantize(mode, block_size=block_size)  # the table in chunks too
    # Keras' own Model.quantize loop, the table quantized in one go: the reference.
    keras_way = gk.GemmaCausalLM.from_preset(float_preset, dtype=dtype)
    keras.Model.quantize(keras_way, mode, config=quantizing.resolve(mode, block_size)[1])
    loaded = gk.GemmaCausalLM.from_preset(float_preset, dtype=dtype, quantize=mode,
                                          block_size=block_size)
    assert_same_model(after, keras_way)
    assert_same_model(loaded, keras_way)
    assert _policies(loaded)  # it was quantized
    ids, mask = token_batch(vocab_size)
    np.testing.assert_array_equal(logits_of(loaded, ids, mask), logits_of(after, ids, mask))


def test_quantize_filters_decide_about_the_table_too(float_preset):
    from gemma_keras.checkpoints import quantizing

    table_name = "token_embedding"
    only_table = gk.GemmaCausalLM.from_preset(float_preset)
    only_table.quantize("int8", filters=table_name)
    assert list(_policies(only_table)) == [only_table.backbone.token_embedding.path]
    without = gk.GemmaCausalLM.from_preset(float_preset)
    without.quantize("int8", filters=lambda layer: layer.name != table_name)
    assert _policies(without) and without.backbone.token_embedding.path not in _policies(without)
    keras_way = gk.GemmaCausalLM.from_preset(float_preset)
    keras.Model.quantize(keras_way, "int8", filters=lambda layer: layer.name != table_name)
    assert_same_model(without, keras_way)
    # A second quantize is refused with Keras' own error, the table included, and keeps it.
    with pytest.raises(ValueError, match="already quantized"):
        quantizing.quantize_built_table(only_table.backbone.token_embedding, "int8", None)
    assert only_table.backbone.token_embedding.quantization_mode == "int8"


def test_quantize_on_load_leaves_no_build_hook(float_preset):
    lm = gk.GemmaCausalLM.from_preset(float_preset, quantize="int8")
    layer = lm.backbone.transformer_layers[0].attention.query
    assert not hasattr(layer.build, "gemma_keras_original")
    # torch keeps a parameter dict per layer: it must hold the int8 kernel, not the float one.
    params = getattr(layer, "torch_params", None)
    if params is not None:
        assert {str(p.dtype) for p in params.values()} <= {"torch.int8", "torch.float32"}
        assert len(params) == len(layer.variables)


# ---- quantized presets ----------------------------------------------------------------------
@pytest.mark.parametrize("mode,block_size,shard", [
    ("int8", 128, None),
    ("int8", 128, 0.00002),  # sharded: ~20 KB per file
    ("int4", 32, None),
])
def test_quantized_preset_round_trip_is_bit_exact(float_preset, tmp_path, vocab_size, mode,
                                                  block_size, shard):
    lm = gk.GemmaCausalLM.from_preset(float_preset, quantize=mode, block_size=block_size)
    lm.save_to_preset(tmp_path / "q", max_shard_size=shard)
    loaded = gk.GemmaCausalLM.from_preset(tmp_path / "q")
    assert_same_model(loaded, lm)
    assert loaded.tokenizer is not None and loaded.instruct == lm.instruct
    ids, mask = token_batch(vocab_size)
    np.testing.assert_array_equal(logits_of(loaded, ids, mask), logits_of(lm, ids, mask))
    if shard is None:  # sharding changes the files, not the model: one generation suffices
        np.testing.assert_array_equal(_generate_ids(loaded, ids[:1, :6]),
                                      _generate_ids(lm, ids[:1, :6]))
    # Asking for the quantization it has is fine; another one is refused.
    again = gk.GemmaCausalLM.from_preset(tmp_path / "q", quantize=mode, block_size=block_size)
    assert _policies(again) == _policies(lm)
    with pytest.raises(gk.ConfigError, match="quantized weights"):
        gk.GemmaCausalLM.from_preset(tmp_path / "q", quantize="int4", block_size=64)
    # An existing target is refused unless overwrite=True, as for float presets.
    with pytest.raises(gk.TargetExistsError):
        lm.save_to_preset(tmp_path / "q")
    lm.save_to_preset(tmp_path / "q", overwrite=True)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_preset_with_adapters_holds_them_merged(float_preset, tmp_path, vocab_size,
                                                            mode):
    """As keras-hub saves a quantized LoRA model: the adapters folded into the kernels, which
    are quantized again (so the logits keep the adapters' effect up to that rounding)."""
    lm = gk.GemmaCausalLM.from_preset(float_preset, quantize=mode, block_size=32)
    ids, mask = token_batch(vocab_size)
    base = logits_of(lm, ids, mask)
    lm.backbone.enable_lora(rank=2, target_names=("query", "ffw_gating"))
    rng = np.random.RandomState(0)
    for variable in lm.backbone.trainable_variables:
        variable.assign(rng.normal(0, 0.2, variable.shape).astype("float32"))
    tuned = logits_of(lm, ids, mask)
    lm.save_to_preset(tmp_path / "merged")
    loaded = gk.GemmaCausalLM.from_preset(tmp_path / "merged")
    assert not any("lora" in v.path for v in loaded.backbone.weights)
    assert _policies(loaded) == _policies(lm)
    valid = mask.astype(bool)
    effect = np.abs(tuned - base)[valid].max()
    error = np.abs(logits_of(loaded, ids, mask) - tuned)[valid].max()
    assert effect > 1.0 and error < 0.2 * effect, (effect, error)


def test_hf_format_refuses_a_quantized_model(float_preset, tmp_path):
    lm = gk.GemmaCausalLM.from_preset(float_preset, quantize="int4")
    with pytest.raises(gk.ConfigError, match=r"format='hf'.*int4/128-quantized.*keras_hub"):
        lm.save_to_preset(tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.once("torch")
def test_a_damaged_quantized_preset_is_a_clear_error(float_preset, tmp_path):
    lm = gk.GemmaCausalLM.from_preset(float_preset, quantize="int8")
    lm.save_to_preset(tmp_path / "q")
    with h5py.File(tmp_path / "q" / "model.weights.h5", "r+") as h5:
        group = h5["layers/gemma_decoder_block/attention/query_dense/vars"]
        scale = group["1"][...]
        del group["1"]
        group["1"] = scale[..., :-1]  # one output channel short
    with pytest.raises(gk.WeightShapeError, match="'decoder_block_0/query'"):
        gk.GemmaCausalLM.from_preset(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    policy_map = config["config"]["dtype"]["config"]["policy_map"]
    policy_map["decoder_block_0/attention/query"]["config"]["mode"] = "float8"
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(gk.ConfigError, match="'float8'"):
        gk.GemmaCausalLM.from_preset(tmp_path / "q")


# ---- keras-hub ------------------------------------------------------------------------------
@pytest.mark.once("jax")
def test_keras_hub_loads_our_int8_preset_as_its_own_int8(keras_hub_preset, tmp_path,
                                                         vocab_size):
    """Our int8 preset is what keras-hub's own quantize("int8") makes of the same float
    weights: every variable identical, the same logits in keras-hub."""
    import keras_hub

    directory, _ = keras_hub_preset(CASE)
    ours = gk.GemmaCausalLM.from_preset(directory, quantize="int8")
    ours.save_to_preset(tmp_path / "q")
    theirs = keras_hub.models.GemmaCausalLM.from_preset(str(tmp_path / "q"))
    reference = keras_hub.models.GemmaCausalLM.from_preset(str(directory))
    reference.backbone.quantize("int8")
    got = {v.path: keras.ops.convert_to_numpy(v) for v in theirs.backbone.weights}
    want = {v.path: keras.ops.convert_to_numpy(v) for v in reference.backbone.weights}
    assert got.keys() == want.keys() and any(v.dtype == np.int8 for v in got.values())
    for path in want:
        assert got[path].dtype == want[path].dtype and np.array_equal(got[path], want[path])
    ids, mask = token_batch(vocab_size)
    keras_hub_int8 = keras_hub_logits(theirs, ids, mask)
    np.testing.assert_array_equal(keras_hub_int8, keras_hub_logits(reference, ids, mask))
    # keras-hub also rounds the activations to int8 (ours are weight-only): close, not equal.
    valid = mask.astype(bool)
    ours_logits = logits_of(ours, ids, mask)
    span = np.ptp(ours_logits[valid])
    assert np.abs(keras_hub_int8 - ours_logits)[valid].max() < 0.03 * span


@pytest.mark.once("tensorflow")
def test_keras_hub_int8_presets_load_here_and_int4_is_refused_both_ways(
        keras_hub_preset, tmp_path):
    import keras_hub

    directory, _ = keras_hub_preset(CASE)
    theirs = keras_hub.models.GemmaCausalLM.from_preset(str(directory))
    theirs.backbone.quantize("int8")
    theirs.save_to_preset(str(tmp_path / "kh_int8"))
    expected = gk.GemmaCausalLM.from_preset(directory)
    expected.quantize("int8")
    assert_same_model(gk.GemmaCausalLM.from_preset(tmp_path / "kh_int8"), expected)

    theirs = keras_hub.models.GemmaCausalLM.from_preset(str(directory))
    theirs.backbone.quantize("int4")
    theirs.save_to_preset(str(tmp_path / "kh_int4"))
    with pytest.raises(gk.ConfigError, match="int4/128-quantized in keras-hub's layout"):
        gk.GemmaCausalLM.from_preset(tmp_path / "kh_int4")
    # Our int4 preset: keras-hub refuses it loudly rather than misreading the weights.
    ours = gk.GemmaCausalLM.from_preset(directory, quantize="int4")
    ours.save_to_preset(tmp_path / "ours_int4")
    with pytest.raises(ValueError, match="could not be loaded"):
        keras_hub.models.GemmaCausalLM.from_preset(str(tmp_path / "ours_int4"))
    # A file from another version of our int4 layout is refused, not misread.
    path = tmp_path / "ours_int4" / "metadata.json"
    metadata = json.loads(path.read_text())
    assert metadata["gemma_keras"]["quantization"]["layout"] == "gemma_keras"
    metadata["gemma_keras"]["quantization"]["version"] = 0
    path.write_text(json.dumps(metadata))
    with pytest.raises(gk.CheckpointError, match="version 0 of gemma_keras' layout"):
        gk.GemmaCausalLM.from_preset(tmp_path / "ours_int4")
