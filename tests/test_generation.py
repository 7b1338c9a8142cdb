"""Generation: cached decoding against full forward passes and HF transformers' greedy output,
batching, samplers, stop tokens, streaming, and bad input."""

import numpy as np
import pytest

import gemma_keras as gk
from conftest import padded_logits
from gemma_keras import backends
from gemma_keras.generation.session import GenerationSession
from gemma_keras.generation.samplers import Sampler

NEW = 24  # longer than the sliding window (5) of the Gemma 2 case, so the ring buffer wraps
WANDERING = dict(std=0.3, embedding_std=0.01)  # greedy output that does not repeat one token


@pytest.fixture(scope="module")
def _wandering_models(pristine_hf):
    """One model per case for the whole module, so its compiled steps are shared (a fresh
    model per test compiled prefill and decode again for each: most of this module's time)."""
    models = {}

    def get(case):
        if case not in models:
            directory, model = pristine_hf(case, **WANDERING)
            models[case] = gk.GemmaCausalLM.from_preset(directory), model
        return models[case]
    return get


@pytest.fixture
def wandering(_wandering_models):
    """case -> (GemmaCausalLM, HF model) with weights whose greedy decoding varies. Tests may
    flip `lm.instruct` or swap `lm._steps`; both are put back after the test."""
    from gemma_keras.generation.steps import CompiledSteps

    used = []

    def make(case):
        lm, model = _wandering_models(case)
        used.append((lm, lm.instruct))
        return lm, model
    yield make
    for lm, instruct in reversed(used):
        lm.instruct = instruct
        if lm._steps is not None and not isinstance(lm._steps, CompiledSteps):
            lm._steps = None  # a spy left behind by a failed test


class Scripted(Sampler):
    """Emits fixed tokens per row, then falls back to greedy: drives stop/stream tests."""

    def __init__(self, scripts):
        self.scripts, self.step = scripts, 0

    def select(self, logits, rng):
        out = np.argmax(logits, axis=-1)
        for r, script in enumerate(self.scripts):
            if self.step < len(script):
                out[r] = script[self.step]
        self.step += 1
        return out


def _prompt_ids(vocab_size, length, seed=0):
    ids = np.random.RandomState(seed).randint(4, vocab_size, size=(1, length)).astype("int32")
    ids[0, 0] = 2  # <bos>
    return ids


@pytest.mark.parametrize("case", ["gemma_mqa", "gemma2_gqa", "gemma3"])
def test_cached_decode_logits_equal_full_forward(case, wandering, vocab_size):
    lm, _ = wandering(case)
    prompt = _prompt_ids(vocab_size, 7)[0].tolist()
    session = GenerationSession(lm, [prompt], len(prompt) + NEW)
    tokens = list(prompt)
    # The full-forward reference always runs at one length, right-padded: causal attention
    # makes the padding invisible to earlier positions, and one shape is one compilation
    # (a new length per step recompiled the forward pass every step: 101 s on JAX).
    width = len(prompt) + NEW
    for step in range(NEW):
        full = padded_logits(lm, tokens, width)
        np.testing.assert_allclose(session.logits[0], full[-1], atol=1e-4,
                                   err_msg=f"step {step}")
        token = int(np.argmax(session.logits[0]))
        tokens.append(token)
        session.step([token])


@pytest.mark.parametrize("case", ["gemma_mqa", "gemma2_gqa", "gemma3"])
def test_greedy_matches_transformers(case, wandering, vocab_size):
    import torch

    lm, model = wandering(case)
    ids = _prompt_ids(vocab_size, 7)
    ours = lm.generate({"token_ids": ids, "padding_mask": np.ones_like(ids)},
                       max_new_tokens=NEW, stop_token_ids=None)
    with torch.no_grad():
        theirs = model.generate(torch.tensor(ids, dtype=torch.long), max_new_tokens=NEW,
                                do_sample=False, eos_token_id=None, pad_token_id=0).numpy()
    assert len(set(theirs[0, 7:].tolist())) > NEW // 2  # the check is not trivially passed
    np.testing.assert_array_equal(ours["token_ids"], theirs)
    assert ours["padding_mask"].all()


