"""The generate() Python API on the bundled demo preset: strings sent to an instruct model,
what comes back (prompt, completion, special pieces), the transformers-style keywords
(temperature / top_k / top_p, min_new_tokens, repetition_penalty) checked against
transformers' own logits processors, seeds, and one clear GemmaError per bad argument."""

import dataclasses
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import gemma_keras as gk
from gemma_keras.generation import chat as chat_module
from gemma_keras.generation import generate as generate_module
from gemma_keras.generation.samplers import (GreedySampler, TopPSampler,
                                             apply_repetition_penalty, build_sampler)
from gemma_keras.tokenizer import format_chat

REPO = pathlib.Path(__file__).resolve().parents[1]
QUESTION = "What is Keras?"


@pytest.fixture(scope="module")
def lm():
    """The demo as shipped (bfloat16, instruct), loaded once for the module."""
    model = gk.GemmaCausalLM.from_preset("gemma_demo")
    assert model.instruct is True
    return model


@pytest.fixture(scope="module")
def lm32():
    return gk.GemmaCausalLM.from_preset("gemma_demo", dtype="float32")


class HostGreedy(GreedySampler):
    """Greedy, but not exactly `GreedySampler`: always takes the host loop."""


def _stop_ids(lm):
    return {lm.tokenizer.eos_token_id, lm.tokenizer.end_of_turn_id}


# ---- defect 2: a question to an instruct model is answered --------------------------------
def test_a_string_to_an_instruct_model_is_sent_as_a_user_turn(lm):
    text = lm.generate(QUESTION, max_new_tokens=16)
    reply = lm.generate(QUESTION, max_new_tokens=16, include_prompt=False)
    assert reply.strip() and text == QUESTION + reply
    # Exactly the chat format's prompt, sent as written.
    written = format_chat([("user", QUESTION)])
    assert lm.generate(written, max_new_tokens=16, chat_template=False,
                       include_prompt=False) == reply
    # Turn markers written by the caller are not wrapped a second time.
    assert lm.generate(written, max_new_tokens=16, include_prompt=False) == reply
    assert lm.generate(QUESTION, max_new_tokens=16, chat_template=True,
                       include_prompt=False) == reply


def test_chat_template_false_and_base_models_continue_the_text(lm):
    ids = np.array([lm.tokenizer.tokenize("json.dumps(", add_bos=True)])
    as_ids = lm.generate({"token_ids": ids, "padding_mask": np.ones_like(ids)},
                         max_new_tokens=8, include_prompt=False)
    raw = lm.generate("json.dumps(", max_new_tokens=8, chat_template=False,
                      include_prompt=False)
    assert raw == lm.tokenizer.detokenize(
        [t for t in as_ids["token_ids"][0][as_ids["padding_mask"][0]] if t not in _stop_ids(lm)])
    lm.instruct = False  # a base model: strings are never wrapped
    try:
        assert lm.generate("json.dumps(", max_new_tokens=8, include_prompt=False) == raw
    finally:
        lm.instruct = True


class _Recorder:
    """Stands in for `lm` (and its chats) while README and docs lines run; records each
    completion."""

    def __init__(self, lm):
        self.lm, self.completions = lm, []

    def __getattr__(self, name):  # everything but generate and chat: the model's own
        return getattr(self.lm, name)

    def generate(self, inputs, **kwargs):
        out = self.lm.generate(inputs, **kwargs)
        if kwargs.get("stream"):
            return self._tee(inputs, out)
        self.completions.append((inputs, self._completion(inputs, out, kwargs)))
        return out

    def _completion(self, inputs, out, kwargs):
        keep = kwargs.get("include_prompt", True)
        if isinstance(inputs, str):
            return out[len(inputs):] if keep else out
        if isinstance(inputs, dict):
            new = [t for t, m in zip(out["token_ids"][0], out["padding_mask"][0]) if m]
            new = new[len(inputs["token_ids"][0]):] if keep else new
            return self.lm.tokenizer.detokenize(new, skip_special=True)
        return [o[len(i):] if keep else o for i, o in zip(inputs, out)]

    def _tee(self, inputs, pieces):
        got = []
        for piece in pieces:
            got.append(piece)
            yield piece
        self.completions.append((inputs, "".join(got)))

    def chat(self, **kwargs):
        recorder, session = self, self.lm.chat(**kwargs)

        class Chat:
            def send(self, message, **kw):
                reply = session.send(message, **kw)
                recorder.completions.append((message, reply))
                return reply
        return Chat()


