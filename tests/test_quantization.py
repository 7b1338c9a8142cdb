"""Weight-only int8 and int4: every quantized product equals the float product with the
dequantized weights (the reference), on each backend's fast path, and a quantized model
generates what a float model holding those dequantized weights generates."""

import keras
import numpy as np
import pytest
from conftest import input_gradient, keras_hub_kwargs, padded_logits
from keras.quantizers import Int4QuantizationConfig

import gemma_keras as gk
from gemma_keras import quantization
from gemma_keras.layers.linear import Linear

BACKEND = keras.backend.backend()
# torch's CPU kernels take x in bfloat16 (8 significant bits; see backends/torch.py): a
# relative error of ~2^-8 per input; the XLA forms are float32 throughout.
RELATIVE = 2e-2 if BACKEND == "torch" else 1e-5
BLOCK = 32  # divides every input width of the tiny models (64, 96)


def _quantize(layer_or_model, mode):
    config = Int4QuantizationConfig(block_size=BLOCK) if mode == "int4" else None
    layer_or_model.quantize(mode, config=config)


def _dequantized(layer):
    """The float [out, in] kernel (or [vocab, hidden] table) a quantized layer stands for."""
    if isinstance(layer, keras.layers.Embedding):
        names = ("_embeddings", "embeddings_scale", "embeddings_zero")
    else:
        names = ("_kernel", "kernel_scale", "kernel_zero")
    arrays = [keras.ops.convert_to_numpy(getattr(layer, n)) for n in names
              if hasattr(layer, n)]
    if layer.quantization_mode == "int8":
        return arrays[0].astype("float32") / arrays[1].reshape(-1, 1)
    return quantization.dequantize_int4(*arrays)


def _close(actual, expected, relative=RELATIVE):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= relative * scale, (
        np.abs(actual - expected).max(), scale)


@pytest.fixture
def spy_fast_path(monkeypatch):
    """On torch, the kinds of derived weights the CPU kernels asked for (only their path
    asks): proof that the test ran the ATen kernels, not the generic fallback."""
    kinds = []
    if BACKEND == "torch":
        from gemma_keras.backends import torch as backend

        real = backend._derived
        monkeypatch.setattr(backend, "_derived",
                            lambda v, kind, make: kinds.append(kind) or real(v, kind, make))
    return kinds


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_projection_is_the_float_product_of_its_dequantized_kernel(
        mode, spy_fast_path):
    rng = np.random.RandomState(0)
    kernel = rng.normal(0, 0.1, size=(128, 96)).astype("float32")
    x = rng.normal(size=(2, 3, 96)).astype("float32")
    layer = Linear(128)
    layer.build((None, None, 96))
    layer.kernel.assign(kernel)
    _quantize(layer, mode)
    dequantized = _dequantized(layer)
    assert 0 < np.abs(dequantized - kernel).max() < 0.1 * np.abs(kernel).max()
    _close(keras.ops.convert_to_numpy(layer(x)), x @ dequantized.T)
    if BACKEND == "torch":
        assert spy_fast_path, "torch did not take its CPU kernels"
    if mode == "int4":
        # Our layout holds Keras' own grouped int4 of the same kernel: same integers,
        # scales and zeros, so the same dequantized kernel as Keras' EinsumDense.
        reference = keras.layers.EinsumDense("btd,df->btf", (None, 128))
        reference.build((None, None, 96))
        reference.kernel.assign(kernel.T)
        _quantize(reference, "int4")
        packed, scale, zero = (keras.ops.convert_to_numpy(v) for v in (
            reference._kernel, reference.kernel_scale, reference.kernel_zero))
        ours = quantization.from_keras_int4(packed, scale, zero, 128)
        for a, b in zip(ours, (layer._kernel, layer.kernel_scale, layer.kernel_zero)):
            np.testing.assert_array_equal(a, keras.ops.convert_to_numpy(b))
        np.testing.assert_array_equal(
            quantization.to_keras_int4(*ours)[0], packed)


