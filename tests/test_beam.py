"""Beam search against transformers' own (`generate(num_beams=k, do_sample=False)`) on tiny
checkpoints it wrote: the same hypotheses, in the same order, with the same scores, for a
ragged batch, a stop id that ends beams early, several length penalties and every
early-stopping mode; and the arguments beam search refuses, before anything compiles."""

from collections import Counter

import numpy as np
import pytest

import gemma_keras as gk
from gemma_keras.generation import beam
from gemma_keras.generation import generate as generate_module
from gemma_keras.generation.samplers import BeamSampler, GreedySampler

NEW = 8
WANDERING = dict(std=0.3, embedding_std=0.01)  # beams that differ, not one token repeated
LENGTHS = (5, 9)  # a ragged batch: transformers gets it left-padded with a mask
BEAMS = {"gemma2_gqa": 4, "gemma_mqa": 3, "gemma3": 3}
# (case, [(length_penalty, early_stopping), ...]). With the eos chosen below, the Gemma 2
# settings give transformers four different sets of hypotheses: "never" changes the result
# at length_penalty 1, early_stopping=True at 2, and the penalty changes it.
SETTINGS = [("gemma2_gqa", [(1.0, False), (1.0, "never"), (2.0, True), (2.0, False)]),
            ("gemma_mqa", [(1.0, False), (0.5, True)]),
            ("gemma3", [(1.0, False)])]  # the ring of a 5:1 model, QK-norm, RoPE per kind


@pytest.fixture(scope="module")
def models(pristine_hf, vocab_size):
    """case -> (GemmaCausalLM, HF model, eos): one per case for the module, so the compiled
    steps are shared by its tests."""
    made = {}

    def get(case):
        if case not in made:
            directory, model = pristine_hf(case, **WANDERING)
            eos = _frequent_token(model, *_batch(vocab_size), BEAMS[case])
            made[case] = gk.GemmaCausalLM.from_preset(directory), model, eos
        return made[case]
    return get


def _batch(vocab_size):
    """Left-padded [2, 9] prompt ids and mask, <bos> first."""
    width = max(LENGTHS)
    ids = np.zeros((len(LENGTHS), width), "int32")
    mask = np.zeros_like(ids)
    rng = np.random.RandomState(1)
    for r, n in enumerate(LENGTHS):
        ids[r, width - n:] = rng.randint(4, vocab_size, n)
        ids[r, width - n] = 2
        mask[r, width - n:] = 1
    return ids, mask


def _transformers(model, ids, mask, num_beams, eos, **kwargs):
    """transformers' beam search: per prompt, [(new tokens, score)] for every beam, best
    first (a hypothesis ends at its eos; transformers pads after it)."""
    import torch

    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long), num_beams=num_beams,
            do_sample=False, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0,
            num_return_sequences=num_beams, output_scores=True, return_dict_in_generate=True,
            **kwargs)
    hypotheses = []
    for tokens in out.sequences[:, ids.shape[1]:].tolist():
        if eos is not None and eos[0] in tokens:
            tokens = tokens[: tokens.index(eos[0]) + 1]
        hypotheses.append(tokens)
    scores = out.sequences_scores.tolist()
    return [list(zip(hypotheses, scores))[b * num_beams:(b + 1) * num_beams]
            for b in range(len(ids))]


def _frequent_token(model, ids, mask, num_beams):
    """The token transformers' beams (without a stop id) produce most often after their
    first: as the eos, it ends some beams early, so finished hypotheses compete."""
    beams = _transformers(model, ids, mask, num_beams, None)
    return Counter(t for prompt in beams for tokens, _ in prompt for t in tokens[1:]) \
        .most_common(1)[0][0]


