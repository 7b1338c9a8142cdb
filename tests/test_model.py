"""Model-level invariants that need no reference library."""

import keras
import ml_dtypes
import numpy as np
import pytest

import gemma_keras as gk
from conftest import keras_hub_kwargs, padded_logits


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


def test_embedding_normaliser_is_rounded_to_the_compute_dtype():
    """bf16 Gemma 7B scales embeddings by bf16(sqrt(3072)) = 55.5, as it was trained."""
    backbone = gk.GemmaBackbone(vocabulary_size=8, num_layers=1, num_query_heads=1,
                                num_key_value_heads=1, hidden_dim=3072, intermediate_dim=4,
                                head_dim=8, dtype="bfloat16")
    ids = np.array([[3, 5]], "int32")
    out = keras.ops.convert_to_numpy(keras.ops.cast(backbone.embed(ids), "float32"))
    table = keras.ops.convert_to_numpy(
        keras.ops.cast(backbone.token_embedding.embeddings, "float32"))
    expected = (table[ids] * 55.5).astype(ml_dtypes.bfloat16).astype("float32")
    np.testing.assert_array_equal(out, expected)


def test_rope_positions_stay_exact_in_bfloat16():
    """Position 8190 in bf16 would be 8192; angles must come from float32 positions."""
    from gemma_keras.layers import apply_rotary_embedding, rope_tables

    rng = np.random.RandomState(0)
    x = rng.normal(size=(1, 1, 1, 16)).astype("float32")
    positions = np.array([[8190]], "int32")
    out = keras.ops.convert_to_numpy(keras.ops.cast(apply_rotary_embedding(
        keras.ops.cast(x, "bfloat16"), rope_tables(positions, 16)), "float32"))
    x_bf = keras.ops.convert_to_numpy(keras.ops.cast(keras.ops.cast(x, "bfloat16"), "float32"))
    inv = 1.0 / 10000.0 ** (np.arange(8) * 2 / 16)
    angle = 8190.0 * inv
    a, b = x_bf[..., :8], x_bf[..., 8:]
    exact = np.concatenate([a * np.cos(angle) - b * np.sin(angle),
                            b * np.cos(angle) + a * np.sin(angle)], -1)
    np.testing.assert_allclose(out, exact, atol=2e-2)
    wrong = 8192.0 * inv  # what bf16 positions would give
    assert not np.allclose(exact, np.concatenate([a * np.cos(wrong) - b * np.sin(wrong),
                                                  b * np.cos(wrong) + a * np.sin(wrong)], -1),
                           atol=2e-2)


def test_linear_is_x_times_kernel_transposed_and_keeps_keras_lora_and_int8():
    # Linear stores [out, in] and computes through the backend's linear; with LoRA or int8 it
    # defers to EinsumDense, whose kernel bookkeeping must agree with that layout.
    from gemma_keras.layers.linear import Linear

    rng = np.random.RandomState(0)
    x = rng.normal(size=(2, 3, 16)).astype("float32")
    layer = Linear(8, name="proj")
    layer.build((None, None, 16))
    assert tuple(layer.kernel.shape) == (8, 16)
    kernel = rng.normal(size=(8, 16)).astype("float32")
    layer.kernel.assign(kernel)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), x @ kernel.T, atol=1e-5)

    layer.enable_lora(2)
    a = rng.normal(size=tuple(layer.lora_kernel_a.shape)).astype("float32")
    b = rng.normal(size=tuple(layer.lora_kernel_b.shape)).astype("float32")
    layer.lora_kernel_a.assign(a)
    layer.lora_kernel_b.assign(b)
    merged = keras.ops.convert_to_numpy(layer.kernel)
    assert merged.shape == (8, 16) and not np.allclose(merged, kernel)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), x @ merged.T, atol=1e-4)

    plain = Linear(8, name="proj_int8")
    plain.build((None, None, 16))
    plain.kernel.assign(kernel)
    plain.quantize("int8")
    out = keras.ops.convert_to_numpy(plain(x))
    np.testing.assert_allclose(out, x @ kernel.T, atol=0.05 * np.abs(x @ kernel.T).max())
    assert Linear.from_config(layer.get_config()).units == 8


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's two forms")
def test_tensorflow_linear_takes_the_2d_form_under_xla_and_both_forms_are_exact(monkeypatch):
    # Under XLA a batched matmul decodes 3x slower than a 2-D MatMul; without XLA it trains
    # faster. Both must give x @ W^T, and the compiled generation steps must get the 2-D one.
    import tensorflow as tf

    from gemma_keras.backends import tensorflow as backend

    rng = np.random.RandomState(1)
    x = rng.normal(size=(2, 5, 16)).astype("float32")
    kernel = rng.normal(size=(8, 16)).astype("float32")
    seen = []
    real = backend._in_xla_graph
    monkeypatch.setattr(backend, "_in_xla_graph", lambda: seen.append(real()) or seen[-1])
    eager = backend.linear(tf.constant(x), tf.constant(kernel))
    graph = tf.function(backend.linear)(tf.constant(x), tf.constant(kernel))
    xla = tf.function(backend.linear, jit_compile=True)(tf.constant(x), tf.constant(kernel))
    assert seen == [False, False, True]
    for out in (eager, graph, xla):
        np.testing.assert_allclose(out.numpy(), x @ kernel.T, atol=1e-5)


