"""Export: a SavedModel loaded in a fresh process without Keras, and LiteRT files run by the
LiteRT interpreter, must generate what the Keras model generates, answering string prompts as
`generate` does by default (the chat template for instruct models). Runs on every backend
(JAX and PyTorch models are exported through a TensorFlow child process)."""

import builtins
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import types

import keras
import numpy as np
import pytest

import gemma_keras as gk
from conftest import logits_of, padded_logits
from gemma_keras.exporting.runner import LiteRTGenerator

NEW = 12  # past the Gemma 2 case's sliding window of 5
WANDERING = dict(std=0.3, embedding_std=0.01)  # greedy output that does not repeat one token
PROMPTS = ["The quick brown fox", "Keras is", "Gemma models are lightweight open models 7"]
# For the instruct demo: a question, code, the empty prompt (<bos> alone, never wrapped) and
# a prompt that already holds turns (sent as written).
DEMO_PROMPTS = ["What does str.join do?", "json.dumps(", "",
                "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"]
# What TensorFlow's and SentencePiece's C++ code writes to stderr (absl, TF, SentencePiece).
NATIVE_LOG = re.compile(r"^(?:[IWEF]\d{4} \d\d:\d\d|\S+\.cc\(\d+\) LOG\(|WARNING: All log "
                        r"messages before absl|\d{4}-\d\d-\d\d [\d:.]+: [IWEF] )", re.M)
# Variants of the conversion itself (quantization, file layout, cache edges) are the same
# TensorFlow code whichever backend built the model; other backends differ only in the
# hand-over to the TensorFlow child process, which the generation and LoRA tests cover there.
conversion_variant = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="conversion variant: same TensorFlow code on every backend (hand-over tested)")


@pytest.fixture
def lm_of(hf_checkpoint):
    def make(case):
        directory, _ = hf_checkpoint(case, **WANDERING)
        return gk.GemmaCausalLM.from_preset(directory)
    return make


def _keras_completions(lm, prompts, new):
    """Greedy completion ids per prompt, sent as written (stop token dropped), from
    GemmaCausalLM.generate."""
    from gemma_keras.generation.generate import resolve_stop_ids

    out = []
    for prompt in prompts:
        ids = lm.tokenizer.tokenize(prompt, add_bos=True)
        result = lm.generate({"token_ids": np.array([ids], "int32"),
                              "padding_mask": np.ones((1, len(ids)), bool)},
                             max_new_tokens=new)
        generated = result["token_ids"][0][result["padding_mask"][0]].tolist()[len(ids):]
        if generated and generated[-1] in resolve_stop_ids(lm, "auto"):
            generated = generated[:-1]
        out.append(generated)
    return out


def _keras_texts(lm, prompts, new, **kwargs):
    """generate's completion text per prompt, one by one (the exports run a batch), with its
    defaults unless kwargs (chat_template=False) say otherwise."""
    return [lm.generate(p, max_new_tokens=new, include_prompt=False, **kwargs)
            for p in prompts]


@pytest.fixture(scope="module")
def demo():
    """The bundled instruct demo, in float32 (the precision LiteRT runs in)."""
    return gk.GemmaCausalLM.from_preset("gemma_demo", dtype="float32")


