"""The host-side logits rules against transformers' own, not against our own code path.

1. On random logits (and a history of earlier tokens): the distribution a sampler draws from
   after every rule (repetition_penalty and min_new_tokens as `Decoding.adjust` applies them,
   then temperature, top_k, top_p, min_p as `build_sampler` builds them from generate's
   keywords) equals softmax of transformers' `LogitsProcessorList` in the order its
   `_get_logits_processor` builds it, for each setting alone and combined, with ties and -inf.
2. End to end on a tiny checkpoint transformers wrote (float32): greedy decoding with
   repetition_penalty, min_new_tokens and a stop id gives transformers' `generate` ids, plain,
   with prompt-lookup drafts, with a self-draft (int8) and streamed; sampling (plain and with
   both drafters) draws every token from transformers' distribution for its context: at
   each place the logits are recorded and checked against the HF model's for that context,
   and the distribution the decoding used (with drafts, the acceptance test's `p`) against
   transformers' processors on them.

The rules run on the host in NumPy, the same on every backend; the drafted rounds they
steer are compiled per backend, and tests/test_speculative.py runs those on every backend.
"""

import itertools

import numpy as np
import pytest

import gemma_keras as gk
from gemma_keras.generation import options, speculative
from gemma_keras.generation.options import Decoding
from gemma_keras.generation.samplers import (RandomSampler, TopKSampler, TopPSampler,
                                             build_sampler, check_repetition_penalty)

WANDERING = dict(std=0.3, embedding_std=0.01)  # as test_speculative: the same checkpoint
STOPS = (1, 7)