@pytest.mark.parametrize("case", ["gemma2_gqa", "gemma3"])
def test_greedy_from_a_ragged_batch_matches_transformers(case, wandering, vocab_size):
    """Left-padded rows of different lengths, in one batch, against transformers' generate
    on the same batch: positions count real tokens, and the sliding window (5) is passed."""
    import torch

    lm, model = wandering(case)
    ids = np.concatenate([_prompt_ids(vocab_size, 9, seed=1), _prompt_ids(vocab_size, 9)])
    mask = np.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0  # row 0: 5 real tokens after 4 pads
    ours = lm.generate({"token_ids": ids, "padding_mask": mask}, max_new_tokens=NEW,
                       stop_token_ids=None)
    with torch.no_grad():
        theirs = model.generate(torch.tensor(ids, dtype=torch.long),
                                attention_mask=torch.tensor(mask, dtype=torch.long),
                                max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                                pad_token_id=0).numpy()
    assert all(len(set(row[9:].tolist())) > NEW // 2 for row in theirs)  # not trivial
    # Ours come back with each row's padding moved to its end; theirs keep it in front.
    real = np.concatenate([mask, np.ones((2, NEW), mask.dtype)], axis=1).astype(bool)
    for r in range(2):
        assert (ours["token_ids"][r][ours["padding_mask"][r].astype(bool)].tolist()
                == theirs[r][real[r]].tolist())


def test_ragged_batch_equals_one_by_one(wandering):
    lm, _ = wandering("gemma2_gqa")
    prompts = ["The quick brown fox", "Keras", "Gemma models are lightweight open models 12"]
    batch = lm.generate(prompts, max_new_tokens=12, stop_token_ids=None)
    alone = [lm.generate(p, max_new_tokens=12, stop_token_ids=None) for p in prompts]
    assert batch == alone
    for prompt, text in zip(prompts, batch):
        assert text.startswith(prompt) and len(text) > len(prompt)


def test_seeded_sampling_reproduces(wandering):
    lm, _ = wandering("gemma_mqa")
    for sampler in ("random", gk.samplers.TopKSampler(k=5), gk.samplers.TopPSampler(p=0.9)):
        a = lm.generate("The fox", max_new_tokens=10, sampler=sampler, seed=3,
                        stop_token_ids=None)
        b = lm.generate("The fox", max_new_tokens=10, sampler=sampler, seed=3,
                        stop_token_ids=None)
        assert a == b
    samples = {lm.generate("The fox", max_new_tokens=10, sampler="random", seed=s,
                           stop_token_ids=None) for s in range(4)}
    assert len(samples) > 1  # seeds matter


def test_degenerate_samplers_equal_greedy(wandering):
    lm, _ = wandering("gemma_mqa")
    greedy = lm.generate("The fox", max_new_tokens=10, stop_token_ids=None)
    for sampler in (gk.samplers.TopKSampler(k=1), gk.samplers.TopPSampler(p=1e-6)):
        assert lm.generate("The fox", max_new_tokens=10, sampler=sampler, seed=0,
                           stop_token_ids=None) == greedy


class HostGreedy(Sampler):
    """Greedy, but not `GreedySampler`: takes the host loop that samplers use."""

    def select(self, logits, rng):
        return np.argmax(logits, axis=-1)


@pytest.mark.skipif(not backends.get().loops_compile, reason="this backend decodes greedy on the host "
                    "loop too (no compiled loop to compare)")
@pytest.mark.parametrize("case", ["gemma_mqa", "gemma2_gqa"])
def test_compiled_greedy_loop_equals_the_host_loop(case, wandering):
    # On JAX and TensorFlow greedy decoding runs as one compiled loop; it must stop each
    # row where the host loop does, ragged prompts included.
    lm, _ = wandering(case)
    prompts = {"token_ids": np.array([[0, 0, 2, 9, 14], [2, 31, 7, 22, 40]], "int32"),
               "padding_mask": np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)}
    free = lm.generate(prompts, max_new_tokens=NEW, sampler=HostGreedy(), stop_token_ids=None)
    row0 = free["token_ids"][0, 3:][free["padding_mask"][0, 3:]]
    row1 = free["token_ids"][1, 5:]
    # Stop row 0 at its 4th new token and row 1 at its 9th (if not stopped earlier).
    stops = [int(row0[3]), int(row1[8])]
    for kwargs in (dict(max_new_tokens=NEW, stop_token_ids=stops),
                   dict(max_new_tokens=NEW, stop_token_ids=None),
                   dict(max_new_tokens=1, stop_token_ids=stops)):
        host = lm.generate(prompts, sampler=HostGreedy(), **kwargs)
        loop = lm.generate(prompts, sampler="greedy", **kwargs)
        np.testing.assert_array_equal(loop["token_ids"], host["token_ids"])
        np.testing.assert_array_equal(loop["padding_mask"], host["padding_mask"])
    lengths = lm.generate(prompts, max_new_tokens=NEW, stop_token_ids=stops)["padding_mask"]
    assert lengths.sum(axis=1).tolist()[0] <= 3 + 4 and lengths.sum() < 3 + 5 + 2 * NEW


