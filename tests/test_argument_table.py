"""Every public entry point turns a wrong argument into one `gk.GemmaError` whose message names
the argument: a table of (call, the argument at fault), each with one wrong type or value.

Nothing else is accepted: not a raw TypeError / ValueError / AttributeError from deep inside
Keras or NumPy, not a GemmaError that leaves the argument unnamed, and not silent acceptance
(a call that returns). The checks run before any work: generation sessions, compiled scoring,
Keras' fit loop and the export child are replaced by tripwires, so a row that got past its
check fails loudly instead of compiling.
"""

import inspect
import re
import types

import keras
import numpy as np
import pytest

import gemma_keras as gk
from gemma_keras import exporting
from gemma_keras.generation import chat as chat_module
from gemma_keras.generation import generate as generate_module


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The demo (tiny) once for the module, its tokenizer and a scratch directory."""
    lm = gk.GemmaCausalLM.from_preset("gemma_demo")
    tmp = tmp_path_factory.mktemp("arguments")
    (tmp / "adapters").mkdir()
    (tmp / "adapters" / "a.lora.h5").write_bytes(b"")
    ids = np.array([lm.tokenizer.tokenize("json.dumps(obj)", add_bos=True)])
    return types.SimpleNamespace(lm=lm, tok=lm.tokenizer, tmp=tmp, ids=ids)


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    """Tripwires on everything that starts real work."""
    def tripped(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(generate_module, "GenerationSession", tripped)
    monkeypatch.setattr(chat_module, "GenerationSession", tripped)
    monkeypatch.setattr(gk.GemmaCausalLM, "compiled_steps", tripped)
    monkeypatch.setattr(keras.Model, "fit", tripped)
    monkeypatch.setattr(keras.Model, "evaluate", tripped)
    monkeypatch.setattr(exporting, "_export_in_tensorflow_process", tripped)


def _send(**kwargs):
    return lambda e: e.lm.chat().send(**{"message": "Hi", **kwargs})


def _gen(**kwargs):
    return lambda e: e.lm.generate(**{"inputs": "x", **kwargs})


def _set(field, value):
    return lambda e: setattr(e.lm.preprocessor, field, value)


def _export(**kwargs):
    return lambda e: gk.export(e.lm, e.tmp / "export_out", **kwargs)


# (argument named in the message, call). Rows marked `tensors` hand in backend tensors (their
# checks differ per backend) and run on every backend; the rest are plain Python and run once.
TABLE = [
    # ---- generate ---------------------------------------------------------------------------
    ("inputs", lambda e: e.lm.generate(None)),
    ("inputs", lambda e: e.lm.generate(5)),
    ("inputs", lambda e: e.lm.generate([1, 2])),
    ("inputs", lambda e: e.lm.generate({"ids": [[2, 3]]})),
    ("token_ids", lambda e: e.lm.generate({"token_ids": np.array([[2.0, 5.0]])})),
    ("token_ids", lambda e: e.lm.generate({"token_ids": np.array([[2, 10 ** 6]])})),
    ("max_new_tokens", _gen(max_new_tokens="5")),
    ("max_new_tokens", _gen(max_new_tokens=0)),
    ("max_new_tokens", _gen(max_new_tokens=2.5)),
    ("max_new_tokens", _gen(max_new_tokens=True)),
    ("max_new_tokens", _gen(max_new_tokens=10 ** 6)),
    ("max_length", _gen(max_length=3.0)),
    ("max_length", _gen(max_length=1)),
    ("min_new_tokens", _gen(min_new_tokens=-1)),
    ("min_new_tokens", _gen(min_new_tokens=9, max_new_tokens=4)),
    ("seed", _gen(seed="abc")),
    ("seed", _gen(seed=-1)),
    ("stream", _gen(stream="yes")),
    ("stream", _gen(inputs=["a", "b"], stream=True)),
    ("sampler", _gen(sampler=5)),
    ("sampler", _gen(sampler="nucleus")),
    ("temperature", _gen(temperature=0)),
    ("temperature", _gen(temperature="hot")),
    ("top_k", _gen(top_k=0)),
    ("top_k", _gen(top_k=2.5)),
    ("top_p", _gen(top_p=1.5)),
    ("top_p", _gen(top_p="high")),
    ("min_p", _gen(min_p=1.5)),
    ("min_p", _gen(min_p=float("nan"))),
    ("min_p", _gen(min_p="low")),
    ("min_p", _gen(sampler="greedy", min_p=0.1)),
    ("repetition_penalty", _gen(repetition_penalty=0)),
    ("repetition_penalty", _gen(repetition_penalty="x")),
    ("chat_template", _gen(chat_template="yes")),
    ("include_prompt", _gen(include_prompt="no")),
    ("skip_special_tokens", _gen(skip_special_tokens=None)),
    ("stop_strings", _gen(stop_strings=[""])),
    ("stop_strings", _gen(stop_strings=[1])),
    ("stop_token_ids", _gen(stop_token_ids=7)),
    ("stop_token_ids", _gen(stop_token_ids=["a"])),
    ("num_beams", _gen(num_beams=0)),
    ("num_beams", _gen(num_beams="2")),
    ("length_penalty", _gen(num_beams=2, length_penalty="long")),
    ("early_stopping", _gen(num_beams=2, early_stopping="sometimes")),
    ("return_beams", _gen(num_beams=2, return_beams="yes")),
    ("return_beams", _gen(return_beams=True)),
    ("repetition_penalty", _gen(num_beams=2, repetition_penalty=1.2)),
    ("stop_strings", _gen(num_beams=2, stop_strings=["."])),
    ("draft_tokens", _gen(draft="prompt_lookup", draft_tokens=0)),
    ("draft_tokens", _gen(draft_tokens=4)),
    ("max_tokens", _gen(max_tokens=5)),
    ("do_sample", _gen(do_sample=True)),
    ("options", _gen(options={"max_new_tokens": 4})),
    ("max_length", lambda e: e.lm.generate("x", 4, max_length=4)),
    ("positional", lambda e: e.lm.generate("x", *([None] * 8))),
    # ---- chat -------------------------------------------------------------------------------
    ("system", lambda e: e.lm.chat(system=5)),
    ("max_new_tokens", lambda e: e.lm.chat(max_new_tokens=5)),
    ("message", lambda e: e.lm.chat().send(None)),
    ("message", lambda e: e.lm.chat().send(["Hi"])),
    ("max_new_tokens", _send(max_new_tokens=0)),
    ("min_new_tokens", _send(max_new_tokens=4, min_new_tokens=8)),
    ("seed", _send(seed="abc")),
    ("options", _send(options=5)),
    ("stream", _send(stream="yes")),
    ("top_p", _send(top_p=2.0)),
    ("min_p", _send(min_p=-0.5)),
    ("sampler", _send(sampler="beam")),
    ("num_beams", _send(num_beams=2)),
    ("stop_strings", _send(stop_strings=["."])),
    ("draft", _send(draft="prompt_lookup")),
    ("max_tokens", _send(max_tokens=5)),
    # ---- score and the log-likelihoods ------------------------------------------------------
    ("token_ids", lambda e: e.lm.score(["json.dumps"])),
    ("token_ids", lambda e: e.lm.score("json.dumps")),
    ("token_ids", lambda e: e.lm.score(None)),
    ("token_ids", lambda e: e.lm.score([[1, 2], [3]])),
    ("token_ids", lambda e: e.lm.score(np.array([[1.5, 2.0]]))),
    ("token_ids", lambda e: e.lm.score(np.array([2, 3]))),
    ("token_ids", lambda e: e.lm.score(np.array([[2, 10 ** 6]]))),
    ("padding_mask", lambda e: e.lm.score(e.ids, padding_mask="all")),
    ("padding_mask", lambda e: e.lm.score(e.ids, padding_mask=np.ones((1, 3), "int32"))),
    ("scoring_mode", lambda e: e.lm.score(e.ids, scoring_mode="logit")),
    ("scoring_mode", lambda e: e.lm.score(e.ids, scoring_mode=5)),
    ("target_ids", lambda e: e.lm.score(e.ids, scoring_mode="loss")),
    ("target_ids", lambda e: e.lm.score(e.ids, scoring_mode="loss",
                                        target_ids=np.full_like(e.ids, 10 ** 6))),
    ("layer_intercept_fn", lambda e: e.lm.score(e.ids, layer_intercept_fn=5)),
    ("requests", lambda e: e.lm.loglikelihood("a question")),
    ("requests", lambda e: e.lm.loglikelihood([("a", "b", "c")])),
    ("continuation", lambda e: e.lm.loglikelihood([("a", 5)])),
    ("batch_size", lambda e: e.lm.loglikelihood([("a", "b")], batch_size=0)),
    ("texts", lambda e: e.lm.loglikelihood_rolling("a text")),
    ("max_length", lambda e: e.lm.loglikelihood_rolling(["a"], max_length=0)),
    # ---- fit / evaluate ---------------------------------------------------------------------
    ("x", lambda e: e.lm.fit(None)),
    ("x", lambda e: e.lm.fit(5)),
    ("x", lambda e: e.lm.fit([])),
    ("x", lambda e: e.lm.fit([1, 2, 3])),
    ("x", lambda e: e.lm.fit(np.array([[2, 3, 4]]))),
    ("x", lambda e: e.lm.fit(["a", 3])),
    ("x", lambda e: e.lm.fit({"prompt": ["a"], "response": ["b"]})),
    ("x", lambda e: e.lm.fit({"prompts": ["a"]})),
    ("x", lambda e: e.lm.fit({"text": ["a"]})),
    ("x", lambda e: e.lm.fit({"prompts": ["a", "b"], "responses": ["c"]})),
    ("x", lambda e: e.lm.fit([{"prompt": "a"}])),
    ("x", lambda e: e.lm.fit([{"text": "a"}, {"prompt": "b", "response": "c"}])),
    ("responses", lambda e: e.lm.fit({"prompts": ["a"], "responses": 5})),
    ("token_ids", lambda e: e.lm.fit({"token_ids": [[2, 3], [4]]})),
    ("token_ids", lambda e: e.lm.fit({"token_ids": np.array([[2.5, 3.0]])})),
    ("y", lambda e: e.lm.fit(["a"], y=np.zeros((1, 4), "int32"))),
    ("sample_weight", lambda e: e.lm.fit(["a"], sample_weight=np.ones((1, 4)))),
    ("batch_size", lambda e: e.lm.fit(["a"], batch_size=0)),
    ("batch_size", lambda e: e.lm.fit(["a"], batch_size="8")),
    ("epochs", lambda e: e.lm.fit(["a"], epochs="2")),
    ("epochs", lambda e: e.lm.fit(["a"], epochs=0)),
    ("epoch", lambda e: e.lm.fit(["a"], epoch=2)),
    ("validation_data", lambda e: e.lm.fit(["a"], validation_data=[1, 2])),
    ("x", lambda e: e.lm.evaluate([1, 2])),
    ("steps", lambda e: e.lm.evaluate(["a"], steps=-1)),
    # ---- the preprocessor's fields and call -------------------------------------------------
    ("sequence_length", _set("sequence_length", -5)),
    ("sequence_length", _set("sequence_length", 0)),
    ("sequence_length", _set("sequence_length", "256")),
    ("sequence_length", _set("sequence_length", 2.5)),
    ("sequence_length", _set("sequence_length", True)),
    ("add_bos", _set("add_bos", "yes")),
    ("add_eos", _set("add_eos", None)),
    ("chat_format", _set("chat_format", 1)),
    ("x", lambda e: e.lm.preprocessor([1])),
    ("x", lambda e: e.lm.preprocessor({"prompt": ["a"], "response": ["b"]})),
    ("sequence_length", lambda e: e.lm.preprocessor("a", sequence_length=0)),
    ("tokenizer", lambda e: gk.GemmaCausalLMPreprocessor("not a tokenizer")),
    # ---- tokenizer --------------------------------------------------------------------------
    ("text", lambda e: e.tok.tokenize(None)),
    ("text", lambda e: e.tok.tokenize(5)),
    ("text", lambda e: e.tok.tokenize(["a", 3])),
    ("text", lambda e: e.tok.tokenize({"a": 1})),
    ("add_bos", lambda e: e.tok.tokenize("a", add_bos="yes")),
    ("add_eos", lambda e: e.tok.tokenize("a", add_eos=1)),
    ("ids", lambda e: e.tok.detokenize(None)),
    ("ids", lambda e: e.tok.detokenize("abc")),
    ("ids", lambda e: e.tok.detokenize([1.5, 2.0])),
    ("ids", lambda e: e.tok.detokenize(np.array([[1, 2], [3, "x"]]))),
    ("skip_special", lambda e: e.tok.detokenize([2, 3], skip_special="no")),
    ("token_id", lambda e: e.tok.id_to_token("a")),
    ("token_id", lambda e: e.tok.id_to_token(10 ** 6)),
    ("token", lambda e: e.tok.token_to_id(5)),
    ("proto", lambda e: gk.GemmaTokenizer(None)),
    ("preset", lambda e: gk.GemmaTokenizer.from_preset(5)),
    # ---- presets: loading and saving --------------------------------------------------------
    ("preset", lambda e: gk.GemmaCausalLM.from_preset(5)),
    ("preset", lambda e: gk.GemmaCausalLM.from_preset(None)),
    ("preset", lambda e: gk.GemmaCausalLM.from_preset("gemma_demo_not_a_preset")),
    ("dtype", lambda e: gk.GemmaCausalLM.from_preset("gemma_demo", dtype="int8")),
    ("dtype", lambda e: gk.GemmaCausalLM.from_preset("gemma_demo", dtype=16)),
    ("quantize", lambda e: gk.GemmaCausalLM.from_preset("gemma_demo", quantize="int3")),
    ("block_size", lambda e: gk.GemmaCausalLM.from_preset("gemma_demo", quantize="int4",
                                                          block_size=0)),
    ("block_size", lambda e: gk.GemmaCausalLM.from_preset("gemma_demo", quantize="int8",
                                                          block_size=0)),
    ("load_tokenizer", lambda e: gk.GemmaCausalLM.from_preset("gemma_demo",
                                                              load_tokenizer="no")),
    ("preset_dir", lambda e: e.lm.save_to_preset(5)),
    ("preset_dir", lambda e: e.lm.save_to_preset(None)),
    ("format", lambda e: e.lm.save_to_preset(e.tmp / "p1", format="onnx")),
    ("max_shard_size", lambda e: e.lm.save_to_preset(e.tmp / "p2", max_shard_size=0)),
    ("max_shard_size", lambda e: e.lm.save_to_preset(e.tmp / "p3", max_shard_size="1GB")),
    ("overwrite", lambda e: e.lm.save_to_preset(e.tmp / "p4", overwrite="yes")),
    # ---- LoRA -------------------------------------------------------------------------------
    ("rank", lambda e: e.lm.backbone.enable_lora(rank="4")),
    ("rank", lambda e: e.lm.backbone.enable_lora(rank=0)),
    ("rank", lambda e: e.lm.backbone.enable_lora(rank=2.0)),
    ("alpha", lambda e: e.lm.backbone.enable_lora(rank=2, alpha="x")),
    ("alpha", lambda e: e.lm.backbone.enable_lora(rank=2, alpha=-1.0)),
    ("target_names", lambda e: e.lm.backbone.enable_lora(rank=2, target_names=["q_proj"])),
    ("target_names", lambda e: e.lm.backbone.enable_lora(rank=2, target_names=5)),
    ("path", lambda e: e.lm.save_lora_weights(5)),
    ("path", lambda e: e.lm.save_lora_weights(e.tmp / "adapter.txt")),
    ("overwrite", lambda e: e.lm.save_lora_weights(e.tmp / "a.lora.h5", overwrite="no")),
    ("path", lambda e: e.lm.load_lora_weights(None)),
    ("path", lambda e: e.lm.load_lora_weights(e.tmp / "adapters")),
    ("path", lambda e: e.lm.load_lora_weights(e.tmp / "missing.lora.h5")),
    # ---- quantize ---------------------------------------------------------------------------
    ("mode", lambda e: e.lm.quantize("int3")),
    ("mode", lambda e: e.lm.quantize()),
    ("block_size", lambda e: e.lm.quantize("int4", block_size=0)),
    ("block_size", lambda e: e.lm.quantize("int4", block_size="32")),
    ("block_size", lambda e: e.lm.quantize("int8", block_size=-5)),
    ("filters", lambda e: e.lm.quantize("int8", filters=5)),
    ("bits", lambda e: e.lm.quantize("int8", bits=8)),
    # ---- gk.export: the arguments it checks before any work ---------------------------------
    ("format", _export(format="onnx")),
    ("quantize", _export(format="litert", quantize="int3")),
    ("quantize", _export(format="saved_model", quantize="int8")),
    ("max_length", _export(max_length=1)),
    ("max_length", _export(max_length="64")),
    ("prefill_length", _export(prefill_length=0)),
    ("overwrite", _export(overwrite="no")),  # truthy: would replace the target
    ("allow_large_file", _export(format="litert", allow_large_file="no")),
    ("path", lambda e: gk.export(e.lm, 5)),
    ("lm", lambda e: gk.export(None, e.tmp / "export_out")),
    ("format", lambda e: gk.export(e.lm, e.tmp / "x.tflite", format="saved_model")),
]

# Backend tensors: how a tensor's dtype is read differs per backend.
TENSOR_TABLE = [
    ("token_ids", lambda e: e.lm.score(keras.ops.convert_to_tensor(e.ids, "float32"))),
    ("padding_mask", lambda e: e.lm.score(e.ids, padding_mask=keras.ops.ones((1, 2), "int32"))),
    ("ids", lambda e: e.tok.detokenize(keras.ops.convert_to_tensor([1.5, 2.5]))),
]


def _check(env, argument, call):
    state = _state(env.lm)
    with pytest.raises(Exception) as caught:  # no exception at all: silently accepted
        call(env)
    error = caught.value
    assert isinstance(error, gk.GemmaError), (
        f"a raw {type(error).__name__} instead of a gk.GemmaError: {error}")
    assert re.search(rf"(?<![\w]){re.escape(argument)}(?![\w])", str(error)), (
        f"the message does not name {argument!r}: {error}")
    assert _state(env.lm) == state, "a refused call changed the model"


def _state(lm):
    """What a refused call must leave as it was."""
    p = lm.preprocessor
    return (p.sequence_length, p.add_bos, p.add_eos, p.chat_format,
            lm.backbone.token_embedding.quantization_mode,
            sum(layer.lora_enabled for layer in gk.lora.projections(lm.backbone).values()))


def _ids(table):
    counts = {}
    out = []
    for argument, _ in table:
        counts[argument] = counts.get(argument, 0) + 1
        out.append(f"{argument}-{counts[argument]}")
    return out


@pytest.mark.once("jax")  # plain Python before any backend work: the same on every backend
@pytest.mark.parametrize("argument, call", TABLE, ids=_ids(TABLE))
def test_a_wrong_argument_is_a_gemma_error_naming_it(env, argument, call):
    _check(env, argument, call)


@pytest.mark.parametrize("argument, call", TENSOR_TABLE, ids=_ids(TENSOR_TABLE))
def test_a_wrong_tensor_argument_is_a_gemma_error_naming_it(env, argument, call):
    _check(env, argument, call)


@pytest.mark.once("jax")
@pytest.mark.parametrize("name", [5, None, ["gemma_demo"]])
def test_preset_cards_are_looked_up_by_name_only(name):
    with pytest.raises(gk.GemmaError, match=r"\bname\b"):
        gk.get_preset_card(name)


@pytest.mark.once("jax")
def test_the_table_covers_every_public_entry_point():
    """A new public method or keyword without a row here is a gap in the table."""
    covered = {argument for argument, _ in TABLE + TENSOR_TABLE}
    for function in (gk.GemmaCausalLM.generate, gk.GemmaCausalLM.score,
                     gk.GemmaCausalLM.from_preset, gk.GemmaCausalLM.save_to_preset,
                     chat_module.ChatSession.send, gk.GemmaTokenizer.tokenize,
                     gk.GemmaTokenizer.detokenize, gk.lora.enable_lora):
        names = [n for n, p in inspect.signature(function).parameters.items()
                 if n not in ("self", "cls", "backbone", "unknown")
                 and p.kind is not p.VAR_KEYWORD]
        missing = [n for n in names if n not in covered]
        # draft is another module's (generation/drafting.py): its checks have their own tests.
        assert set(missing) <= {"draft"}, f"{function.__qualname__}: no row for {missing}"