def _doc_python_block(path, heading):
    """The first ```python block after the heading `heading` of `path` (in the repository)."""
    text = (REPO / path).read_text()
    return text.split(heading + "\n", 1)[1].split("```python", 1)[1].split("```", 1)[0]


def _api_page_lines():
    """docs/api.md's every-call block (the README's Quickstart block before issue 35), one
    line each with its trailing comment removed."""
    block = _doc_python_block("docs/api.md", "## Every call in one screen")
    return [line.split("  #")[0].strip() for line in block.splitlines()]


def _check_completions(recorder, source, at_least):
    assert len(recorder.completions) >= at_least, (source, recorder.completions)
    for prompt, completion in recorder.completions:
        for text in completion if isinstance(completion, list) else [completion]:
            assert text.strip(), f"{source}: empty completion for {prompt!r}"
            assert "<start_of_turn>" not in text and "<end_of_turn>" not in text


@pytest.mark.once("torch")  # smoke: each call's feature has its own every-backend tests
def test_readme_quickstart_runs_as_written_on_the_demo(lm, tmp_path, monkeypatch, capsys):
    """The README's Quickstart block, whole and as written, in a fresh directory: it loads
    `gemma_demo` (the module's `lm`, loaded by the same call, stands in so that its compiled
    steps serve here too), every completion it prints is text, and the preset is saved."""
    block = _doc_python_block("README.md", "## Quickstart")
    recorder, loaded = _Recorder(lm), []

    def from_preset(preset, **kwargs):
        loaded.append((preset, kwargs))
        return recorder

    monkeypatch.setattr(gk.GemmaCausalLM, "from_preset", staticmethod(from_preset))
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    assert loaded == [("gemma_demo", {})]  # the fixture's own call
    _check_completions(recorder, "README.md Quickstart", at_least=5)
    printed = capsys.readouterr().out
    for _, completion in recorder.completions:
        if isinstance(completion, str):
            assert completion in printed, (completion, printed)
    assert (tmp_path / "my_gemma" / "config.json").is_file()


@pytest.mark.once("torch")  # smoke: each call's feature has its own every-backend tests
def test_every_api_page_generate_call_completes_on_the_demo(lm):
    calls = [line for line in _api_page_lines() if "lm.generate(" in line or ".send(" in line]
    assert len(calls) >= 5, calls
    ids = np.array([lm.tokenizer.tokenize("json.dumps(", add_bos=True)])
    for line in calls:
        recorder = _Recorder(lm)
        exec(line, {"lm": recorder, "gk": gk, "ids": ids, "mask": np.ones_like(ids),
                    "print": lambda *a, **k: None})
        _check_completions(recorder, line, at_least=1)


# ---- defect 5: empty prompts and special pieces -------------------------------------------
def test_empty_prompt_generates_from_bos_and_returns_no_special_pieces(lm):
    text = lm.generate("", max_new_tokens=12)
    ids = lm.generate({"token_ids": np.array([[lm.tokenizer.bos_token_id]]),
                       "padding_mask": np.array([[1]])}, max_new_tokens=12)
    generated = ids["token_ids"][0, 1:][ids["padding_mask"][0, 1:]]
    assert text == lm.tokenizer.detokenize(
        [t for t in generated if t not in _stop_ids(lm)], skip_special=True)
    assert text.strip()
    for piece in ("<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>"):
        assert piece not in text
    # Asked for, the special pieces are there (the demo opens a turn after <bos>).
    raw = lm.generate("", max_new_tokens=12, skip_special_tokens=False)
    assert raw.startswith("<start_of_turn>") and raw.replace("<start_of_turn>", "") == text


