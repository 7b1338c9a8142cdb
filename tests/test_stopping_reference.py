"""Stop ids and stop strings against transformers' own `generate` (its EosTokenCriteria and
StopStringCriteria), greedy in float32 on a tiny checkpoint transformers wrote: every row
stops after the same number of new tokens, and its text is the same up to the stop string
(transformers keeps the stop string, `generate` cuts before it), for a ragged batch, a
stream, prompt-lookup drafting (streamed too) and beam search (stop ids only).

The stop strings are found in the model's own greedy output first, so that they occur
mid-generation, and each spans a token boundary (the token that completes it adds only its
last characters); two of them overlap and are completed by one token. A row that cut its
text right but kept generating fails here: its count of new tokens is more than
transformers'.

Stopping is host-side bookkeeping that every backend shares: it runs in the PyTorch pass,
where nothing compiles for seconds; the compiled greedy loops, which check stop ids on the
device, in the JAX pass."""

import numpy as np
import pytest

import gemma_keras as gk
from gemma_keras.generation import session as session_module

pytestmark = [pytest.mark.once("torch"),  # host-side: the cheapest backend to run it on
              # Prompt lookup finds few drafts in this random model's text, and says so.
              pytest.mark.filterwarnings("ignore::gemma_keras.SpeculationWarning")]

CASE = "gemma2_gqa"  # sliding window 5 < NEW: drafting rolls its ring buffers back
WANDERING = dict(std=0.3, embedding_std=0.01)  # as test_generation: greedy output varies
NEW = 16
# A ragged batch; the last prompt repeats itself, so prompt lookup finds drafts.
PROMPTS = ["The quick brown fox", "Keras is a deep learning API written in",
           "the fox and the fox and the"]


@pytest.fixture(scope="module")
def setup(hflm_checkpoint):
    """(GemmaCausalLM, HF model, HF tokenizer, prompt ids, transformers' unstopped greedy
    continuation of each prompt)."""
    import transformers

    directory, model = hflm_checkpoint(CASE, **WANDERING)
    lm = gk.GemmaCausalLM.from_preset(str(directory), dtype="float32")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    prompts = [lm.tokenizer.tokenize(p, add_bos=True) for p in PROMPTS]
    plain = [_transformers(model, tokenizer, ids) for ids in prompts]
    return lm, model, tokenizer, prompts, plain


def _transformers(model, tokenizer, prompt, stop_ids=(), stop_strings=None, num_beams=1):
    """transformers' greedy (or beam) new tokens for one prompt, its stopping criteria
    ending them: the stop id or the token that completed a stop string is the last."""
    import torch
    import transformers

    # No stop id is [] rather than None, which falls back to the checkpoint's <eos> (beam
    # search needs one: there the <eos>, only to choose a stop id from its beams).
    eos = list(stop_ids) or (None if num_beams > 1 else [])
    config = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=NEW, num_beams=num_beams, pad_token_id=0,
        eos_token_id=eos, length_penalty=1.0, early_stopping=False, stop_strings=stop_strings)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]),
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             generation_config=config,
                             tokenizer=tokenizer if stop_strings else None)
    tokens = out[0, len(prompt):].tolist()
    ends = [i for i, t in enumerate(tokens) if t in stop_ids]
    return tokens[:ends[0] + 1] if ends else tokens  # beam search pads after the stop id


def _reference_text(lm, tokens, stop_ids, stop_strings):
    """transformers' new tokens as text, cut as `generate` cuts it: the stop id left out, the
    text ended before the first stop string. Decoded by SentencePiece (the tokenizer's
    detokenize, compared with SentencePiece by test_tokenizer): transformers' own decode
    writes U+FFFD for every byte piece of a run that is not valid UTF-8, ASCII ones too,
    where SentencePiece keeps the ASCII bytes."""
    if tokens and tokens[-1] in stop_ids:
        tokens = tokens[:-1]
    text = lm.tokenizer.detokenize(tokens, skip_special=True)
    cuts = [text.find(s) for s in stop_strings if s in text]
    return text[:min(cuts)] if cuts else text


def _stop_at(lm, prompt, generated, k, length, into):
    """`length` characters of the greedy text that first appear with token k: the first
    `into` characters of its text and the ones before them, so the string spans a token
    boundary; None where there are no such characters. Printable ASCII and no special
    piece: StopStringCriteria matches the bytes of byte pieces, `generate` the decoded text,
    and ASCII is the same in both."""
    detokenize = lm.tokenizer.detokenize
    before, after = detokenize(generated[:k]), detokenize(generated[:k + 1])
    if (len(before) < length - into or len(after) < len(before) + into
            or not after.startswith(before)):
        return None
    stop = before[len(before) - length + into:] + after[len(before):len(before) + into]
    if (stop.isascii() and stop.isprintable() and not set(stop) & set("<>")
            and stop not in detokenize(prompt[1:] + generated[:k])):
        return stop
    return None


def _spanning_stops(lm, prompt, generated, first, length, intos=(1,)):
    """Stop strings (one per `into`, see `_stop_at`) that the same token, the first at or
    after `first` that has them all, completes."""
    for k in range(first, len(generated) - 2):
        stops = [_stop_at(lm, prompt, generated, k, length, into) for into in intos]
        if all(stops):
            return stops
    raise AssertionError(f"no stop string to test in {lm.tokenizer.detokenize(generated)!r}")


def _stop_id(generated, first):
    """A token of the greedy output at index >= first that does not occur before it."""
    for k in range(first, len(generated) - 2):
        if generated[k] not in generated[:k]:
            return generated[k], k
    raise AssertionError(f"no stop id to test in {generated}")