@pytest.mark.parametrize("case,settings", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_beam_search_equals_transformers(case, settings, models, vocab_size):
    lm, model, eos = models(case)
    ids, mask = _batch(vocab_size)
    num_beams = BEAMS[case]
    seen = set()
    for length_penalty, early_stopping in settings:
        setting = f"length_penalty={length_penalty}, early_stopping={early_stopping}"
        kwargs = dict(length_penalty=length_penalty, early_stopping=early_stopping)
        theirs = _transformers(model, ids, mask, num_beams, [eos], **kwargs)
        common = dict(num_beams=num_beams, max_new_tokens=NEW, stop_token_ids=[eos], **kwargs)
        ours = lm.generate({"token_ids": ids, "padding_mask": mask}, include_prompt=False,
                           return_beams=True, **common)
        for b in range(len(ids)):
            assert [t.tolist() for t, _ in ours[b]] == [t for t, _ in theirs[b]], \
                f"prompt {b}, {setting}"
            np.testing.assert_allclose([s for _, s in ours[b]], [s for _, s in theirs[b]],
                                       atol=1e-4, err_msg=f"prompt {b}, {setting}")
        # Without return_beams: keras-hub's ids form, the best beam after each prompt.
        best = lm.generate({"token_ids": ids, "padding_mask": mask}, sampler="beam", **common)
        for b in range(len(ids)):
            row = best["token_ids"][b][best["padding_mask"][b]].tolist()
            assert row == ids[b][mask[b] == 1].tolist() + theirs[b][0][0], f"{setting}"
        seen.add(str(theirs))
        assert any(tokens[-1] == eos and len(tokens) < NEW for prompt in theirs
                   for tokens, _ in prompt) or length_penalty > 1, \
            f"{setting}: no beam ended at the eos, so finished hypotheses were not tested"
    # The settings are not all alike: each mode and penalty changed transformers' result.
    assert len(seen) >= len(settings) - 1, "the settings do not discriminate"


def test_min_new_tokens_and_max_length_equal_transformers(models, vocab_size):
    lm, model, eos = models("gemma2_gqa")
    ids, mask = _batch(vocab_size)
    theirs = _transformers(model, ids, mask, 4, [eos], min_new_tokens=3)
    ours = lm.generate({"token_ids": ids, "padding_mask": mask}, num_beams=4,
                       max_length=ids.shape[1] + NEW, min_new_tokens=3, stop_token_ids=[eos],
                       include_prompt=False, return_beams=True)
    for b in range(len(ids)):
        assert [t.tolist() for t, _ in ours[b]] == [t for t, _ in theirs[b]]
        assert all(len(t) >= 3 for t, _ in ours[b])


def test_text_prompts_and_the_beam_sampler_object(models):
    lm, _, _ = models("gemma_mqa")
    prompts = ["The quick brown fox", "Keras"]
    kw = dict(max_new_tokens=NEW, stop_token_ids=None)
    texts = lm.generate(prompts, sampler=BeamSampler(num_beams=3, return_all_beams=True), **kw)
    tokens = [lm.tokenizer.tokenize(p, add_bos=True) for p in prompts]
    width = max(map(len, tokens))
    ids = np.array([[0] * (width - len(t)) + t for t in tokens])
    as_ids = lm.generate({"token_ids": ids, "padding_mask": ids != 0}, num_beams=3,
                         return_beams=True, include_prompt=False, **kw)
    for prompt, beams, beams_as_ids in zip(prompts, texts, as_ids):
        assert len(beams) == 3 and [s for _, s in beams] == [s for _, s in beams_as_ids]
        assert [s for _, s in beams] == sorted((s for _, s in beams), reverse=True)
        for (text, _), (new, _) in zip(beams, beams_as_ids):
            assert text == prompt + lm.tokenizer.detokenize(new.tolist())
    # One string: its beams alone; without return_beams: the best beam's text.
    alone = lm.generate(prompts[1], num_beams=3, return_beams=True, **kw)
    assert [text for text, _ in alone] == [text for text, _ in texts[1]]
    assert lm.generate(prompts[1], sampler="beam", num_beams=3, **kw) == alone[0][0]


BAD_CALLS = [
    (dict(num_beams=0), ValueError, "num_beams"),
    (dict(num_beams=2.5), TypeError, "num_beams"),
    (dict(num_beams=True), TypeError, "num_beams"),
    (dict(num_beams=2, length_penalty="long"), TypeError, "length_penalty"),
    (dict(num_beams=2, length_penalty=float("nan")), ValueError, "length_penalty"),
    (dict(num_beams=2, early_stopping="sometimes"), ValueError, "early_stopping"),
    (dict(length_penalty=2.0), ValueError, "num_beams"),
    (dict(sampler="top_k", num_beams=2), ValueError, "takes no num_beams"),
    (dict(sampler="beam", temperature=0.5), ValueError, "takes no temperature"),
    (dict(sampler=BeamSampler(), num_beams=3), ValueError, "not both"),
    (dict(num_beams=2, stream=True), ValueError, "stream"),
    (dict(num_beams=2, stop_strings=["x"]), ValueError, "stop_strings"),
    (dict(num_beams=2, repetition_penalty=1.2), ValueError, "repetition_penalty"),
    (dict(return_beams=True), ValueError, "return_beams"),
    (dict(num_beams=2, return_beams="yes"), TypeError, "return_beams"),
    (dict(num_beams=1, return_beams=True), ValueError, "num_beams >= 2"),
    (dict(num_beams=2, draft="prompt_lookup"), ValueError, "draft="),
]


@pytest.mark.once("jax")
@pytest.mark.parametrize("kwargs,kind,message", BAD_CALLS,
                         ids=[f"{i}-{m}" for i, (_, _, m) in enumerate(BAD_CALLS)])
def test_bad_beam_arguments_are_one_gemma_error_before_compiling(
        models, monkeypatch, kwargs, kind, message):
    lm, _, _ = models("gemma_mqa")

    def no_session(*args, **kw):
        raise AssertionError("a generation session was started before the arguments were "
                             "checked")
    monkeypatch.setattr(generate_module, "GenerationSession", no_session)
    with pytest.raises(gk.GemmaError, match=message) as caught:
        lm.generate("The fox", **kwargs)
    assert isinstance(caught.value, kind)


@pytest.mark.once("jax")
def test_one_beam_is_greedy_and_chat_refuses_beams(models):
    args = gk.GenerateOptions().checked()
    sampler, beams = beam.plan(BeamSampler(num_beams=1), False, args)
    assert isinstance(sampler, GreedySampler) and beams is None
    assert gk.samplers.get_sampler("beam").num_beams == 5  # keras-hub's default
    lm, _, _ = models("gemma_mqa")
    chat = lm.chat()
    with pytest.raises(gk.InvalidArgumentError, match="beam"):
        chat.send("Hi", sampler="beam")
    assert chat.history == []