def test_include_prompt_false_returns_the_completion_for_every_input_form(lm):
    prompts = ["class list(", "Module os.path\n\n"]
    full = lm.generate(prompts, max_new_tokens=6, chat_template=False)
    alone = lm.generate(prompts, max_new_tokens=6, chat_template=False, include_prompt=False)
    assert full == [p + c for p, c in zip(prompts, alone)]
    ids = np.array([[2, 5, 9, 11], [0, 2, 7, 8]], "int32")
    mask = ids != 0
    with_prompt = lm.generate({"token_ids": ids, "padding_mask": mask}, max_new_tokens=4)
    new_only = lm.generate({"token_ids": ids, "padding_mask": mask}, max_new_tokens=4,
                           include_prompt=False)
    for r in range(2):
        whole = with_prompt["token_ids"][r][with_prompt["padding_mask"][r]].tolist()
        new = new_only["token_ids"][r][new_only["padding_mask"][r]].tolist()
        assert whole == ids[r][mask[r]].tolist() + new and new


# ---- defect 4: one clear GemmaError per bad argument, before any compilation ------------
BAD_CALLS = [
    (dict(inputs="x", max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(inputs="x", max_new_tokens=-1), ValueError, "max_new_tokens"),
    (dict(inputs="x", max_new_tokens=2.5), TypeError, "max_new_tokens"),
    (dict(inputs="x", max_new_tokens="5"), TypeError, "max_new_tokens"),
    (dict(inputs="x", max_new_tokens=True), TypeError, "max_new_tokens"),
    (dict(inputs="x", max_length=3.0), TypeError, "max_length"),
    (dict(inputs="x", max_length=2), ValueError, "max_length=2 leaves no room"),
    (dict(inputs="fox " * 3000), ValueError, "context"),
    (dict(inputs="x", max_new_tokens=10 ** 6), ValueError, "context"),
    (dict(inputs="x", sampler="nucleus"), ValueError, "Unknown sampler"),
    (dict(inputs="x", sampler=5), TypeError, "sampler"),
    (dict(inputs=[]), ValueError, "empty batch"),
    (dict(inputs=None), TypeError, "got None"),
    (dict(inputs=[1, 2]), TypeError, "list holds int"),
    (dict(inputs=5), TypeError, "takes inputs as a string"),
    (dict(inputs="x", seed="abc"), TypeError, "seed"),
    (dict(inputs="x", seed=-1), ValueError, "seed"),
    (dict(inputs="x", seed=1.5), TypeError, "seed"),
    (dict(inputs="x", stream="yes"), TypeError, "stream"),
    (dict(inputs=["a", "b"], stream=True), ValueError, "one string prompt"),
    (dict(inputs="x", temperature=0), ValueError, "temperature"),
    (dict(inputs="x", temperature="hot"), TypeError, "temperature"),
    (dict(inputs="x", top_k=0), ValueError, "top_k"),
    (dict(inputs="x", top_k=2.5), TypeError, "top_k"),
    (dict(inputs="x", top_p=1.5), ValueError, "top_p"),
    (dict(inputs="x", sampler=gk.samplers.TopPSampler(), top_p=0.5), ValueError, "not both"),
    (dict(inputs="x", sampler="greedy", temperature=0.5), ValueError, "takes no temperature"),
    (dict(inputs="x", sampler="random", top_k=5), ValueError, "takes no top_k"),
    (dict(inputs="x", repetition_penalty=0), ValueError, "repetition_penalty"),
    (dict(inputs="x", repetition_penalty="x"), TypeError, "repetition_penalty"),
    (dict(inputs="x", min_new_tokens=-1), ValueError, "min_new_tokens"),
    (dict(inputs="x", min_new_tokens=9, max_new_tokens=4), ValueError, "min_new_tokens=9"),
    (dict(inputs="x", chat_template="yes"), ValueError, "chat_template"),
    (dict(inputs="x", include_prompt="no"), TypeError, "include_prompt"),
    (dict(inputs="x", stop_strings=[""]), ValueError, "stop_strings"),
    (dict(inputs="x", stop_strings=[1]), TypeError, "stop_strings"),
    (dict(inputs="x", stop_token_ids=7), TypeError, "stop_token_ids"),
    (dict(inputs={"token_ids": np.array([[2.0, 5.0]])}), TypeError, "integers"),
    (dict(inputs={"token_ids": np.array([[2, 10 ** 6]])}), ValueError, "vocabulary"),
    (dict(inputs={"token_ids": np.array([[2, 5]]), "padding_mask": np.array([[0, 0]])}),
     ValueError, "no tokens"),
    # An unknown keyword names the one meant (Python's own TypeError did not).
    (dict(inputs="x", max_tokens=5), TypeError, "'max_tokens'. Did you mean max_new_tokens?"),
    (dict(inputs="x", max_new_token=5), TypeError, "Did you mean max_new_tokens?"),
    (dict(inputs="x", do_sample=True), TypeError, "temperature=, top_k= or top_p="),
    # Each combination beam search refuses gives its own reason (repetition_penalty was
    # refused with the streaming case's "nothing to stream").
    (dict(inputs="x", num_beams=2, repetition_penalty=1.2), ValueError,
     "does not take repetition_penalty: gemma_keras's beam search scores each beam"),
    (dict(inputs="x", num_beams=2, stop_strings=["."]), ValueError,
     "does not take stop_strings: beams end on stop_token_ids only"),
    (dict(inputs="x", num_beams=2, stream=True), ValueError,
     "does not take stream: it picks the best whole sequences only at the end"),
]


@pytest.mark.parametrize("kwargs,kind,message", BAD_CALLS,
                         ids=[f"{i}-{m}" for i, (_, _, m) in enumerate(BAD_CALLS)])
def test_bad_generate_arguments_are_one_gemma_error_before_compiling(
        lm, monkeypatch, kwargs, kind, message):
    def no_session(*args, **kw):
        raise AssertionError("a generation session was started before the arguments were "
                             "checked")
    monkeypatch.setattr(generate_module, "GenerationSession", no_session)
    with pytest.raises(gk.GemmaError, match=re.escape(message)) as caught:
        lm.generate(**kwargs)
    assert isinstance(caught.value, kind)
    assert "\n" not in str(caught.value)


def test_beam_search_refusals_give_only_their_own_reason(lm):
    for given, other in [(dict(repetition_penalty=1.2), "stream"),
                         (dict(stop_strings=["."]), "stream"),
                         (dict(stream=True), "stop_token_ids")]:
        with pytest.raises(gk.InvalidArgumentError) as caught:
            lm.generate("x", num_beams=2, **given)
        assert other not in str(caught.value), caught.value


def test_bad_chat_and_fit_arguments_are_gemma_errors(lm):
    chat = lm.chat()
    for kwargs, kind in [(dict(message=None), TypeError),
                         (dict(message="Hi", num_beams=2), TypeError),
                         (dict(message="Hi", max_tokens=5), TypeError),
                         (dict(message="Hi", max_new_tokens=0), ValueError),
                         (dict(message="Hi", seed="abc"), TypeError),
                         (dict(message="Hi", top_p=2.0), ValueError),
                         (dict(message="Hi", max_new_tokens=4, min_new_tokens=8), ValueError)]:
        with pytest.raises(gk.GemmaError) as caught:
            chat.send(**kwargs)
        assert isinstance(caught.value, kind)
    assert chat.history == [] and chat.token_ids == []  # nothing was half-sent
    for data, kind in [([], ValueError), (None, TypeError), ({"prompts": [], "responses": []},
                       ValueError), (["a", 3], TypeError),
                       ({"prompts": ["a", "b"], "responses": ["c"]}, ValueError),
                       ([1, 2, 3], TypeError), ({"prompt": ["a"], "response": ["b"]}, ValueError),
                       ([{"prompt": "a"}], ValueError)]:
        with pytest.raises(gk.GemmaError) as caught:
            lm.fit(data, epochs=1)
        assert isinstance(caught.value, kind), data


# ---- logits as docs/api.md reads them (issue 32, item 10) --------------------------------------
def _api_page_logits_lines():
    return [line for line in _api_page_lines() if line.startswith(("import", "logits"))]


def test_api_page_logits_lines_give_numpy_in_the_compute_dtype_on_every_backend(lm, lm32):
    """docs/api.md's logits lines, as written: what they leave is NumPy that np.asarray
    reads (on PyTorch `lm(...)` itself is a tensor in autograd's graph, which NumPy refuses,
    and NumPy cannot read torch's bfloat16 at all), in the dtype docs/api.md states, equal to
    the model's own logits."""
    lines = _api_page_logits_lines()
    assert any(line.startswith("logits = lm(") for line in lines), lines
    # The shape of _reference_greedy's first call: JAX's eager ops compiled here serve it.
    prompt = lm32.tokenizer.tokenize("json.dumps(", add_bos=True)
    ids = np.zeros((1, len(prompt) + 10), "int32")
    mask = np.zeros(ids.shape, bool)
    ids[0, :len(prompt)], mask[0, :len(prompt)] = prompt, True
    # bfloat16 too where an eager call is cheap (JAX compiles each eager op of a new dtype).
    for model in [lm32] + ([lm] if keras.backend.backend() == "torch" else []):
        namespace = {"lm": model, "ids": ids, "mask": mask}
        for line in lines:
            exec(line, namespace)
        logits = np.asarray(namespace["logits"])
        assert logits.shape == (*ids.shape, model.config.vocabulary_size)
        assert keras.backend.standardize_dtype(logits.dtype) == model.dtype_policy.compute_dtype
        raw = model({"token_ids": ids, "padding_mask": mask})
        np.testing.assert_array_equal(logits, keras.ops.convert_to_numpy(raw))
        if keras.backend.backend() == "torch":
            # The call's own tensor stays in autograd's graph: a torch training loop of the
            # user's gets gradients (what detaching the logits would have broken).
            assert raw.requires_grad
            raw.float().logsumexp(-1).sum().backward()
            table = model.backbone.token_embedding.embeddings.value
            assert table.grad is not None and float(table.grad.abs().sum()) > 0
            table.grad = None


# ---- the transformers-style keywords ------------------------------------------------------
def test_sampling_shortcuts_build_the_sampler_objects(lm):
    prompt = "Module collections\n\n"

    def same(a, b):
        kw = dict(max_new_tokens=10, seed=4, chat_template=False)
        assert lm.generate(prompt, **a, **kw) == lm.generate(prompt, **b, **kw)

    same(dict(temperature=0.7), dict(sampler=gk.samplers.RandomSampler(temperature=0.7)))
    same(dict(top_k=3), dict(sampler=gk.samplers.TopKSampler(k=3)))
    same(dict(top_p=0.8, temperature=0.9),
         dict(sampler=gk.samplers.TopPSampler(p=0.8, temperature=0.9)))
    same(dict(top_p=0.8, top_k=4), dict(sampler=gk.samplers.TopPSampler(p=0.8, k=4)))
    same(dict(sampler="top_k", top_k=3), dict(sampler=gk.samplers.TopKSampler(k=3)))
    assert type(build_sampler()) is GreedySampler
    assert type(build_sampler("top_p", temperature=0.5)) is TopPSampler


def test_top_k_with_top_p_filters_as_transformers_warpers():
    torch = pytest.importorskip("torch")
    warpers = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 300)).astype("float32") * 3  # [batch, vocab]
    for k, p, temperature in [(20, 0.9, 1.0), (5, 0.5, 0.7), (300, 0.3, 1.3), (1, 0.99, 1.0)]:
        ours = TopPSampler(p=p, k=k, temperature=temperature).filter(logits / temperature)
        scores = torch.tensor(logits)
        for warper in (warpers.TemperatureLogitsWarper(temperature),
                       warpers.TopKLogitsWarper(k), warpers.TopPLogitsWarper(p)):
            scores = warper(None, scores)
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(scores.numpy()))