def test_top_k_and_top_p_filters():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    assert np.isfinite(gk.samplers.TopKSampler(k=2).filter(logits)).sum() == 2
    kept = np.isfinite(gk.samplers.TopPSampler(p=0.75).filter(logits))
    assert kept.tolist() == [[True, True, False, False]]


def test_each_row_stops_on_its_own(wandering):
    lm, _ = wandering("gemma_mqa")
    eos = lm.tokenizer.eos_token_id
    prompts = ["The fox", "A dog"]
    sampler = Scripted([[7, eos], [7, 8, 9]])
    out = lm.generate(prompts, max_new_tokens=6, sampler=sampler)
    ids = lm.generate({"token_ids": np.array([[2, 5], [2, 6]]),
                       "padding_mask": np.ones((2, 2))},
                      max_new_tokens=6, sampler=Scripted([[7, eos], [7, 8, 9]]))
    assert ids["token_ids"][0, 2:4].tolist() == [7, eos]
    assert ids["padding_mask"][0].sum() == 4 and ids["padding_mask"][1].sum() == 8
    assert out[0] == prompts[0] + lm.tokenizer.detokenize([7])  # eos not in the text


def test_end_of_turn_stops_unless_base_model(wandering):
    lm, _ = wandering("gemma_mqa")
    eot = lm.tokenizer.end_of_turn_id
    lm.instruct = True
    assert lm.generate("Hi", max_new_tokens=5, sampler=Scripted([[7, eot, 8]])) == \
        "Hi" + lm.tokenizer.detokenize([7])
    lm.instruct = False
    text = lm.generate("Hi", max_new_tokens=3, sampler=Scripted([[7, eot, 8]]))
    # Generated, not a stop: in the ids, but as a special piece never in the text.
    assert text == "Hi" + lm.tokenizer.detokenize([7, eot, 8], skip_special=True)


def test_stop_strings(wandering):
    lm, _ = wandering("gemma_mqa")
    fox = lm.tokenizer.tokenize(" fox jumps")
    text = lm.generate("The", max_new_tokens=8, sampler=Scripted([fox]), stop_strings=["jump"],
                       stop_token_ids=None)
    assert text == "The fox "


def test_stream_concatenates_to_the_text(wandering):
    lm, _ = wandering("gemma2_gqa")
    whole = lm.generate("The quick brown", max_new_tokens=NEW, stop_token_ids=None)
    pieces = list(lm.generate("The quick brown", max_new_tokens=NEW, stop_token_ids=None,
                              stream=True))
    assert len(pieces) > 1
    assert "The quick brown" + "".join(pieces) == whole


def test_stream_never_splits_a_character(wandering):
    lm, _ = wandering("gemma_mqa")
    fox = lm.tokenizer.tokenize("🦊 é🦊")
    assert len(fox) > 4  # byte-fallback pieces
    pieces = list(lm.generate("A", max_new_tokens=len(fox), sampler=Scripted([fox]),
                              stop_token_ids=None, stream=True))
    assert "".join(pieces) == "🦊 é🦊"
    assert all("\ufffd" not in p for p in pieces), pieces


def test_empty_prompt_is_just_bos(wandering):
    lm, _ = wandering("gemma_mqa")
    text = lm.generate("", max_new_tokens=4, stop_token_ids=None)
    ids = lm.generate({"token_ids": np.array([[2]]), "padding_mask": np.array([[1]])},
                      max_new_tokens=4, stop_token_ids=None)
    assert text == lm.tokenizer.detokenize(ids["token_ids"][0, 1:])


@pytest.mark.parametrize("kwargs,message", [
    (dict(inputs=[]), "empty batch"),
    (dict(inputs="x", max_length=2), "max_length=2 leaves no room"),
    (dict(inputs="x", max_length=9, max_new_tokens=3), "not both"),
    (dict(inputs="x", max_new_tokens=0), "at least 1"),
    (dict(inputs=["a", "b"], stream=True), "one string prompt"),
    (dict(inputs="x", sampler="nucleus"), "Unknown sampler"),
    (dict(inputs={"token_ids": np.array([[2, 5]]), "padding_mask": np.array([[0, 0]])}),
     "no tokens"),
])
def test_bad_generate_arguments(kwargs, message, wandering):
    lm, _ = wandering("gemma_mqa")
    with pytest.raises(ValueError, match=message):
        lm.generate(**kwargs)