def test_int8_quantized_model_generates_from_its_quantized_weights(vocab_size):
    keras.utils.set_random_seed(3)
    lm = gk.GemmaCausalLM(gk.GemmaBackbone(**keras_hub_kwargs("gemma2_gqa", vocab_size)))
    ids = np.array([[2, 17, 40, 33, 9]], "int32")

    def forward(tokens):
        return keras.ops.convert_to_numpy(
            lm({"token_ids": tokens, "padding_mask": np.ones_like(tokens)}))
    before = forward(ids)
    lm.generate({"token_ids": ids, "padding_mask": np.ones_like(ids)}, max_new_tokens=2,
                stop_token_ids=None)  # compiled steps exist before quantizing
    lm.backbone.quantize("int8")
    with _inference():  # torch: the eager reference takes the generation steps' kernels
        after = forward(ids)
    assert 0 < np.abs(after - before).max() < 0.05 * np.abs(before).max()
    # The compiled (cached) steps run the quantized weights, not the float ones they were
    # first built with.
    from gemma_keras.generation.session import GenerationSession

    session = GenerationSession(lm, [ids[0].tolist()], ids.shape[1] + 4)
    np.testing.assert_allclose(session.logits[0], after[0, -1], atol=1e-4)
    out = lm.generate({"token_ids": ids, "padding_mask": np.ones_like(ids)}, max_new_tokens=4,
                      stop_token_ids=None)["token_ids"][0].tolist()
    # The reference runs at one right-padded width (causal: padding is invisible to earlier
    # positions), so the eager forward compiles once, not once per length (71 s on JAX).
    tokens = ids[0].tolist()
    with _inference():
        for _ in range(4):
            tokens.append(int(padded_logits(lm, tokens, ids.shape[1] + 4)[-1].argmax()))
    assert out == tokens


def _inference():
    """No gradients on torch: its quantized products then run the CPU inference kernels
    (x in bfloat16), as generation does, rather than the differentiable float32 form."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    import contextlib

    return contextlib.nullcontext()


def test_quantize_and_merge_drop_variables_without_a_collection_each(vocab_size, monkeypatch):
    """Keras collects garbage for every variable a layer drops; our projections untrack and
    drop theirs without it (one collection per projection made quantize() take minutes in a
    large process). The dropped variables must be gone from the model on every backend."""
    import gc

    keras.utils.set_random_seed(0)
    lm = gk.GemmaCausalLM(gk.GemmaBackbone(**keras_hub_kwargs("gemma_mqa", vocab_size)))
    kernels = {v.path for v in lm.weights if v.path.endswith("/kernel")}
    assert kernels
    lm.backbone.enable_lora(rank=2)
    collections = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(a) or real_collect(*a))
    lm.merge_lora()  # drops two adapters per projection
    assert not any("lora" in v.path for v in lm.weights)
    lm.quantize("int8")  # drops every float kernel and the float table (in row chunks)
    # Each float kernel was replaced by an int8 one of the same name, not kept beside it.
    kept = [v for v in lm.weights if v.path in kernels]
    assert len(kept) == len(kernels) and all(v.dtype == "int8" for v in kept)
    assert not collections, len(collections)
    if keras.backend.backend() == "torch":  # torch.nn.Module's registry let go as well
        names = {name for name, _ in lm.named_parameters()}
        assert not any(name.endswith("kernel") and "lora" in name for name in names)
    ids = np.array([[2, 17, 40]], "int32")
    out = lm({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    assert np.isfinite(keras.ops.convert_to_numpy(out)).all()


def test_decoder_block_config_round_trips(vocab_size):
    from gemma_keras.layers.decoder_block import GemmaDecoderBlock

    from gemma_keras.config import GemmaConfig

    config = GemmaConfig(**keras_hub_kwargs("gemma2_gqa", vocab_size))
    block = GemmaDecoderBlock(config, 2, name="decoder_block_2")
    copy = GemmaDecoderBlock.from_config(block.get_config())
    assert copy.config == config and copy.layer_index == 2 and copy.name == block.name


def test_a_cached_forward_names_a_wrong_mode(vocab_size):
    from gemma_keras.config import GemmaConfig
    from gemma_keras.layers.kv_cache import init_cache

    backbone = gk.GemmaBackbone(GemmaConfig(**keras_hub_kwargs("gemma_mqa", vocab_size)))
    cache = init_cache(backbone.config, 1, 8, "float32")
    ids = {"token_ids": np.array([[2, 5]], "int32"), "padding_mask": np.ones((1, 2), "int32")}
    with pytest.raises(gk.InvalidArgumentError, match="mode='prefil'"):
        backbone(ids, cache=cache, start=0, mode="prefil")