def test_repetition_penalty_equals_transformers_processor():
    torch = pytest.importorskip("torch")
    processors = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 50)).astype("float32") * 4  # [batch, vocab], both signs
    contexts = rng.integers(0, 50, size=(4, 30))  # with repeats, as real contexts have
    for penalty in (0.7, 1.3, 2.0):
        ours = apply_repetition_penalty(logits, contexts.tolist(), penalty)
        theirs = processors.RepetitionPenaltyLogitsProcessor(penalty)(
            torch.tensor(contexts), torch.tensor(logits)).numpy()
        np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def _reference_greedy(lm, prompt, steps, penalty):
    """Greedy decoding from full forward passes (no cache) with transformers' repetition
    penalty processor: the reference for the cached, host-side `generate`."""
    torch = pytest.importorskip("torch")
    processors = pytest.importorskip("transformers.generation.logits_process")
    processor = processors.RepetitionPenaltyLogitsProcessor(penalty)
    tokens = list(prompt)
    width = len(prompt) + steps  # one padded length: one compilation for every step
    for _ in range(steps):
        ids = np.zeros((1, width), "int32")
        mask = np.zeros((1, width), bool)
        ids[0, : len(tokens)], mask[0, : len(tokens)] = tokens, True
        logits = keras.ops.convert_to_numpy(
            lm({"token_ids": ids, "padding_mask": mask}))[:, len(tokens) - 1]  # [1, vocab]
        scores = processor(torch.tensor([tokens]), torch.tensor(np.asarray(logits, "float32")))
        token = int(scores.argmax(-1))
        tokens.append(token)
        if token in _stop_ids(lm):
            break
    return tokens[len(prompt):]