@pytest.fixture(scope="module")
def rules(setup):
    """Stop ids and strings that end each prompt's row at a different step, and
    transformers' new tokens per prompt under all of them: prompt 0 at two short stop strings,
    prompt 1 at a stop id, prompt 2 at a long stop string late in its greedy text (which
    repeats a token there, so prompt lookup's drafts are kept and the row ends mid-round)."""
    lm, model, tokenizer, prompts, plain = setup
    # Two overlapping strings that one token completes, the later-starting one listed first:
    # the text ends before the one that starts first, whatever their order.
    early, late = _spanning_stops(lm, prompts[0], plain[0], 3, 3, intos=(1, 2))
    stop_id, _ = _stop_id(plain[1], 5)
    (long,) = _spanning_stops(lm, prompts[2], plain[2], 11, 12)
    stop_ids, stop_strings = [stop_id, lm.tokenizer.eos_token_id], [late, early, long]
    want = [_transformers(model, tokenizer, p, stop_ids, stop_strings) for p in prompts]
    counts = [len(w) for w in want]
    # Every row stops early and they stop at different steps (a batch whose rows run on after
    # one finished).
    assert max(counts) < NEW and len(set(counts)) == len(counts), (counts, stop_strings)
    assert any(w[-1] == stop_id for w in want), "no row ended at the stop id"
    assert any(w[-1] not in stop_ids for w in want), "no row ended at a stop string"
    return stop_ids, stop_strings, want


def _as_batch(prompts):
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), "int32")
    mask = np.zeros((len(prompts), width), bool)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = p, True
    return {"token_ids": ids, "padding_mask": mask}


def _new_tokens(out):
    return [row[m].tolist() for row, m in zip(out["token_ids"], out["padding_mask"])]


@pytest.fixture
def recorded(monkeypatch):
    """The rows a generation records tokens for, in order ({id: row}): how many tokens each
    row generated, where generate returns only text (a stream)."""
    rows = {}
    original = session_module.record

    def counting(row, token, stopping):
        rows.setdefault(id(row), row)
        original(row, token, stopping)
    monkeypatch.setattr(session_module, "record", counting)
    return rows


@pytest.mark.parametrize("draft", [None, "prompt_lookup"])
def test_ragged_batch_stops_where_transformers_stops(draft, setup, rules):
    lm, _, tokenizer, prompts, _ = setup
    stop_ids, stop_strings, want = rules
    kw = dict(max_new_tokens=NEW, stop_token_ids=stop_ids, stop_strings=stop_strings,
              include_prompt=False, draft=draft)
    # The ids: the same new tokens, the stop id or the stop string's last token included.
    got = _new_tokens(lm.generate(_as_batch(prompts), **kw))
    assert [len(g) for g in got] == [len(w) for w in want]
    assert got == want
    if draft:  # drafts were kept: rows recorded several tokens a round
        assert lm.last_speculation.accepted > 0
    else:  # the text, transformers' up to the stop string (cut the same way when drafted)
        texts = lm.generate(PROMPTS, chat_template=False, **kw)
        assert texts == [_reference_text(lm, w, stop_ids, stop_strings) for w in want]


@pytest.mark.parametrize("draft", [None, "prompt_lookup"])
def test_stream_stops_where_transformers_stops(draft, setup, rules, recorded):
    lm, model, tokenizer, prompts, plain = setup
    stop_ids, stop_strings, want = rules
    cases = [(r, stop_strings, want[r]) for r in (0, 2)]  # the rows that end at stop strings
    # A stop string whose first character alone ends the text before the token that completes
    # it: the stream must hold back even a 1-character start of a stop string.
    held = _spanning_stops(lm, prompts[0], plain[0], 2, 3, intos=(2,))
    cases.append((0, held, _transformers(model, tokenizer, prompts[0], stop_ids, held)))
    for r, strings, expected in cases:
        recorded.clear()
        pieces = list(lm.generate(PROMPTS[r], max_new_tokens=NEW, stop_token_ids=stop_ids,
                                  stop_strings=strings, chat_template=False, stream=True,
                                  draft=draft))
        (row,) = recorded.values()
        assert len(row.generated) == len(expected), (r, strings, row.generated, expected)
        assert "".join(pieces) == _reference_text(lm, expected, stop_ids, strings), strings
        assert len(expected) < NEW


@pytest.mark.once("jax")  # a backend whose loops compile
@pytest.mark.parametrize("draft", [None, "prompt_lookup"])
def test_stop_ids_alone_stop_where_transformers_stops(draft, setup, rules):
    # Without stop strings greedy rows finish in the compiled loops (plain or drafted), which
    # check the stop ids on the device.
    lm, model, tokenizer, prompts, _ = setup
    stop_ids = rules[0]
    want = [_transformers(model, tokenizer, p, stop_ids) for p in prompts]
    got = _new_tokens(lm.generate(_as_batch(prompts), max_new_tokens=NEW,
                                  stop_token_ids=stop_ids, include_prompt=False, draft=draft))
    assert got == want
    assert any(len(w) < NEW for w in want)


def test_beams_stop_where_transformers_stops(setup):
    lm, model, tokenizer, prompts, _ = setup
    beams = 3
    unstopped = [_transformers(model, tokenizer, p, num_beams=beams) for p in prompts]
    # A stop id from the best beam's middle: it ends hypotheses early.
    stop_ids = [_stop_id(unstopped[0], 4)[0], lm.tokenizer.eos_token_id]
    want = [_transformers(model, tokenizer, p, stop_ids, num_beams=beams) for p in prompts]
    assert any(len(w) < NEW for w in want)
    got = _new_tokens(lm.generate(_as_batch(prompts), max_new_tokens=NEW, num_beams=beams,
                                  length_penalty=1.0, early_stopping=False,
                                  stop_token_ids=stop_ids, include_prompt=False))
    assert got == want