def test_prompt_longer_than_context(wandering):
    lm, _ = wandering("gemma_mqa")
    small = gk.GemmaCausalLM(gk.GemmaBackbone(lm.config.replace(max_sequence_length=32)),
                             lm.tokenizer)
    with pytest.raises(ValueError, match="more than the model's context of 32"):
        small.generate("fox " * 40)
    with pytest.raises(ValueError, match="exceed the model's context of 32"):
        small.generate("fox " * 5, max_new_tokens=30)


@pytest.mark.parametrize("case", ["gemma_mqa", "gemma2_gqa", "gemma3"])
def test_chat_reuses_the_cache_and_equals_a_fresh_generation(case, wandering):
    from gemma_keras.generation.chat import format_chat

    lm, _ = wandering(case)
    lm.instruct = True
    chat = lm.chat(system="Be brief.")
    prefills = []
    from gemma_keras.layers.kv_cache import Mode

    steps = lm.compiled_steps()
    original = steps.__call__

    class Spy:
        def __call__(self, mode, *args):
            prefills.append(mode) if mode is Mode.PREFILL else None
            return original(mode, *args)
    lm._steps = Spy()
    chat.send("The quick brown fox", max_new_tokens=10)
    chat.send("jumps over the lazy dog", max_new_tokens=10)
    third = "".join(chat.send("Gemma models", max_new_tokens=10, stream=True))
    assert prefills == [Mode.PREFILL]  # later turns extend the cache
    assert [r for r, _ in chat.history] == ["user", "model"] * 3
    assert chat.history[-1] == ("model", third)

    # The conversation is in Gemma's format, and generating the last reply from scratch, with
    # the whole conversation as one prompt, gives the same tokens.
    lm._steps = steps
    tokens, reply = chat.token_ids, chat.last_reply_ids
    prompt = tokens[: len(tokens) - len(reply)]
    expected = lm.tokenizer.tokenize(format_chat([("user", "Be brief.\n\nThe quick brown fox")]),
                                     add_bos=True)
    assert prompt[: len(expected)] == expected
    assert lm.tokenizer.detokenize(prompt).endswith(
        "<end_of_turn>\n<start_of_turn>user\nGemma models<end_of_turn>\n<start_of_turn>model\n")
    fresh = lm.generate({"token_ids": np.array([prompt]),
                         "padding_mask": np.ones((1, len(prompt)))}, max_new_tokens=10)
    assert fresh["token_ids"][0, len(prompt):].tolist()[: len(reply)] == reply


def test_chat_grows_past_its_first_cache(wandering):
    lm, _ = wandering("gemma2_gqa")
    chat = lm.chat()
    for i in range(3):
        chat.send("fox " * 60, max_new_tokens=40)
    assert len(chat.history) == 6
    assert chat._session.capacity >= len(chat._tokens)


def test_stream_holds_back_a_stop_string_until_it_is_decided(wandering):
    # "jumps ov" spans two pieces; a stream must not yield the first ("jumps") and then
    # stop: the pieces join to exactly the non-streamed completion.
    lm, _ = wandering("gemma_mqa")
    fox = lm.tokenizer.tokenize(" fox jumps over")
    assert len(fox) >= 3
    kw = dict(max_new_tokens=8, stop_strings=["jumps ov"], stop_token_ids=None)
    whole = lm.generate("The", sampler=Scripted([fox]), **kw)
    pieces = list(lm.generate("The", sampler=Scripted([fox]), stream=True, **kw))
    assert "The" + "".join(pieces) == whole == "The fox "


@pytest.mark.once("torch")
def test_incremental_text_equals_the_whole_decode_and_reads_each_id_a_few_times(spm_path):
    from gemma_keras.generation.stopping import IncrementalText
    from gemma_keras.tokenizer import GemmaTokenizer

    tokenizer = GemmaTokenizer(spm_path)
    read = []

    def detokenize(ids):
        read.append(len(ids))
        return tokenizer.detokenize(ids)
    ids = tokenizer.tokenize("🦊 é🦊 The quick brown fox 42 jumps<end_of_turn>\n over 7 dogs. ")
    ids += [int(i) for i in np.random.RandomState(0).randint(0, tokenizer.vocabulary_size, 200)]
    ids += tokenizer.tokenize(" the end")  # whole characters last
    text = IncrementalText(detokenize)
    for i, token in enumerate(ids):
        text.add([token])
        so_far = tokenizer.detokenize(ids[: i + 1])
        assert so_far.startswith(text.text) and "\ufffd" not in text.text[-1:]
    assert text.text == tokenizer.detokenize(ids)
    # Each call decodes the ids since the last clean boundary: linear in the length, where
    # decoding the whole text after every id would read len(ids)**2 / 2.
    assert sum(read) < 10 * len(ids)