def test_greedy_with_repetition_penalty_equals_a_full_forward_reference(lm32):
    # Greedy with a penalty must take the host loop: the compiled greedy loop cannot apply it.
    prompt = lm32.tokenizer.tokenize("json.dumps(", add_bos=True)
    ids = np.array([prompt])
    out = lm32.generate({"token_ids": ids, "padding_mask": np.ones_like(ids)},
                        max_new_tokens=10, repetition_penalty=1.8, include_prompt=False)
    got = out["token_ids"][0][out["padding_mask"][0]].tolist()
    assert got == _reference_greedy(lm32, prompt, 10, 1.8)
    plain = lm32.generate("json.dumps(", max_new_tokens=10, chat_template=False)
    assert lm32.generate("json.dumps(", max_new_tokens=10, chat_template=False,
                         repetition_penalty=1.8) != plain  # the demo repeats itself


def test_min_new_tokens_masks_the_stop_ids_until_reached(lm):
    # Sent as written, the question ends the demo's turn at once: <end_of_turn> first.
    ids = np.array([lm.tokenizer.tokenize(QUESTION, add_bos=True)])
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    first = lm.generate(inputs, max_new_tokens=6, include_prompt=False)
    assert first["token_ids"][0, 0] == lm.tokenizer.end_of_turn_id
    forced = lm.generate(inputs, max_new_tokens=6, min_new_tokens=1, include_prompt=False)
    assert forced["token_ids"][0, 0] not in _stop_ids(lm)
    # The question as a user turn is answered in fewer than 16 tokens: a loop that dropped
    # the rule after the first token would stop there.
    ids = np.array([lm.tokenizer.tokenize(format_chat([("user", QUESTION)]), add_bos=True)])
    answered = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    out = lm.generate(answered, max_new_tokens=20, include_prompt=False)
    assert out["padding_mask"].sum() < 16
    for sampler in (None, HostGreedy()):  # the compiled greedy loop and the host loop
        out = lm.generate(answered, max_new_tokens=20, min_new_tokens=16, sampler=sampler,
                          include_prompt=False)
        new = out["token_ids"][0][out["padding_mask"][0]].tolist()
        assert len(new) >= 16 and not set(new[:16]) & _stop_ids(lm), new
        if sampler is None:
            expected = new
    assert new == expected
    text = lm.generate(QUESTION, max_new_tokens=20, min_new_tokens=16, include_prompt=False)
    streamed = "".join(lm.generate(QUESTION, max_new_tokens=20, min_new_tokens=16,
                                   stream=True))
    assert text == streamed == lm.tokenizer.detokenize(
        [t for t in expected if t not in _stop_ids(lm)], skip_special=True) and text.strip()