# Run in a fresh interpreter where Keras and gemma_keras cannot be imported: only TensorFlow
# and tensorflow-text's SentencePiece op library (its Python package imports tf.keras).
_LOADER = r"""
import importlib.util, json, os, sys
for name in ("keras", "gemma_keras", "tf_keras"):
    sys.modules[name] = None
import numpy as np
import tensorflow as tf
ops = os.path.join(importlib.util.find_spec("tensorflow_text").submodule_search_locations[0],
                   "python", "ops", "_sentencepiece_tokenizer.so")
tf.load_op_library(ops)
request = json.loads(sys.argv[1])
results = {}
for path, prompts in request["paths"].items():
    model = tf.saved_model.load(path)
    out = model.signatures["generate_no_chat_template"](prompts=tf.constant(prompts),
                                                        max_new_tokens=tf.constant(request["new"]))
    n = out["num_tokens"].numpy()
    default = model.signatures["generate"](prompts=tf.constant(prompts),
                                           max_new_tokens=tf.constant(request["new"]))
    ids = np.array(request["ids"], np.int32)
    logits = model.signatures["logits"](token_ids=tf.constant(ids),
                                        padding_mask=tf.ones_like(ids))["logits"].numpy()
    try:
        model.signatures["generate"](prompts=tf.constant(["x"]), max_new_tokens=tf.constant(10**6))
        too_long = "no error"
    except tf.errors.InvalidArgumentError as e:
        too_long = e.message
    results[path] = {"ids": [row[:k].tolist() for row, k in zip(out["token_ids"].numpy(), n)],
                     "completion": [c.decode() for c in out["completion"].numpy()],
                     "text": [t.decode() for t in out["text"].numpy()],
                     "answer": [c.decode() for c in default["completion"].numpy()],
                     "answer_text": [t.decode() for t in default["text"].numpy()],
                     "logits": logits.tolist(), "too_long": too_long}
print(json.dumps(results))
"""