# ---- 1. the distribution after every rule, on random logits -------------------------------
def _transformers_probs(scores, history, count, stop_ids, temperature=None, top_k=None,
                        top_p=None, min_p=None, penalty=None, min_new=0):
    """softmax of transformers' processed scores for one row: scores [vocab] float32 after
    `history` (token list) whose last `count` tokens are new. The processors are the ones
    `GenerationMixin._get_logits_processor` appends for these settings, in its order; the
    warpers get float64 scores, as our samplers compute in float64."""
    import torch
    from transformers.generation import logits_process as lp

    ids = torch.tensor([history], dtype=torch.long)
    rules = []
    if penalty is not None and penalty != 1.0:
        rules.append(lp.RepetitionPenaltyLogitsProcessor(float(penalty)))
    if min_new > 0 and stop_ids:
        rules.append(lp.MinNewTokensLengthLogitsProcessor(len(history) - count, min_new,
                                                           list(stop_ids)))
    out = lp.LogitsProcessorList(rules)(ids, torch.tensor(np.asarray(scores, "float32")[None]))
    warpers = []
    if temperature is not None and temperature != 1.0:
        warpers.append(lp.TemperatureLogitsWarper(float(temperature)))
    if top_k:
        warpers.append(lp.TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(lp.TopPLogitsWarper(float(top_p)))
    if min_p is not None:
        warpers.append(lp.MinPLogitsWarper(float(min_p)))
    out = lp.LogitsProcessorList(warpers)(ids, out.double())
    return torch.softmax(out, dim=-1)[0].numpy()


def _ours(logits, histories, counts, stop_ids, temperature=None, top_k=None, top_p=None,
          min_p=None, penalty=None, min_new=0):
    """(the adjusted logits, the distribution) our generate samples from for these keywords:
    the sampler as `build_sampler` makes it from them, the rules as `Decoding.adjust`
    applies them."""
    shortcuts = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    given = any(v is not None for v in shortcuts.values())
    sampler = build_sampler(None if given else "random", **shortcuts)
    decoding = Decoding(sampler, set(stop_ids), min_new, check_repetition_penalty(penalty))
    adjusted = decoding.adjust(logits, histories, counts)
    return adjusted, sampler.probs(adjusted)


def _assert_same_distribution(ours, theirs, adjusted, setting):
    """Equal per token, except that tokens with equal logits are exchangeable: where a top-p
    cut falls inside a group of tied tokens, which of them stay is the sort's choice (numpy's
    and torch's sorts differ), so within each tie group the sorted probabilities are compared."""
    for r in range(len(ours)):
        mine = np.lexsort((ours[r], adjusted[r]))
        yours = np.lexsort((theirs[r], adjusted[r]))
        np.testing.assert_array_equal(adjusted[r][mine], adjusted[r][yours])
        np.testing.assert_allclose(ours[r][mine], theirs[r][yours], rtol=1e-7, atol=1e-12,
                                   err_msg=f"row {r}, {setting}")


def _cases():
    """(name, logits [4, 64] float32, histories, counts): continuous logits; integer logits
    (many ties); and logits with -inf entries (a stop id and seen tokens among them). The
    stop ids are made likely, so masking them changes the distribution; the histories repeat
    likely tokens, so the penalty does."""
    rng = np.random.default_rng(0)
    vocab, counts = 64, [0, 1, 2, 6]  # +3 below: 3, 4, 5, 9 new tokens, either side of 5
    continuous = (rng.normal(size=(4, vocab)) * 2.5).astype("float32")
    ties = rng.integers(-3, 4, size=(4, vocab)).astype("float32")
    infinite = (rng.normal(size=(4, vocab)) * 2.5).astype("float32")
    infinite[:, rng.choice(vocab, 20, replace=False)] = -np.inf
    infinite[0, STOPS[1]] = -np.inf
    cases = []
    for name, logits in (("continuous", continuous), ("ties", ties), ("-inf", infinite)):
        logits = logits.copy()
        logits[:, STOPS[0]] = logits.max(axis=1) + 0.5  # the stop id first
        top = np.argsort(-logits, axis=1)[:, :6]
        histories = [rng.integers(0, vocab, 6 + n).tolist() + top[r, :3].tolist()
                     for r, n in enumerate(counts)]
        cases.append((name, logits, histories, [c + 3 for c in counts]))
    # Exact ties at the cuts: four equal tokens of probability 1/4 each, the rest -inf.
    flat = np.full((4, vocab), -np.inf, "float32")
    flat[:, 10:14] = 0.0
    cases.append(("four equal", flat, [[2, 3]] * 4, [0, 0, 0, 0]))
    return cases


GRID = [dict(zip(("temperature", "top_k", "top_p", "min_p", "penalty", "min_new"), values))
        for values in itertools.product((None, 0.6, 1.7), (None, 3), (None, 0.7),
                                        (None, 0.15), (None, 1.4), (0, 5))]
EXTREMES = [dict(temperature=0.25), dict(temperature=4.0), dict(top_k=1), dict(top_k=64),
            dict(top_k=1000), dict(top_p=1e-6), dict(top_p=0.5), dict(top_p=0.75),
            dict(top_p=1.0), dict(min_p=0.0), dict(min_p=0.5), dict(min_p=1.0),
            dict(penalty=0.7), dict(penalty=3.0), dict(min_new=100),
            dict(top_k=2, top_p=0.5, min_p=0.9, temperature=0.5, penalty=2.0, min_new=4)]


@pytest.mark.once("torch")  # NumPy on the host, the same on every backend; transformers'
#                             processors need torch, whose pass imports it anyway
def test_the_sampled_distribution_equals_transformers_processors():
    cases = _cases()
    for setting in GRID + EXTREMES:
        for name, logits, histories, counts in cases:
            adjusted, ours = _ours(logits, histories, counts, STOPS, **setting)
            theirs = np.stack([_transformers_probs(logits[r], histories[r], counts[r], STOPS,
                                                   **setting) for r in range(len(logits))])
            _assert_same_distribution(ours, theirs, adjusted, f"{name}, {setting}")
    # The grid is not vacuous: every rule changes the distribution of the continuous case.
    name, logits, histories, counts = cases[0]
    base = _ours(logits, histories, counts, STOPS, temperature=1.0)[1]
    for rule in (dict(temperature=0.6), dict(top_k=3), dict(top_p=0.7), dict(min_p=0.15),
                 dict(penalty=1.4), dict(min_new=5)):
        assert not np.allclose(_ours(logits, histories, counts, STOPS, **rule)[1], base), rule


@pytest.mark.once("torch")
def test_the_sampler_objects_and_their_shortcuts_agree():
    """min_p goes with every sampling sampler, by object and by keyword; greedy refuses it."""
    logits = (np.random.default_rng(3).normal(size=(2, 50)) * 3).astype("float32")
    for made, shortcut in [
            (RandomSampler(temperature=0.8, min_p=0.2), dict(temperature=0.8, min_p=0.2)),
            (TopKSampler(k=7, min_p=0.3), dict(top_k=7, min_p=0.3)),
            (TopPSampler(p=0.8, k=9, temperature=1.3, min_p=0.1),
             dict(top_p=0.8, top_k=9, temperature=1.3, min_p=0.1))]:
        np.testing.assert_array_equal(made.probs(logits), build_sampler(**shortcut).probs(logits))
        reference = np.stack([_transformers_probs(row, [2], 0, (), **shortcut) for row in logits])
        np.testing.assert_allclose(made.probs(logits), reference, rtol=1e-7, atol=1e-12)
    assert type(build_sampler(min_p=0.1)) is RandomSampler
    for wrong in (dict(sampler="greedy", min_p=0.1), dict(min_p=1.5), dict(min_p=-0.1),
                  dict(min_p=float("nan")), dict(min_p="0.1"), dict(sampler="beam", min_p=0.1)):
        with pytest.raises(gk.GemmaError, match="min_p"):
            build_sampler(**wrong)


@pytest.mark.once("torch")
def test_cli_min_p_reaches_the_sampler():
    """--min-p is passed on as generate's and chat.send's min_p (the checks of wrong values
    are tests/test_cli_arguments.py's)."""
    from gemma_keras import cli

    for command in (["generate", "x"], ["chat"]):
        args = cli.build_parser().parse_args(command + ["--min-p", "0.2", "--top-k", "5"])
        options = cli._options(args)  # the GenerateOptions the CLI passes on
        sampler = build_sampler(options.sampler, options.temperature, options.top_k,
                                options.top_p, min_p=options.min_p)
        assert (type(sampler), sampler.k, sampler.min_p) == (TopKSampler, 5, 0.2), command


# ---- 2. end to end against transformers' generate on a tiny checkpoint ---------------------
NEW = 12


@pytest.fixture(scope="module")
def tiny(pristine_hf):
    """(GemmaCausalLM, HF model) of the Gemma 2 case (a sliding window of 5, shorter than a
    generation: drafts roll the rings back), float32, loaded once for the module."""
    directory, model = pristine_hf("gemma2_gqa", **WANDERING)
    return gk.GemmaCausalLM.from_preset(directory), model


def _prompts():
    """Three left-padded prompts (<bos> first); the last repeats a phrase, so prompt lookup
    drafts from the first round on."""
    rng = np.random.RandomState(3)
    rows = [[2] + rng.randint(8, 300, size=n).tolist() for n in (5, 9)]
    rows.append([2] + rng.randint(8, 300, size=4).tolist() * 3)
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), "int32")
    mask = np.zeros((len(rows), width), bool)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = row
        mask[r, width - len(row):] = True
    return ids, mask