@pytest.mark.parametrize("block_size, group", [(None, 24), (-1, 24), (16, 8), (64, 24)])
def test_int4_takes_a_group_that_divides_the_width(block_size, group):
    """Per channel, or a block size the width does not divide, still quantizes each output's
    own weights (Keras' EinsumDense int4 would reshape our [out, in] kernel as [in, out] and
    mix outputs): the largest dividing group, numerically the float product of the
    dequantized kernel."""
    rng = np.random.RandomState(0)
    kernel = rng.normal(0, 0.1, size=(8, 24)).astype("float32")
    layer = Linear(8)
    layer.build((None, None, 24))
    layer.kernel.assign(kernel)
    layer.quantize("int4", config=Int4QuantizationConfig(block_size=block_size))
    assert layer._own_int4 and layer.kernel_scale.shape == (8, 24 // group)
    dequantized = _dequantized(layer)
    np.testing.assert_allclose(dequantized, quantization.dequantize_int4(
        *quantization.quantize_int4(kernel, group)))
    x = rng.normal(size=(1, 2, 24)).astype("float32")
    _close(keras.ops.convert_to_numpy(layer(x)), x @ dequantized.T)
    assert 0 < np.abs(dequantized - kernel).max() < 0.2 * np.abs(kernel).max()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_adapters_on_a_quantized_projection_merge_and_drop(mode):
    rng = np.random.RandomState(0)
    layer = Linear(16)
    layer.build((None, None, 32))
    layer.kernel.assign(rng.normal(0, 0.1, size=(16, 32)).astype("float32"))
    _quantize(layer, mode)
    x = rng.normal(size=(1, 2, 32)).astype("float32")
    plain = keras.ops.convert_to_numpy(layer(x))
    layer.enable_lora(2)
    layer.disable_lora()  # must not touch the integer kernel's trainability (torch refuses)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x)), plain)
    layer.enable_lora(2)
    layer.lora_kernel_a.assign(rng.normal(0, 0.1, size=(16, 2)).astype("float32"))
    layer.lora_kernel_b.assign(rng.normal(0, 0.1, size=(2, 32)).astype("float32"))
    with_adapter = keras.ops.convert_to_numpy(layer(x))
    layer.merge_lora()
    assert not layer.lora_enabled and layer.quantization_mode == mode
    # Re-quantized with the adapter folded in: close to the adapted output, not the plain.
    merged = keras.ops.convert_to_numpy(layer(x))
    assert np.abs(merged - with_adapter).max() < np.abs(with_adapter - plain).max()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_quantized_tied_head_is_the_float_head_of_the_dequantized_table(
        mode, vocab_size, spy_fast_path):
    keras.utils.set_random_seed(1)
    backbone = gk.GemmaBackbone(**keras_hub_kwargs("gemma_mqa", vocab_size))
    embedding = backbone.token_embedding
    _quantize(embedding, mode)
    table = _dequantized(embedding)  # [vocab, hidden]
    rng = np.random.RandomState(0)
    hidden = rng.normal(size=(2, 3, table.shape[1])).astype("float32")
    _close(keras.ops.convert_to_numpy(backbone.logits(hidden)), hidden @ table.T)
    if BACKEND == "torch":
        assert spy_fast_path
    # Straight through the table: the gradient the float head has (QLoRA trains through it).
    upstream = rng.normal(size=(2, 3, table.shape[0])).astype("float32")
    _close(input_gradient(backbone.logits, hidden, upstream), upstream @ table, 1e-5)


@pytest.mark.parametrize("mode,case", [("int8", "gemma2_gqa"), ("int4", "gemma2_gqa"),
                                       ("int8", "gemma3")])
def test_quantized_generation_equals_the_float_model_of_the_dequantized_weights(
        mode, case, vocab_size, spy_fast_path, hf_checkpoint):
    config = (gk.GemmaConfig(**keras_hub_kwargs(case, vocab_size)) if case == "gemma2_gqa"
              else gk.GemmaCausalLM.from_preset(hf_checkpoint(case)[0]).config)

    def model():
        keras.utils.set_random_seed(3)
        return gk.GemmaCausalLM(gk.GemmaBackbone(config))

    quantized, reference = model(), model()
    _quantize(quantized.backbone, mode)
    float_layers = {layer.path: layer for layer in reference.backbone._flatten_layers()}
    count = 0
    for layer in quantized.backbone._flatten_layers():
        if getattr(layer, "quantization_mode", None) is None:
            continue
        target = float_layers[layer.path]
        variable = (target.embeddings if isinstance(target, keras.layers.Embedding)
                    else target.kernel)
        variable.assign(_dequantized(layer))
        count += 1
    assert count == 1 + 7 * quantized.config.num_layers  # the table and every projection

    ids = np.array([[2, 17, 40, 33, 9]], "int32")
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    new = 6
    out = quantized.generate(inputs, max_new_tokens=new, stop_token_ids=None)
    tokens = np.asarray(out["token_ids"])[0].tolist()
    # Every step's logits (compiled prefill and decode) against the float model's forward
    # over the same tokens.
    from gemma_keras.generation.session import GenerationSession

    session = GenerationSession(quantized, [tokens[:-1]], len(tokens) + 1)
    expected = padded_logits(reference, tokens[:-1], len(tokens))
    _close(session.logits[0], expected[-1])
    if BACKEND != "torch":  # float32 throughout: greedy agrees exactly
        greedy = reference.generate(inputs, max_new_tokens=new, stop_token_ids=None)
        assert np.asarray(greedy["token_ids"])[0].tolist() == tokens
    if BACKEND == "torch":
        assert {"int8_scale"} <= set(spy_fast_path) if mode == "int8" else \
            {"int4_pack", "int4_scales"} <= set(spy_fast_path)


def test_int4_embedding_lookup_takes_rows_before_unpacking(vocab_size):
    """Our lookup unpacks only the rows it takes; it must equal Keras' own int4 lookup."""
    keras.utils.set_random_seed(2)
    backbone = gk.GemmaBackbone(**keras_hub_kwargs("gemma_mqa", vocab_size))
    _quantize(backbone.token_embedding, "int4")
    ids = np.array([[2, 17, 40], [5, 0, vocab_size - 1]], "int32")
    expected = keras.ops.convert_to_numpy(backbone.token_embedding(ids))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(backbone.embed(ids)),
                               expected * backbone.config.hidden_dim ** 0.5, rtol=1e-6)


@pytest.mark.once("torch")
def test_docs_quantization_block_runs_as_written(tmp_path, monkeypatch, capsys):
    import pathlib

    page = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "quantization.md").read_text()
    section = page[page.index("# Quantization and low precision"):]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs/quantization.md", "exec"), {"gk": gk})
    assert "What does str.join do?" in capsys.readouterr().out
    assert (tmp_path / "demo_int4" / "config.json").is_file()