# The SavedModel's graph is TensorFlow code whichever backend built the model; the hand-over
# from JAX and torch (a TensorFlow child process) is the LiteRT tests' and the docs/cli.md
# block's (`gemma-keras export`) there, so this one runs where the export is in-process.
@conversion_variant
def test_saved_model_in_a_process_without_keras_generates_like_keras(lm_of, demo, tmp_path,
                                                                      vocab_size, capfd):
    ids = np.random.RandomState(0).randint(4, vocab_size, size=(2, 9)).astype("int32")
    ids[:, 0] = 2
    models, paths = {}, {}
    # Gemma 3 (QK-norm, 5:1 layers, RoPE per kind) as a base model: <end_of_turn> is text,
    # not a stop. Gemma 2's layout (window, soft-caps, post-norms) is the demo's.
    models["gemma3"] = lm_of("gemma3")
    models["gemma3"].instruct = False
    # Gemma 1 MQA (instruct unknown: no template, as generate), its table padded past the
    # tokenizer's vocabulary.
    models["padded_table"] = _with_padded_table(lm_of("gemma_mqa"), PROMPTS[0])
    models["demo"] = demo  # instruct: `generate` answers in the chat format
    capfd.readouterr()
    paths_of = {}
    for case in models:
        path = paths_of[case] = tmp_path / f"saved_{case}"
        assert gk.export(models[case], path, format="saved_model", max_length=64) == path
        paths[str(path)] = DEMO_PROMPTS if case == "demo" else PROMPTS
    # TensorFlow's and SentencePiece's C++ logs are kept off the terminal.
    assert not NATIVE_LOG.search(capfd.readouterr().err)
    request = {"paths": paths, "new": NEW, "ids": ids.tolist()}
    result = subprocess.run([sys.executable, "-c", _LOADER, json.dumps(request)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for case, (path, prompts) in zip(models, paths.items()):
        lm, got = models[case], loaded[path]
        # `generate_no_chat_template`: the prompts continued as written.
        want = _keras_completions(lm, prompts, NEW)  # one by one: the export ran a batch
        assert got["ids"] == want, case
        assert got["completion"] == _keras_texts(lm, prompts, NEW, chat_template=False), case
        assert got["text"] == [p + c for p, c in zip(prompts, got["completion"])]
        # `generate`: what lm.generate(prompt) answers (the chat template for the demo).
        assert got["answer"] == _keras_texts(lm, prompts, NEW), case
        assert got["answer_text"] == [p + c for p, c in zip(prompts, got["answer"])]
        if case != "demo":  # random tiny models, float32 on both sides
            np.testing.assert_allclose(np.array(got["logits"]),
                                       logits_of(lm, ids, np.ones_like(ids)), atol=1e-4,
                                       err_msg=case)
        assert "max_length of 64" in got["too_long"]
    assert all(loaded[str(paths_of["demo"])]["answer"][:2])  # the instruct demo answers
    # Ids past the tokenizer's vocabulary were generated, and dropped from the text.
    assert max(max(ids) for ids in loaded[str(paths_of["padded_table"])]["ids"]) >= vocab_size


def _with_padded_table(lm, prompt, extra=8):
    """`lm` with its embedding table padded past the tokenizer's vocabulary (as real
    checkpoints pad 256,000 to 256,128), the extra rows made to win the prompt's first step."""
    import dataclasses

    config = lm.backbone.config
    backbone = gk.GemmaBackbone(
        dataclasses.replace(config, vocabulary_size=config.vocabulary_size + extra))
    weights = lm.backbone.get_weights()
    first = _keras_completions(lm, [prompt], 1)[0][0]
    weights[0] = np.concatenate([weights[0], np.repeat(3 * weights[0][first:first + 1], extra,
                                                       axis=0)])
    backbone.set_weights(weights)
    return gk.GemmaCausalLM(backbone, lm.tokenizer)


def _litert(lm, path, **kwargs):
    gk.export(lm, path, format="litert", **kwargs)
    return LiteRTGenerator(path)


def _full_logits(lm, tokens):
    """[len(tokens), vocab]: padded to a multiple of 32 columns (one compilation per width)."""
    return padded_logits(lm, tokens, -(-len(tokens) // 32) * 32)


# Gemma 2 (sliding window, soft-caps, GQA) on every backend, as a base model (the instruct
# demo is the next test). The MQA layout's conversion is the LoRA test's (every backend) and
# the large-file test's.
def test_litert_generates_like_keras(lm_of, tmp_path):
    lm = lm_of("gemma2_gqa")
    lm.instruct = False  # a base model: <end_of_turn> is text, not a stop
    # prefill_length 4: the prompts are prefilled in several chunks, the last one padded.
    runner = _litert(lm, tmp_path / "gemma.tflite", max_length=64, prefill_length=4)
    assert (tmp_path / "tokenizer.model").is_file() and (tmp_path / "gemma.json").is_file()
    want = _keras_completions(lm, PROMPTS, NEW)
    got = [runner.generate_ids(lm.tokenizer.tokenize(p, add_bos=True), NEW) for p in PROMPTS]
    assert got == want
    assert [runner.generate(p, NEW) for p in PROMPTS] == _keras_texts(lm, PROMPTS, NEW)
    assert runner.generate(PROMPTS[0], NEW, chat_template=False) == \
        _keras_texts(lm, PROMPTS[:1], NEW, chat_template=False)[0]
    # Decode logits equal a full forward pass over the same tokens.
    tokens = lm.tokenizer.tokenize(PROMPTS[2], add_bos=True)
    cache = runner.prefill(tokens[:-1], runner.new_cache())
    for step in range(6):
        logits, cache = runner.decode(tokens[-1], len(tokens) - 1, cache)
        np.testing.assert_allclose(logits, _full_logits(lm, tokens)[-1], atol=1e-4,
                                   err_msg=f"step {step}")
        tokens.append(int(np.argmax(logits)))


# The runner is the same Python, and the metadata the same TensorFlow code, whichever backend
# built the model (the hand-over of the instruct flag is test_litert_generates_like_keras').
@conversion_variant
def test_litert_instruct_demo_answers_like_generate(demo, tmp_path, capfd):
    from gemma_keras.exporting import runner as runner_module

    path = tmp_path / "demo.tflite"
    capfd.readouterr()
    runner = _litert(demo, path, max_length=64, prefill_length=16)
    assert not NATIVE_LOG.search(capfd.readouterr().err)  # the converter's C++ logs hidden
    answers = [runner.generate(p, NEW) for p in DEMO_PROMPTS]
    assert answers == _keras_texts(demo, DEMO_PROMPTS, NEW) and all(answers[:2])
    assert [runner.generate(p, NEW, chat_template=False) for p in DEMO_PROMPTS] == \
        _keras_texts(demo, DEMO_PROMPTS, NEW, chat_template=False)
    # The command line: the same answer by default, the text as written with the opt-out,
    # and a --max-new-tokens below 1 one line and status 2 (it printed nothing, status 0).
    for flags, kwargs in (([], {}), (["--no-chat-template"], {"chat_template": False})):
        capfd.readouterr()
        assert runner_module.main([str(path), DEMO_PROMPTS[0], "--max-new-tokens", "6",
                                   *flags]) == 0
        assert capfd.readouterr().out == _keras_texts(demo, DEMO_PROMPTS[:1], 6,
                                                      **kwargs)[0] + "\n"
    for bad in ("0", "-3"):
        assert runner_module.main([str(path), "x", "--max-new-tokens", bad]) == 2
        out, err = capfd.readouterr()
        assert not out and len(err.strip().splitlines()) == 1 and "--max-new-tokens" in err
    with pytest.raises(gk.InvalidArgumentError, match="max_new_tokens"):
        runner.generate("x", 0)


@conversion_variant
def test_litert_last_chunk_that_would_overrun_the_cache(lm_of, tmp_path):
    lm = lm_of("gemma2_gqa")
    runner = _litert(lm, tmp_path / "out", max_length=14, prefill_length=8)
    assert (tmp_path / "out" / "model.tflite").is_file()
    tokens = [2] + list(range(10, 22))  # 13 tokens: chunks at 0 and (shifted) 6, then decode
    cache = runner.prefill(tokens[:-1], runner.new_cache())
    logits, _ = runner.decode(tokens[-1], len(tokens) - 1, cache)
    np.testing.assert_allclose(logits, _full_logits(lm, tokens)[-1], atol=1e-4)
    with pytest.raises(ValueError, match="max_length of 14"):
        runner.generate_ids(tokens, 2)
    # A model or tokenizer that is not the one its metadata describes (an export killed
    # between its three files, or files of two exports mixed) is refused, naming it.
    for name in ("model.tflite", "tokenizer.model"):
        path = tmp_path / "out" / name
        original = path.read_bytes()
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(gk.ExportError, match=f"{name} does not match"):
            LiteRTGenerator(tmp_path / "out")
        path.write_bytes(original)
    LiteRTGenerator(tmp_path / "out")


@conversion_variant
def test_litert_quantized_logits_within_tolerance(lm_of, tmp_path):
    """Weight-only quantization (LiteRT's int8 kernels also quantize activations per call):
    int8 decode logits within 10% of the float logits' range and within 3x the error of
    Keras' own int8 quantization of the same model; float16 within 0.5%. Measured on these
    near-uniform random models: int8 6.6% / 4.0% of range (Keras int8: 7.7% / 2.0%),
    float16 0.14%."""
    from gemma_keras.generation.generate import prepare_prompts

    lm = lm_of("gemma2_gqa")
    lm.instruct = True
    tokens = lm.tokenizer.tokenize(PROMPTS[2], add_bos=True)
    want = _full_logits(lm, tokens)[-1]
    span = want.max() - want.min()
    keras_int8 = gk.GemmaCausalLM(lm.backbone.__class__.from_config(lm.backbone.get_config()),
                                  lm.tokenizer)
    keras_int8.backbone.set_weights(lm.backbone.get_weights())
    keras_int8.quantize("int8")
    keras_error = np.max(np.abs(_full_logits(keras_int8, tokens)[-1] - want)) / span
    sizes = {}
    for quantize, tolerance in (("int8", min(0.1, 3 * keras_error)), ("float16", 0.005)):
        path = tmp_path / f"{quantize}.tflite"
        runner = _litert(lm, path, quantize=quantize, max_length=32, prefill_length=8)
        logits, _ = runner.decode(tokens[-1], len(tokens) - 1,
                                  runner.prefill(tokens[:-1], runner.new_cache()))
        error = np.max(np.abs(logits - want)) / span
        assert 0 < error < tolerance, (quantize, error, keras_error)  # > 0: it was quantized
        # A quantized export sends an instruct prompt as generate does (its greedy tokens
        # may differ from the float model's: that is the quantization).
        assert runner.prompt_ids(PROMPTS[0]) == prepare_prompts(lm, PROMPTS[0])[0][0]
        sizes[quantize] = path.stat().st_size
    float_path = tmp_path / "float.tflite"
    _litert(lm, float_path, max_length=32, prefill_length=8)
    assert sizes["int8"] < 0.5 * float_path.stat().st_size
    assert sizes["float16"] < 0.7 * float_path.stat().st_size


def test_export_merges_lora_and_leaves_the_model_alone(lm_of, tmp_path):
    lm = lm_of("gemma_mqa")
    lm.backbone.enable_lora(rank=2)
    for variable in lm.backbone.trainable_variables:  # adapters that change the logits
        variable.assign(np.random.RandomState(1).normal(0, 0.2, variable.shape))
    tokens = lm.tokenizer.tokenize(PROMPTS[0], add_bos=True)
    want = _full_logits(lm, tokens)[-1]
    runner = _litert(lm, tmp_path / "lora.tflite", max_length=32, prefill_length=8)
    logits, _ = runner.decode(tokens[-1], len(tokens) - 1,
                              runner.prefill(tokens[:-1], runner.new_cache()))
    np.testing.assert_allclose(logits, want, atol=1e-4)
    assert gk.lora.lora_state(lm.backbone) is not None  # the user's model keeps its adapters
    np.testing.assert_allclose(_full_logits(lm, tokens)[-1], want, atol=1e-6)


@conversion_variant
def test_litert_large_file_layout_runs(lm_of, tmp_path):
    """allow_large_file stores weights after the FlatBuffer; the interpreter must read it."""
    lm = lm_of("gemma_mqa")
    tokens = lm.tokenizer.tokenize(PROMPTS[1], add_bos=True)
    runner = _litert(lm, tmp_path / "large.tflite", allow_large_file=True, max_length=32)
    logits, _ = runner.decode(tokens[-1], len(tokens) - 1,
                              runner.prefill(tokens[:-1], runner.new_cache()))
    np.testing.assert_allclose(logits, _full_logits(lm, tokens)[-1], atol=1e-4)


def test_flatbuffer_limit_names_the_limit_and_the_fix():
    from gemma_keras.config import GemmaConfig
    from gemma_keras.exporting import check_flatbuffer_size

    gemma_2b = GemmaConfig(vocabulary_size=256000, num_layers=18, num_query_heads=8,
                           num_key_value_heads=1, hidden_dim=2048, intermediate_dim=32768,
                           head_dim=256)
    with pytest.raises(gk.ExportError, match="2 GiB") as info:
        check_flatbuffer_size(gemma_2b, None)
    # 2.5 B parameters do not fit even at one byte each: only the large-file layout helps.
    assert "allow_large_file=True" in str(info.value) and "int8" not in str(info.value)
    check_flatbuffer_size(gemma_2b, "int8", allow_large_file=True)
    small = GemmaConfig(vocabulary_size=256000, num_layers=6, num_query_heads=8,
                        num_key_value_heads=1, hidden_dim=2048, intermediate_dim=32768,
                        head_dim=256)
    with pytest.raises(gk.ExportError, match=r"quantize='int8' \(about"):
        check_flatbuffer_size(small, None)
    check_flatbuffer_size(small, "int8")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(format="onnx"), gk.ConfigError, "format="),
    (dict(format="saved_model", quantize="int8"), gk.ConfigError, "litert' only"),
    (dict(format="litert", quantize="int4"), gk.ConfigError, "quantize="),
    (dict(format="litert", max_length=10 ** 6), gk.ConfigError, "max_length="),
    (dict(format="litert", max_length=16, prefill_length=32), gk.ConfigError, "prefill_length="),
])
def test_bad_export_arguments(kwargs, error, message, lm_of, tmp_path):
    lm = lm_of("gemma_mqa")
    with pytest.raises(error, match=message):
        gk.export(lm, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_quantized_or_tokenizerless_models_are_refused(lm_of, tmp_path):
    lm = lm_of("gemma_mqa")
    bare = gk.GemmaCausalLM(lm.backbone, None)
    with pytest.raises(gk.ExportError, match="no tokenizer"):
        gk.export(bare, tmp_path / "a", format="saved_model")
    lm.quantize("int8")
    with pytest.raises(gk.ExportError, match="int8-quantized.*quantize='int8'"):
        gk.export(lm, tmp_path / "b", format="litert")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_failed_conversion_leaves_nothing(lm_of, tmp_path, monkeypatch):
    lm = lm_of("gemma_mqa")
    target = tmp_path / "gemma.tflite"
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        def broken(*args, **kwargs):
            raise RuntimeError("converter exploded")
        monkeypatch.setattr(tf.lite.TFLiteConverter, "from_saved_model", broken)
        with pytest.raises(RuntimeError, match="converter exploded"):
            gk.export(lm, target, format="litert")
    else:  # the TensorFlow child process fails: its error comes back, nothing is written
        monkeypatch.setenv("PYTHONPATH", str(tmp_path / "shadow"))
        (tmp_path / "shadow").mkdir()
        (tmp_path / "shadow" / "tensorflow.py").write_text("raise ImportError('no TF here')")
        with pytest.raises(gk.ExportError, match="no TF here"):
            gk.export(lm, target, format="litert")
    assert not target.exists() and not (tmp_path / "tokenizer.model").exists()


def test_runner_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="gemma.tflite does not exist"):
        LiteRTGenerator(tmp_path / "gemma.tflite")


@conversion_variant
def test_export_metadata_describes_the_cache(lm_of, tmp_path):
    lm = lm_of("gemma2_gqa")
    gk.export(lm, tmp_path / "m.tflite", format="litert", max_length=32, prefill_length=8)
    meta = json.loads((tmp_path / "m.json").read_text())
    config = lm.backbone.config
    assert meta["kv_cache"]["shape"] == [1, 32, config.num_key_value_heads, config.head_dim]
    assert len(meta["kv_cache"]["names"]) == 2 * config.num_layers
    assert meta["bos_token_id"] == lm.tokenizer.bos_token_id
    assert lm.tokenizer.eos_token_id in meta["stop_token_ids"]
    assert meta["file_bytes"] == (tmp_path / "m.tflite").stat().st_size


def test_gk_export_is_a_plain_function_whatever_is_imported():
    import inspect

    import gemma_keras.exporting.runner  # noqa: F401  (binds gemma_keras.exporting)

    assert inspect.isfunction(gk.export) and gk.export.__module__ == "gemma_keras.exporting"


@pytest.mark.once("torch")
@pytest.mark.parametrize("instruct", [True, False, None])
def test_the_tensorflow_child_gets_the_instruct_flag_with_the_weights(instruct, lm_of,
                                                                      tmp_path, monkeypatch):
    # From JAX / PyTorch the export runs in a TensorFlow process that loads a preset: the
    # flag (which decides the stop ids) must travel in that preset.
    import gemma_keras.exporting as exporting
    from gemma_keras.checkpoints.loading import read_instruct

    seen = []

    def run(command, **kwargs):
        preset = pathlib.Path(command[command.index("gemma_keras.exporting.build") + 1])
        seen.append(read_instruct(str(preset), preset))
        return subprocess.CompletedProcess(command, 0, "", "")
    monkeypatch.setattr(exporting.subprocess, "run", run)
    lm = lm_of("gemma_mqa")
    lm.instruct = instruct
    gk.export(lm, tmp_path / "out.tflite", format="litert")
    assert seen == [instruct]


@pytest.mark.once("torch")
def test_export_from_another_backend_does_not_import_tensorflow_here(lm_of, tmp_path,
                                                                     monkeypatch):
    # Importing TensorFlow in the user's process only to see that it is there took seconds
    # and printed its C++ logs; presence is checked with find_spec, the child imports it.
    import gemma_keras.exporting as exporting

    imported, real_import = [], builtins.__import__

    def recording_import(name, *args, **kwargs):
        imported.append(name.split(".")[0])
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(exporting.subprocess, "run",
                        lambda command, **kwargs: subprocess.CompletedProcess(command, 0))
    lm = lm_of("gemma_mqa")
    monkeypatch.setattr(builtins, "__import__", recording_import)
    gk.export(lm, tmp_path / "out.tflite")
    monkeypatch.setattr(builtins, "__import__", real_import)
    assert imported and "tensorflow" not in imported


@pytest.mark.once("jax")
def test_export_format_follows_the_tflite_suffix(demo, tmp_path, monkeypatch):
    # A .tflite path without format= wrote a SavedModel directory named x.tflite.
    import gemma_keras.exporting as exporting

    formats = []
    monkeypatch.setattr(exporting, "_export_in_tensorflow_process",
                        lambda lm, spec: formats.append(spec.format))
    lm = demo
    out = tmp_path / "out"
    out.mkdir()
    for name in ("x.tflite", "y.TFLITE", "saved"):
        gk.export(lm, out / name)
    assert formats == ["litert", "litert", "saved_model"]
    with pytest.raises(gk.ConfigError, match="ends in .tflite.*format='litert'"):
        gk.export(lm, out / "z.tflite", format="saved_model")
    # Without TensorFlow: said before any work.
    monkeypatch.setattr(exporting, "_installed", lambda module: module != "tensorflow_text")
    with pytest.raises(gk.MissingExtraError, match=r"tensorflow_text.*gemma-keras\[tensorflow\]"):
        gk.export(lm, out / "w")
    assert formats == ["litert", "litert", "saved_model"] and not any(out.iterdir())


@pytest.mark.once("jax")
def test_cli_export_format_from_the_suffix(tmp_path, monkeypatch, capsys):
    from gemma_keras import cli

    calls = []

    def fake_export(lm, path, format, **kwargs):
        calls.append(format)
        from gemma_keras.exporting.build import litert_paths

        for file in litert_paths(path):
            file.write_bytes(b"")
    monkeypatch.setattr("gemma_keras.exporting.export", fake_export)
    assert cli.main(["export", str(tmp_path / "x.tflite")]) == 0
    assert calls == ["litert"] and "as litert" in capsys.readouterr().out
    # Said the other way round: one line, before the model loads.
    assert cli.main(["export", "--format", "saved_model", str(tmp_path / "y.tflite")]) == 2
    out, err = capsys.readouterr()
    assert calls == ["litert"] and "reading" not in out
    assert len(err.strip().splitlines()) == 1 and "ends in .tflite" in err


@pytest.mark.once("jax")
def test_cli_export_without_tensorflow_says_so_before_loading(tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys

        class _Hide:  # TensorFlow uninstalled, for import and find_spec alike
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "tensorflow":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, _Hide())
        """))
    env = dict(os.environ, PYTHONPATH=str(hide), KERAS_BACKEND="jax")
    result = subprocess.run([sys.executable, "-m", "gemma_keras.cli", "export", "--format",
                             "litert", str(tmp_path / "x.tflite")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "reading" not in result.stdout  # the model was not loaded first
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "tensorflow" in lines[0] and "[tensorflow]" in lines[0], lines


@pytest.mark.once("jax")
def test_runner_refuses_a_max_new_tokens_below_one(tmp_path, capsys):
    from gemma_keras.exporting import runner

    for bad in ("0", "-3", "two"):
        assert runner.main([str(tmp_path / "no.tflite"), "x", "--max-new-tokens", bad]) == 2
        out, err = capsys.readouterr()
        assert not out and len(err.strip().splitlines()) == 1, err
        assert "--max-new-tokens" in err and "Traceback" not in err


@pytest.mark.once("jax")
def test_export_chat_template_is_generates(spm_path):
    """The exports' template (the metadata's strings, apply_chat_template's rule) gives the
    tokens generate's prepare_prompts gives, for every flag and chat_template value."""
    from gemma_keras.exporting import apply_chat_template, chat_template_metadata
    from gemma_keras.generation.generate import prepare_prompts

    tokenizer = gk.GemmaTokenizer(spm_path)
    texts = ["Keras is", "", "<start_of_turn>user\nHi<end_of_turn>\n", "a <start_of_turn> b",
             "two\nlines ", "<end_of_turn> only", "  padded \n", "\u3000x\xa0", "   "]
    for instruct in (True, False, None):
        lm = types.SimpleNamespace(tokenizer=tokenizer, instruct=instruct)
        metadata = {"instruct": instruct, "chat_template": chat_template_metadata()}
        for chat_template in ("auto", True, False):
            for text in texts:
                want = prepare_prompts(lm, text, chat_template)[0][0]
                sent = apply_chat_template(metadata, text, chat_template)
                assert tokenizer.tokenize(sent, add_bos=True) == want, (instruct,
                                                                        chat_template, text)


@pytest.mark.once("tensorflow")
def test_saved_model_chat_wrap_is_apply_chat_template():
    import tensorflow as tf

    from gemma_keras.exporting import apply_chat_template, chat_template_metadata
    from gemma_keras.exporting.signatures import chat_wrap

    texts = ["Keras is", "", "<start_of_turn>user\nHi", "x\n<start_of_turn>", "a.*b\n\\E",
             "<start_of_turnx", "  padded \n", "\u3000x\xa0\x1c", " \t ", "a\n\nb"]
    metadata = {"instruct": True, "chat_template": chat_template_metadata()}
    got = [t.decode() for t in chat_wrap(tf.constant(texts), metadata["chat_template"]).numpy()]
    assert got == [apply_chat_template(metadata, t) for t in texts]


@pytest.mark.once("jax")
def test_exports_leave_the_same_pieces_out_of_text_as_generate(spm_path, vocab_size):
    import sentencepiece as spm

    tokenizer = gk.GemmaTokenizer(spm_path)
    hidden = tokenizer.special_token_ids  # what the export's metadata records
    plain = spm.SentencePieceProcessor(model_file=str(spm_path))
    for row in np.random.RandomState(0).randint(0, vocab_size, size=(200, 12)).tolist():
        assert plain.DecodeIds([i for i in row if i not in hidden]) == \
            tokenizer.detokenize(row, skip_special=True)
    for piece in ("<start_of_turn>", "<end_of_turn>"):  # plain decoding writes them out
        token = tokenizer.token_to_id(piece)
        assert plain.DecodeIds([token]) == piece and token in hidden


@conversion_variant
def test_litert_prefill_in_two_calls_equals_one(lm_of, tmp_path):
    """`prefill(ids, cache, start)` continues a cache that another call filled, as a runtime
    does with a prompt that arrives in parts: the prompt prefilled in two calls (the second at
    start=len(first)) gives the decode logits of a one-call prefill and of the Keras model's
    forward pass. The splits: inside the first chunk, a second part that starts mid-chunk and
    whose last chunk is shifted back, and a second part shorter than a chunk that starts less
    than a chunk before the cache's end (a padded chunk there would run past the cache).
    On Gemma 3 (QK-norm, 5:1 layers, RoPE per kind), whose LiteRT export this also proves
    against the Keras forward pass; Gemma 2's is test_litert_generates_like_keras's."""
    lm = lm_of("gemma3")
    runner = _litert(lm, tmp_path / "parts.tflite", max_length=32, prefill_length=8)
    rng = np.random.RandomState(0)
    tokens = [2] + rng.randint(4, lm.config.vocabulary_size, 29).tolist()  # 30: decode at 29
    whole, _ = runner.decode(tokens[-1], len(tokens) - 1,
                             runner.prefill(tokens[:-1], runner.new_cache()))
    np.testing.assert_allclose(whole, _full_logits(lm, tokens)[-1], atol=1e-4)
    for split in (5, 11, 26):
        cache = runner.prefill(tokens[:split], runner.new_cache())
        cache = runner.prefill(tokens[split:-1], cache, start=split)
        logits, _ = runner.decode(tokens[-1], len(tokens) - 1, cache)
        np.testing.assert_allclose(logits, whole, atol=1e-5, err_msg=f"split at {split}")
    # A start the cache cannot take is one clear error, before the interpreter runs.
    for start, error in ((-1, gk.InvalidArgumentError), (1.5, gk.ArgumentTypeError),
                         (True, gk.ArgumentTypeError)):
        with pytest.raises(error, match="start must be"):
            runner.prefill(tokens[:3], runner.new_cache(), start=start)
    with pytest.raises(gk.InvalidArgumentError, match="do not fit this export's cache of 32"):
        runner.prefill(tokens, runner.new_cache(), start=3)