def test_chat_send_takes_the_same_keywords(lm):
    a = lm.chat().send(QUESTION, max_new_tokens=12, top_p=0.9, seed=2, repetition_penalty=1.3)
    b = lm.chat().send(QUESTION, max_new_tokens=12, seed=2, repetition_penalty=1.3,
                       sampler=gk.samplers.TopPSampler(p=0.9))
    assert a == b and a.strip()
    reply = lm.chat().send(QUESTION, max_new_tokens=12, min_new_tokens=12)
    assert len(lm.tokenizer.tokenize(reply)) >= 6


def test_generate_options_are_the_keywords_in_one_object(lm):
    # The signatures are made from the one definition: every field, in order.
    fields = [f.name for f in dataclasses.fields(gk.GenerateOptions)]
    names = list(inspect.signature(gk.GemmaCausalLM.generate).parameters)
    assert names == ["self", "inputs", *fields, "options"]
    send = list(inspect.signature(chat_module.ChatSession.send).parameters)
    assert send[:2] == ["self", "message"] and set(send[2:-1]) <= set(fields)
    prompts = [QUESTION, "def f(x):"]
    opts = gk.GenerateOptions(max_new_tokens=10, top_p=0.9, seed=4, repetition_penalty=1.2)
    by_keywords = lm.generate(prompts, max_new_tokens=10, top_p=0.9, seed=4,
                              repetition_penalty=1.2)
    assert lm.generate(prompts, options=opts) == by_keywords
    # A keyword beside options overrides its field; positional ones keep keras-hub's order.
    assert lm.generate(prompts, options=opts, seed=5) == lm.generate(
        prompts, max_new_tokens=10, top_p=0.9, seed=5, repetition_penalty=1.2)
    assert lm.generate(prompts[1], 12, chat_template=False) == lm.generate(
        prompts[1], max_length=12, chat_template=False)
    # chat.send takes the fields a reply has from the same object.
    assert lm.chat().send(QUESTION, options=opts) == lm.chat().send(
        QUESTION, max_new_tokens=10, top_p=0.9, seed=4, repetition_penalty=1.2)
    # A field the options leave at its default keeps the call's own default (chat: 256).
    assert lm.chat().send(QUESTION, options=gk.GenerateOptions(seed=4, top_p=0.9)) == \
        lm.chat().send(QUESTION, max_new_tokens=256, seed=4, top_p=0.9)


