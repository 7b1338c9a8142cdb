"""LoRA and QLoRA through model.fit: what trains, what stays frozen, the loss masking, adapter
files and merging, on every backend."""

import json

import h5py
import keras
import numpy as np
import pytest

import gemma_keras as gk
from conftest import logits_of
from gemma_keras import lora
from gemma_keras.layers.linear import Linear

TEXTS = ["The quick brown fox 3 jumps over the lazy dog number 21.",
         "Keras is a deep learning API written in Python.",
         "Gemma models are lightweight open models from Google.",
         "The quick brown fox 12 jumps over the lazy dog number 84."]
PAIRS = {"prompts": ["The quick brown fox", "Keras is a"],
         "responses": [" jumps over the lazy dog.", " deep learning API."]}


@pytest.fixture
def tiny_lm(hf_checkpoint):
    """case -> a GemmaCausalLM with a tokenizer, from an HF checkpoint written at test time."""
    def make(case="gemma_mqa", seed=0, dtype=None):
        directory, _ = hf_checkpoint(case, seed=seed, std=0.1)
        lm = gk.GemmaCausalLM.from_preset(directory, dtype=dtype)
        lm.preprocessor.sequence_length = 32
        return lm
    return make


def _values(variables):
    return {v.path: keras.ops.convert_to_numpy(v).copy() for v in variables}


def _base_weights(lm):
    """Every weight of the model but the adapters (embedding and norms included)."""
    return _values(v for v in lm.backbone.weights if "lora_kernel" not in v.path)


def _randomize_adapters(backbone, seed=0):
    rng = np.random.RandomState(seed)
    for layer in lora.projections(backbone).values():
        if layer.lora_enabled:
            for v in (layer.lora_kernel_a, layer.lora_kernel_b):
                v.assign(rng.normal(0, 0.2, v.shape).astype("float32"))


@pytest.mark.parametrize("targets", [("query", "value"), lora.ALL_TARGETS])
def test_trainable_parameters_are_the_adapters_and_match_the_formula(tiny_lm, targets):
    lm = tiny_lm("gemma2_gqa")
    lm.backbone.enable_lora(rank=3, target_names=targets)
    trainable = lm.backbone.trainable_variables
    assert trainable and all("lora_kernel" in v.path for v in trainable)
    count = sum(int(np.prod(v.shape)) for v in trainable)
    assert count == lora.lora_parameter_count(lm.config, 3, targets)
    # query: hidden 64 -> 4 heads * 16; value: 64 -> 2 * 16; 3 layers.
    if targets == ("query", "value"):
        assert count == 3 * 3 * ((64 + 64) + (64 + 32))


@pytest.mark.parametrize("case,dtype", [("gemma_mqa", "float32"), ("gemma_mqa", "bfloat16"),
                                        ("gemma3", "bfloat16")])
def test_lora_fit_lowers_the_loss_and_leaves_base_weights_bit_identical(tiny_lm, case, dtype):
    lm = tiny_lm(case, dtype=dtype)  # bfloat16: frozen base in bfloat16, adapters in float32
    lm.backbone.enable_lora(rank=4)
    lm.compile(optimizer=keras.optimizers.Adam(3e-3))
    frozen = _base_weights(lm)
    adapters = _values(lm.backbone.trainable_variables)
    before = lm.evaluate(TEXTS, return_dict=True, verbose=0)["loss"]
    lm.fit(TEXTS, epochs=8, batch_size=2, verbose=0)
    after = lm.evaluate(TEXTS, return_dict=True, verbose=0)["loss"]
    assert after < before - 0.2, (before, after)
    for path, value in _base_weights(lm).items():
        assert np.array_equal(value, frozen[path]), path
    changed = _values(lm.backbone.trainable_variables)
    assert any(not np.array_equal(changed[p], adapters[p]) for p in adapters)