def _transformers_greedy(model, ids, mask, eos, **kwargs):
    """transformers' greedy `generate`: per row, its new tokens up to and with the stop id."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor(ids, dtype=torch.long),
                             attention_mask=torch.tensor(mask, dtype=torch.long),
                             max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                             eos_token_id=eos, **kwargs).numpy()[:, ids.shape[1]:]
    rows = []
    for tokens in out.tolist():
        if eos is not None and eos in tokens:
            tokens = tokens[:tokens.index(eos) + 1]
        rows.append(tokens)
    return rows


def _drafting(draft):
    """generate's keywords for a drafter, or for none. 4 drafts a round, as
    test_speculative's: the same compiled shapes."""
    return {} if draft is None else dict(draft=draft, draft_tokens=4)


def _new_ids(out):
    return [row[m].tolist() for row, m in zip(out["token_ids"], out["padding_mask"])]


@pytest.mark.once("jax")  # the rules are the host's; the drafted passes run on every
#                           backend in test_speculative
def test_greedy_rules_with_a_stop_id_equal_transformers_plain_drafted_and_streamed(tiny):
    lm, model = tiny
    ids, mask = _prompts()
    inputs = {"token_ids": ids, "padding_mask": mask}
    # The stop id: the first new token of transformers' penalised decoding of row 0 from its
    # 5th on, at index m. With min_new_tokens=m it is allowed exactly there (and, drafted, in
    # the middle of a round that began before m); with m + 1 it is held back.
    free = _transformers_greedy(model, ids, mask, None, repetition_penalty=1.5)[0]
    m = next(i for i in range(4, NEW - 2) if free[i] not in free[:i])
    eos = free[m]
    settings = [(1.5, 0), (1.5, m), (1.5, m + 1), (0.6, 0), (2.5, 3), (None, m)]
    seen, drafted = set(), {"prompt_lookup": 0, "int8": 0}
    for penalty, min_new in settings:
        rules = dict(repetition_penalty=penalty, min_new_tokens=min_new)
        theirs = _transformers_greedy(model, ids, mask, eos, **{
            k: v for k, v in rules.items() if v is not None})
        seen.add(str(theirs))
        if penalty == 1.5:  # the stop id ends row 0 where min_new_tokens lets it
            assert (len(theirs[0]) == m + 1) == (min_new <= m), (min_new, theirs[0])
        for draft in (None, "prompt_lookup", "int8"):
            out = lm.generate(inputs, max_new_tokens=NEW, stop_token_ids=[eos],
                              include_prompt=False, **_drafting(draft), **rules)
            assert _new_ids(out) == theirs, f"{rules}, draft={draft}"
            if draft is not None:
                drafted[draft] += lm.last_speculation.drafted
    assert len(seen) >= len(settings) - 1  # the settings change transformers' ids
    # (A strong penalty leaves prompt lookup nothing to copy; the milder ones do.)
    assert all(drafted.values()), drafted
    # Streamed, with and without drafts: the pieces join to the text of transformers' ids.
    prompt = "the fox and the fox and the"
    tokens = lm.tokenizer.tokenize(prompt, add_bos=True)
    one = np.array([tokens], "int32")
    for penalty, min_new in [(1.5, 4), (0.6, 0)]:
        rules = dict(repetition_penalty=penalty, min_new_tokens=min_new)
        (expected,) = _transformers_greedy(model, one, np.ones_like(one, bool), eos, **rules)
        text = lm.tokenizer.detokenize([t for t in expected if t != eos], skip_special=True)
        for draft in (None, "prompt_lookup"):
            # (prompt lookup's default 8 drafts: the shapes test_speculative streams with)
            pieces = list(lm.generate(prompt, max_new_tokens=NEW, stop_token_ids=[eos],
                                      stream=True, chat_template=False, draft=draft, **rules))
            assert "".join(pieces) == text, (rules, draft)