# ---- defect 6: reproducibility ------------------------------------------------------------
def test_same_seed_same_text_on_every_call_stream_and_chat(lm):
    kw = dict(max_new_tokens=12, top_p=0.9, temperature=1.2)
    texts = {lm.generate(QUESTION, seed=7, include_prompt=False, **kw) for _ in range(3)}
    assert len(texts) == 1
    streamed = "".join(lm.generate(QUESTION, seed=7, stream=True, **kw))
    assert streamed == texts.pop()
    replies = {lm.chat().send(QUESTION, seed=7, **kw) for _ in range(2)}
    assert replies == {streamed}
    assert len({lm.generate(QUESTION, seed=s, **kw) for s in range(5)}) > 1  # seeds matter


def _sampled(lm, prompts):
    return ([lm.generate(p, max_new_tokens=16, top_p=0.9, seed=1) for p in prompts]
            + [lm.generate(p, max_new_tokens=16, temperature=1.0, seed=3) for p in prompts])


_CHILD = """
import json, sys
import gemma_keras as gk
from test_generate_api import _sampled
lm = gk.GemmaCausalLM.from_preset("gemma_demo", dtype="float32")
print(json.dumps(_sampled(lm, json.loads(sys.argv[1]))))
"""


@pytest.mark.once("jax")
def test_float32_sampling_gives_the_same_text_on_every_backend(lm32):
    prompts = ["Module collections\n\n", QUESTION, "What does str.join do?"]
    here = keras.backend.backend()
    texts = {here: _sampled(lm32, prompts)}
    for backend in {"jax", "tensorflow", "torch"} - {here}:
        env = dict(os.environ, KERAS_BACKEND=backend,
                   PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
        result = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(prompts)], env=env,
                                capture_output=True, text=True, timeout=600, cwd=REPO)
        assert result.returncode == 0, result.stderr[-2000:]
        texts[backend] = json.loads(result.stdout.strip().splitlines()[-1])
    assert texts["jax"] == texts["tensorflow"] == texts["torch"]


# ---- the command line's matching flags ----------------------------------------------------
@pytest.mark.once("torch")
def test_cli_sampling_flags_equal_the_python_keywords(lm):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "gemma_keras.cli", *args], cwd=REPO,
                              env=dict(os.environ), capture_output=True, text=True,
                              timeout=300)

    ran = cli("generate", "--max-new-tokens", "10", "--top-p", "0.9", "--seed", "1",
              "--min-new-tokens", "3", "--repetition-penalty", "1.3", QUESTION)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout == lm.generate(QUESTION, max_new_tokens=10, top_p=0.9, seed=1,
                                     min_new_tokens=3, repetition_penalty=1.3) + "\n"
    # --no-chat-template against chat_template=False: the docs/cli.md block's test
    # (test_cli_and_guides.py) compares its `generate --no-chat-template` line to lm.generate.
    bad = cli("generate", "--sampler", "greedy", "--temperature", "0.5", "x")
    assert bad.returncode == 2 and "takes no temperature" in bad.stderr
    assert "Traceback" not in bad.stderr