def test_padding_never_changes_the_loss(tiny_lm):
    lm = tiny_lm("gemma2_gqa")
    lm.compile()
    losses = []
    for length in (24, 80):
        x, y, w = lm.preprocessor(TEXTS, sequence_length=length)
        assert x["token_ids"].shape == (4, length)
        losses.append(lm.evaluate(x, y, sample_weight=w, batch_size=4, return_dict=True,
                                  verbose=0)["loss"])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_prompt_response_loss_is_on_responses_only(tiny_lm):
    lm = tiny_lm()
    tok = lm.tokenizer
    x, y, w = lm.preprocessor(PAIRS)
    for row, (prompt, response) in enumerate(zip(PAIRS["prompts"], PAIRS["responses"])):
        trained = y[row][w[row] > 0].tolist()
        assert trained == tok.tokenize(response) + [tok.eos_token_id]
        start = 1 + len(tok.tokenize(prompt))  # <bos> prompt
        assert x["token_ids"][row, :start].tolist() == tok.tokenize(prompt, add_bos=True)
    # The loss fit optimises is the mean cross-entropy of exactly those labels.
    logits = logits_of(lm, x["token_ids"], x["padding_mask"]).astype("float64")
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, y[..., None], -1)[..., 0]
    expected = -(picked * w).sum() / w.sum()
    lm.compile()
    reported = lm.evaluate(PAIRS, batch_size=2, return_dict=True, verbose=0)
    np.testing.assert_allclose(reported["loss"], expected, rtol=1e-5)
    # The perplexity metric is exp of that same mean, over the same labels (one batch).
    np.testing.assert_allclose(reported["perplexity"], np.exp(expected), rtol=1e-5)


@pytest.mark.parametrize("chat_format", [False, True])
def test_tf_data_preprocessing_equals_numpy(tiny_lm, chat_format):
    tf = pytest.importorskip("tensorflow")
    lm = tiny_lm()
    pre = gk.GemmaCausalLMPreprocessor(lm.tokenizer, sequence_length=12,
                                       chat_format=chat_format)  # truncates some rows
    for data in (TEXTS, PAIRS):
        expected = pre(data)
        got = tf.data.Dataset.from_tensor_slices(data).batch(4).map(pre.tf_map())
        got = next(iter(got.as_numpy_iterator()))
        for a, b in zip(keras.tree.flatten(expected), keras.tree.flatten(got)):
            np.testing.assert_array_equal(np.asarray(a).astype(b.dtype), b)
    if chat_format:
        ids = expected[0]["token_ids"][0].tolist()
        assert ids[:2] == [lm.tokenizer.bos_token_id, lm.tokenizer.start_of_turn_id]


def test_fit_takes_strings_pairs_tf_data_and_generators(tiny_lm):
    tf = pytest.importorskip("tensorflow")
    lm = tiny_lm()
    lm.backbone.enable_lora(rank=2)
    history = []
    history.append(lm.fit(TEXTS[0], epochs=1, verbose=0))
    history.append(lm.fit(PAIRS, epochs=1, batch_size=1, verbose=0))
    history.append(lm.fit(tf.data.Dataset.from_tensor_slices(TEXTS).batch(2), verbose=0))
    history.append(lm.fit(tf.data.Dataset.from_tensor_slices(PAIRS), batch_size=2, verbose=0))
    history.append(lm.fit((t for t in TEXTS), batch_size=2, verbose=0))
    history.append(lm.fit(TEXTS[:2], validation_data=PAIRS, verbose=0))
    assert "val_perplexity" in history[-1].history
    for h in history:
        assert np.isfinite(h.history["loss"][-1]) and "perplexity" in h.history