class _Recording(TopPSampler):
    """A TopPSampler that keeps the distributions it computes while `armed`."""

    armed = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []

    def probs(self, logits):
        probs = super().probs(logits)
        if self.armed:
            self.seen.append(probs)
        return probs


@pytest.fixture
def recorded(monkeypatch):
    """A list that fills with one record per place of every row at which the target model's
    decoding chose a token: plain steps (`Decoding.select`) and drafted rounds
    (`Speculation._sample_row`), not the drafter's own distribution. A record is (the
    context, the new tokens in it, the model's raw logits there, the distribution the token
    was drawn from or a draft accepted against, whether the context ends in drafts of the
    same round that the row had not seen before)."""
    records = []
    select, sample_row = options.Decoding.select, speculative.Speculation._sample_row

    def spy_select(decoding, logits, rows, rng):
        decoding.sampler.armed = True
        try:
            tokens = select(decoding, logits, rows, rng)
        finally:
            decoding.sampler.armed = False
        (probs,) = decoding.sampler.seen
        decoding.sampler.seen.clear()
        records.extend((row.prompt + row.generated, len(row.generated), np.array(logits[r]),
                        probs[r], False) for r, row in enumerate(rows) if not row.done)
        return tokens

    def spy_sample_row(logits, proposed, draft_probs, history, count, decoding, rng):
        decoding.sampler.armed = True
        try:
            kept = sample_row(logits, proposed, draft_probs, history, count, decoding, rng)
        finally:
            decoding.sampler.armed = False
        (probs,) = decoding.sampler.seen
        decoding.sampler.seen.clear()
        records.extend((list(history) + list(proposed[:j]), count + j, np.array(logits[j]),
                        probs[j], bool(set(proposed[:j]) - set(history)))
                       for j in range(len(proposed) + 1))
        return kept

    monkeypatch.setattr(options.Decoding, "select", spy_select)
    monkeypatch.setattr(speculative.Speculation, "_sample_row", staticmethod(spy_sample_row))
    return records