def test_adapter_files_round_trip_exactly_and_merge_keeps_the_logits(tiny_lm, tmp_path,
                                                                      vocab_size):
    from conftest import token_batch

    ids, mask = token_batch(vocab_size)
    lm = tiny_lm("gemma2_gqa")
    base = logits_of(lm, ids, mask)
    lm.backbone.enable_lora(rank=4, alpha=8, target_names=("query", "value", "ffw_linear"))
    _randomize_adapters(lm.backbone)
    adapted = logits_of(lm, ids, mask)
    assert np.abs(adapted - base).max() > 1e-2  # the adapters do change the model
    path = tmp_path / "adapter.lora.h5"
    lm.save_lora_weights(path)
    with h5py.File(path) as f:
        names = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset)
                     else None)
        assert json.loads(f.attrs["state"]) == {"rank": 4, "alpha": 8.0, "target_names": [
            "query", "value", "ffw_linear"]}
    assert len(names) == 3 * 3 * 2 and all("lora_kernel" in n for n in names)
    assert not list(tmp_path.glob(".*tmp*"))  # written through a temporary name

    fresh = tiny_lm("gemma2_gqa")
    fresh.load_lora_weights(path)  # enables rank 4 on the file's targets
    np.testing.assert_array_equal(logits_of(fresh, ids, mask), adapted)

    fresh.merge_lora()
    assert all(not layer.lora_enabled for layer in lora.projections(fresh.backbone).values())
    assert not any("lora" in v.path for v in fresh.backbone.weights)
    np.testing.assert_allclose(logits_of(fresh, ids, mask), adapted, atol=1e-4)
    assert len(fresh.backbone.trainable_variables) == len(fresh.backbone.weights)


@pytest.mark.once("torch")  # Linear.disable_lora runs on every backend inside merge_lora
def test_disable_lora_drops_the_adapters_unmerged(tiny_lm, vocab_size):
    from conftest import token_batch

    ids, mask = token_batch(vocab_size)
    lm = tiny_lm("gemma_mqa")
    base, weights = logits_of(lm, ids, mask), _base_weights(lm)
    lm.backbone.enable_lora(rank=2, target_names=lora.ALL_TARGETS)
    _randomize_adapters(lm.backbone)
    assert np.abs(logits_of(lm, ids, mask) - base).max() > 1e-2
    with pytest.raises(gk.ConfigError, match=r"lm\.disable_lora\(\)"):
        lm.backbone.enable_lora(rank=2)

    lm.disable_lora()
    assert lora.lora_state(lm.backbone) is None
    assert not any("lora" in v.path for v in lm.backbone.weights)
    np.testing.assert_array_equal(logits_of(lm, ids, mask), base)  # nothing was folded in
    for path, value in _values(lm.backbone.weights).items():
        np.testing.assert_array_equal(value, weights[path])
    assert len(lm.backbone.trainable_variables) == len(lm.backbone.weights)
    lm.disable_lora()  # nothing left to drop: a no-op

    lm.backbone.enable_lora(rank=3)  # a new adapter, as after merge_lora
    assert lora.lora_state(lm.backbone)["rank"] == 3
    assert all("lora_kernel" in v.path for v in lm.backbone.trainable_variables)


def test_adapter_files_refuse_another_model_or_rank(tiny_lm, tmp_path):
    lm = tiny_lm("gemma_mqa")
    lm.backbone.enable_lora(rank=2)
    path = tmp_path / "a.lora.h5"
    lm.save_lora_weights(path)

    other = tiny_lm("gemma_mha")
    with pytest.raises(gk.ConfigError, match="num_key_value_heads"):
        other.load_lora_weights(path)
    same = tiny_lm("gemma_mqa")
    same.backbone.enable_lora(rank=3)
    with pytest.raises(gk.ConfigError, match="rank 2"):
        same.load_lora_weights(path)
    with pytest.raises(gk.ConfigError, match="already enabled"):
        same.backbone.enable_lora(rank=2)

    truncated = tmp_path / "t.lora.h5"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(gk.CheckpointError, match="t.lora.h5"):
        tiny_lm("gemma_mqa").load_lora_weights(truncated)
    with pytest.raises(gk.CheckpointError, match="does not exist"):
        tiny_lm("gemma_mqa").load_lora_weights(tmp_path / "missing.lora.h5")
    with pytest.raises(gk.ConfigError, match="target_names"):
        tiny_lm("gemma_mqa").backbone.enable_lora(rank=2, target_names=("q_proj",))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_lora_on_a_quantized_projection_adds_the_low_rank_product(mode):
    layer = Linear(24, name="query")
    layer.build((None, None, 16))
    layer.quantize(mode)
    x = np.random.RandomState(0).normal(size=(2, 3, 16)).astype("float32")
    plain = keras.ops.convert_to_numpy(layer(x))
    layer.enable_lora(4, lora_alpha=2)
    a = np.random.RandomState(1).normal(size=(24, 4)).astype("float32")
    b = np.random.RandomState(2).normal(size=(4, 16)).astype("float32")
    layer.lora_kernel_a.assign(a)
    layer.lora_kernel_b.assign(b)
    expected = plain + 0.5 * x @ b.T @ a.T
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), expected, rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("case,mode", [("gemma_mqa", "int8"), ("gemma_mqa", "int4"),
                                       ("gemma3", "int4")])