@pytest.mark.once("jax")
def test_sampling_draws_from_transformers_distribution_plain_and_drafted(tiny, recorded):
    import torch

    lm, model = tiny
    ids, mask = _prompts()
    inputs = {"token_ids": ids, "padding_mask": mask}
    eos = _transformers_greedy(model, ids, mask, None)[0][1]  # a likely token as the stop id
    # A low temperature: this checkpoint's logits are close together, and every cut below
    # then removes tokens.
    warpers = dict(temperature=0.05, top_k=60, top_p=0.8, min_p=0.1)
    rules = dict(penalty=0.7, min_new=4)  # < 1: repeats, so prompt lookup finds drafts
    sampler = _Recording(p=warpers["top_p"], k=warpers["top_k"],
                         temperature=warpers["temperature"], min_p=warpers["min_p"])
    places = {}
    for draft in (None, "prompt_lookup", "int8"):
        start = len(recorded)
        lm.generate(inputs, max_new_tokens=NEW, stop_token_ids=[eos], include_prompt=False,
                    sampler=sampler, seed=5, **_drafting(draft),
                    repetition_penalty=rules["penalty"], min_new_tokens=rules["min_new"])
        places[draft] = recorded[start:]
        assert places[draft], draft
        if draft is not None:
            assert lm.last_speculation.drafted > 0, draft
    # Places after drafts new to the row: the penalty must count them there (a context that
    # forgot the round's drafts passed every equality test of the suite).
    assert sum(fresh for *_, fresh in places["int8"]) >= 5
    kept = []
    for draft, records in places.items():
        for context, count, logits, probs, _ in records:
            where = f"draft={draft}, context {context}, {count} new"
            # The logits are the model's for that context (transformers' forward pass) ...
            with torch.no_grad():
                reference = model(torch.tensor([context])).logits[0, -1].numpy()
            np.testing.assert_allclose(logits, reference, atol=1e-4, err_msg=where)
            # ... and the distribution is transformers' processors' on them.
            theirs = _transformers_probs(logits, context, count, [eos], **warpers, **rules)
            np.testing.assert_allclose(probs, theirs, rtol=1e-7, atol=1e-12, err_msg=where)
            kept.append((theirs > 0).sum())
    assert 1 < np.median(kept) < 60  # the cuts cut, and left a choice