def test_qlora_fit_trains_adapters_on_frozen_quantized_weights(tiny_lm, case, mode):
    lm = tiny_lm(case)
    lm.quantize(mode)
    keras.utils.set_random_seed(0)
    lm.backbone.enable_lora(rank=4)
    # As a float base, these 8 epochs take the loss down by ~1.4; through Keras' own int8
    # head (no straight-through gradient) only by ~0.3.
    lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    frozen = _base_weights(lm)
    assert any(v.dtype == "int8" for v in lm.backbone.non_trainable_variables)
    before = lm.evaluate(TEXTS, return_dict=True, verbose=0)["loss"]
    lm.fit(TEXTS, epochs=8, batch_size=2, verbose=0)
    assert lm.evaluate(TEXTS, return_dict=True, verbose=0)["loss"] < before - 0.8
    for path, value in _base_weights(lm).items():
        assert np.array_equal(value, frozen[path]), path


def test_gradient_checkpointing_gives_the_same_training_step(tiny_lm, monkeypatch):
    from gemma_keras import backends

    wrapped = []
    backend = backends.get()
    real_remat = backend.remat
    monkeypatch.setattr(backend, "remat", lambda f: wrapped.append(f) or real_remat(f))
    results = []
    for remat in (False, True):
        wrapped.clear()
        lm = tiny_lm("gemma2_gqa")
        keras.utils.set_random_seed(0)
        lm.backbone.enable_lora(rank=2)
        lm.backbone.gradient_checkpointing = remat
        lm.compile(optimizer=keras.optimizers.SGD(0.5))
        lm.fit(TEXTS, epochs=1, batch_size=4, verbose=0, shuffle=False)
        results.append(_values(lm.backbone.trainable_variables))
        # Each decoder block is rematerialised (traced once or more per step), or none is.
        assert (len(wrapped) >= lm.config.num_layers) if remat else not wrapped
    assert results[0].keys() == results[1].keys()
    moved = 0
    for path in results[0]:
        np.testing.assert_allclose(results[1][path], results[0][path], atol=1e-5)
        moved += int(np.abs(results[0][path]).max() > 0)
    assert moved


def test_a_preset_saved_with_adapters_holds_the_merged_model(tiny_lm, tmp_path, vocab_size):
    from conftest import token_batch

    ids, mask = token_batch(vocab_size)
    lm = tiny_lm("gemma2_gqa")
    lm.backbone.enable_lora(rank=2, target_names=("query", "ffw_gating"))
    _randomize_adapters(lm.backbone)
    lm.save_to_preset(tmp_path / "merged")
    loaded = gk.GemmaCausalLM.from_preset(tmp_path / "merged")
    np.testing.assert_allclose(logits_of(loaded, ids, mask), logits_of(lm, ids, mask),
                               atol=1e-4)

    # A quantized model saves quantized (tests/test_quantized_presets.py); an HF checkpoint
    # holds float weights only, so that format refuses it before writing anything.
    lm.quantize("int8")
    with pytest.raises(gk.ConfigError, match="format='hf'.*int8-quantized"):
        lm.save_to_preset(tmp_path / "quantized", format="hf")
    assert not (tmp_path / "quantized").exists()


def test_accuracy_compares_token_ids_exactly_on_bfloat16_logits():
    from gemma_keras import training

    logits = np.zeros((1, 2, 300), "float32")
    logits[0, 0, 256] = logits[0, 1, 258] = 1.0  # predicts 256 and 258
    metric = training.default_metrics()[0]
    metric.update_state(np.array([[257, 258]]), keras.ops.cast(logits, "bfloat16"))
    assert float(metric.result()) == 0.5  # 257 != 256 (in bfloat16 both are 256)
