"""Speculative decoding: drafted and verified greedy output equals transformers' greedy
output and our plain greedy output on HF-written checkpoints (Gemma 1, and Gemma 2 with a
sliding window shorter than the generation, so rings roll back), for every drafter, ragged
batches whose rows keep different numbers of drafts, streams and chats; sampled output has
the target's distribution (a chi-square test against the exact distribution)."""

import warnings

import keras
import numpy as np
import pytest

import gemma_keras as gk
from conftest import hf_model

NEW = 20  # longer than the Gemma 2 case's sliding window (5): its rings wrap and roll back
WANDERING = dict(std=0.3, embedding_std=0.01)  # as test_generation: greedy output varies


@pytest.fixture(scope="module")
def models(pristine_hf, tmp_path_factory, vocab_size):
    """case -> (target GemmaCausalLM, HF model, draft GemmaCausalLM): the draft is the
    target truncated to its first layer (a cheap drafter that agrees only sometimes), written
    by transformers. One per module, so compiled functions are shared."""
    import shutil

    import torch
    import transformers

    built = {}

    def get(case):
        if case not in built:
            directory, model = pristine_hf(case, **WANDERING)
            config = model.config.to_dict()
            # The draft: the target's first layers. One is enough for the 3-layer cases; of
            # the 6-layer Gemma 3 one layer agrees with the target on 3% of greedy tokens
            # (no draft ever accepted), its 5 local layers on 48%.
            keep = 5 if case == "gemma3" else 1
            config["num_hidden_layers"] = keep
            if config.get("layer_types"):  # Gemma 2 and 3: one entry per layer
                config["layer_types"] = config["layer_types"][:keep]
            small = type(model)(type(model.config).from_dict(config)).eval()
            with torch.no_grad():
                small.load_state_dict(model.state_dict(), strict=False)  # layers 1.. dropped
            draft_dir = tmp_path_factory.mktemp(f"draft_{case}")
            small.save_pretrained(draft_dir)
            shutil.copy(directory / "tokenizer.model", draft_dir / "tokenizer.model")
            assert isinstance(small, transformers.PreTrainedModel)
            built[case] = (gk.GemmaCausalLM.from_preset(directory), model,
                           gk.GemmaCausalLM.from_preset(draft_dir))
        return built[case]
    return get


def _ragged_prompts(vocab_size):
    """Three prompts of different lengths; the last repeats itself, so prompt lookup finds
    drafts, some of them right."""
    rng = np.random.RandomState(0)
    rows = [[2] + rng.randint(4, vocab_size, size=n).tolist() for n in (6, 11)]
    phrase = rng.randint(4, vocab_size, size=5).tolist()
    rows.append([2] + phrase * 3)
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), "int32")
    mask = np.zeros((len(rows), width), bool)
    for r, row in enumerate(rows):  # left-padded, as transformers wants for generation
        ids[r, width - len(row):] = row
        mask[r, width - len(row):] = True
    return ids, mask


def _transformers_greedy(model, ids, mask):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor(ids, dtype=torch.long),
                             attention_mask=torch.tensor(mask, dtype=torch.long),
                             max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                             pad_token_id=0).numpy()
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("case", ["gemma_mqa", "gemma2_gqa", "gemma3"])
def test_speculative_greedy_equals_transformers_and_plain_greedy(case, models, vocab_size):
    lm, model, small = models(case)
    ids, mask = _ragged_prompts(vocab_size)
    reference = _transformers_greedy(model, ids, mask)  # [rows, NEW]
    assert len(set(reference[0].tolist())) > NEW // 3  # not one repeated token
    inputs = {"token_ids": ids, "padding_mask": mask}
    plain = lm.generate(inputs, max_new_tokens=NEW, stop_token_ids=None, include_prompt=False)
    np.testing.assert_array_equal(plain["token_ids"], reference)
    # One k for all: each backend compiles one verify pass (its traces are slow on torch).
    # The int4 self-draft is a second copy of the model to compile: the ring case only.
    drafts = ("prompt_lookup", small) + (("int4",) if case == "gemma2_gqa" else ())
    for draft in drafts:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", gk.SpeculationWarning)
            out = lm.generate(inputs, max_new_tokens=NEW, stop_token_ids=None,
                              include_prompt=False, draft=draft, draft_tokens=4)
        stats = lm.last_speculation
        # XLA on CPU widens int4 weights before each product (an int4 draft cannot pay
        # there, and says so, pointing at the caller); ATen's int4 product reads them narrow.
        widened = [w for w in caught if "widened" in str(w.message)]
        assert len(widened) == (draft == "int4" and keras.backend.backend() != "torch")
        assert all(w.filename == __file__ for w in widened)
        np.testing.assert_array_equal(out["token_ids"], reference, err_msg=f"draft={draft}")
        assert out["padding_mask"].all()
        # Drafts were rejected, so caches (rings included) rolled back; the models' drafts
        # were kept too (these random weights never copy, so prompt lookup's are not).
        assert stats.accepted < stats.drafted, (draft, stats)
        assert stats.accepted > 0 or draft == "prompt_lookup", (draft, stats)
        assert stats.tokens == 3 * (NEW - 1)


# The tests below exercise host-side bookkeeping over the compiled passes the tests above
# run on every backend: one pass is enough.
@pytest.mark.once("jax")
def test_rows_keep_different_numbers_of_drafts_and_stop_on_their_own(models, vocab_size):
    lm, _, small = models("gemma2_gqa")
    ids, mask = _ragged_prompts(vocab_size)
    inputs = {"token_ids": ids, "padding_mask": mask}
    free = lm.generate(inputs, max_new_tokens=NEW, stop_token_ids=None, include_prompt=False)
    # Stop row 0 at its 5th token and row 2 at its 12th: rows end inside a round.
    stops = [int(free["token_ids"][0, 4]), int(free["token_ids"][2, 11])]
    plain = lm.generate(inputs, max_new_tokens=NEW, stop_token_ids=stops)
    for draft in ("prompt_lookup", small):
        out = lm.generate(inputs, max_new_tokens=NEW, stop_token_ids=stops, draft=draft,
                          draft_tokens=4)
        np.testing.assert_array_equal(out["token_ids"], plain["token_ids"])
        np.testing.assert_array_equal(out["padding_mask"], plain["padding_mask"])
    assert plain["padding_mask"].sum(axis=1)[0] <= ids.shape[1] + 5


@pytest.mark.once("jax")
def test_stream_chat_and_stop_strings_with_drafts(models):
    lm, _, small = models("gemma2_gqa")
    prompt = "the fox and the fox and the"
    whole = lm.generate(prompt, max_new_tokens=NEW, stop_token_ids=None)
    pieces = list(lm.generate(prompt, max_new_tokens=NEW, stop_token_ids=None, stream=True,
                              draft="prompt_lookup"))
    assert "".join(pieces) == whole[len(prompt):] and len(pieces) > 1
    stop = whole[len(prompt):][3:6]
    assert lm.generate(prompt, max_new_tokens=NEW, stop_token_ids=None, stop_strings=[stop],
                       draft=small) == lm.generate(prompt, max_new_tokens=NEW,
                                                   stop_token_ids=None, stop_strings=[stop])
    # A chat keeps its cache between turns; drafted replies leave it as plain ones do.
    turns = ["hello there", "and the fox", "again"]
    plain, drafted = lm.chat(), lm.chat(draft=small, draft_tokens=3)
    for message in turns:
        assert drafted.send(message, max_new_tokens=12) == plain.send(message,
                                                                       max_new_tokens=12)
    assert drafted.token_ids == plain.token_ids


def _exact_joint(lm, prompt, k, temperature, steps):
    """The target's exact distribution over the first `steps` sampled tokens under
    top-k sampling: {token tuple: probability}, from full forward passes."""
    import keras

    from gemma_keras.generation.samplers import TopKSampler

    sampler = TopKSampler(k=k, temperature=temperature)
    joint = {(): 1.0}
    for step in range(steps):
        prefixes = list(joint)
        # One compiled shape for every step: k ** (steps - 1) rows, right-padded.
        ids = np.zeros((k ** (steps - 1), len(prompt) + steps), "int32")
        for i, p in enumerate(prefixes):
            ids[i, :len(prompt) + step] = prompt + list(p)
        mask = np.arange(ids.shape[1]) < len(prompt) + step
        logits = keras.ops.convert_to_numpy(lm.score(ids, np.broadcast_to(mask, ids.shape)))
        last = np.asarray(logits[:len(prefixes), len(prompt) + step - 1], "float32")
        probs = sampler.probs(last)
        joint = {p + (t,): joint[p] * probs[i, t] for i, p in enumerate(prefixes)
                 for t in np.flatnonzero(probs[i] > 0)}
    return joint


@pytest.mark.parametrize("drafter", [
    "model",  # the verify pass's logits and the drafter's sampled steps: every backend
    pytest.param("prompt_lookup", marks=pytest.mark.once("jax"))])  # host-side q = one-hot
def test_speculative_sampling_has_the_target_distribution(drafter, models):
    from scipy import stats

    lm, _, small = models("gemma_mqa")
    # The prompt holds every token the first draws can take, so prompt lookup finds drafts.
    start = [2, 5, 6, 7]
    prompt = start + sorted({t for cell in _exact_joint(lm, start, 3, 2.0, 2) for t in cell})
    exact = _exact_joint(lm, prompt, k=3, temperature=2.0, steps=3)
    rows, calls = 256, 4
    counts = {}
    for seed in range(calls):
        out = lm.generate({"token_ids": np.array([prompt] * rows, "int32"),
                           "padding_mask": np.ones((rows, len(prompt)), bool)},
                          max_new_tokens=3, stop_token_ids=None, include_prompt=False,
                          sampler="top_k", top_k=3, temperature=2.0, seed=seed,
                          draft=small if drafter == "model" else "prompt_lookup",
                          draft_tokens=2)
        for row in out["token_ids"]:
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
        assert lm.last_speculation.drafted > 0
    assert set(counts) <= set(exact)
    cells = sorted(exact)
    n = rows * calls
    observed = np.array([counts.get(c, 0) for c in cells])
    expected = np.array([exact[c] for c in cells]) * n
    # Cells expected fewer than 5 times are pooled, as the test requires.
    small_cells = expected < 5
    if small_cells.any():
        observed = np.append(observed[~small_cells], observed[small_cells].sum())
        expected = np.append(expected[~small_cells], expected[small_cells].sum())
    p_value = stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue
    assert p_value > 1e-3, (p_value, observed, expected)


@pytest.mark.once("jax")
def test_bad_draft_arguments(models):
    lm, _, _ = models("gemma_mqa")
    with pytest.raises(gk.InvalidArgumentError, match="draft_tokens= needs draft="):
        lm.generate("a", max_new_tokens=2, draft_tokens=3)
    with pytest.raises(gk.InvalidArgumentError, match="draft_tokens must be at least 1"):
        lm.generate("a", max_new_tokens=2, draft="prompt_lookup", draft_tokens=0)
    with pytest.raises(gk.InvalidArgumentError, match="the model itself"):
        lm.generate("a", max_new_tokens=2, draft=lm)
    with pytest.raises(gk.ArgumentTypeError, match="draft must be"):
        lm.generate("a", max_new_tokens=2, draft=3)


@pytest.mark.once("jax")
def test_a_draft_must_share_the_tokenizer(models, vocab_size, tmp_path, spm_path):
    import shutil

    lm, _, _ = models("gemma_mqa")
    other = hf_model("gemma_mqa", vocab_size + 8)
    other.save_pretrained(tmp_path)
    shutil.copy(spm_path, tmp_path / "tokenizer.model")
    with pytest.raises(gk.ConfigError, match="share the target's tokenizer"):
        lm.generate("a", max_new_tokens=2, draft=str(tmp_path))


@pytest.mark.once("jax")
def test_cli_draft_flags(capsys, monkeypatch):
    from gemma_keras import cli

    lm = gk.GemmaCausalLM.from_preset("gemma_demo")
    prompt = "import os\nimport sys\nimport os\n"
    expected = lm.generate(prompt, max_new_tokens=12)
    assert not cli.main(["generate", "--draft", "prompt_lookup", "--draft-tokens", "4",
                         "--max-new-tokens", "12", prompt])
    assert capsys.readouterr().out == expected + "\n"
    # A draft that cannot work is one line on stderr and exit status 2.
    assert cli.main(["generate", "--draft", "prompt_lookup", "--draft-tokens", "99",
                     "--max-new-tokens", "4", prompt]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "draft_tokens=99" in err
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("import os\n"))
    assert not cli.main(["chat", "--draft", "int4", "--max-new-tokens", "8"])
    assert capsys.readouterr().out.strip()


@pytest.mark.once("jax")
def test_a_warning_says_when_drafts_do_not_pay(models, vocab_size):
    lm, _, _ = models("gemma_mqa")
    ids, mask = _ragged_prompts(vocab_size)  # random weights never copy the prompt
    inputs = {"token_ids": ids, "padding_mask": mask}
    with pytest.warns(gk.SpeculationWarning, match="drafts"):
        lm.generate(inputs, max_new_tokens=NEW, stop_token_ids=None, draft="prompt_lookup",
                    draft_tokens=4)
    assert lm.last_speculation.tokens_per_round < 1.5
    with warnings.catch_warnings():
        warnings.simplefilter("error", gk.SpeculationWarning)  # too short to judge: quiet
        lm.generate(inputs, max_new_tokens=4, stop_token_ids=None, draft="prompt_lookup",
                    draft_tokens=4)


# (draft=, what the message must suggest): a kind spelled another way gives the kind; a name
# near a preset gives the preset; anything else names the kinds alone.
WRONG_DRAFTS = [("prompt-lookup", "draft='prompt_lookup'"),
                ("PromptLookup", "draft='prompt_lookup'"), ("INT4", "draft='int4'"),
                ("int-8", "draft='int8'"), ("gema_demo", "Did you mean: gemma_demo"),
                ("foo", None)]


@pytest.mark.once("jax")
def test_the_drafters_named_in_messages_are_the_drafters():
    from gemma_keras.checkpoints.resolve import DRAFT_KINDS
    from gemma_keras.generation.drafting import SELF_DRAFT_MODES

    assert set(DRAFT_KINDS) == {"prompt_lookup", *SELF_DRAFT_MODES}


@pytest.mark.once("jax")
@pytest.mark.parametrize("draft, suggestion", WRONG_DRAFTS)
def test_a_wrong_draft_names_the_drafters(draft, suggestion, models, capsys, monkeypatch):
    from gemma_keras import cli

    lm, _, _ = models("gemma_mqa")
    for call in (lambda: lm.generate("a", max_new_tokens=2, draft=draft),
                 lambda: lm.chat(draft=draft)):
        with pytest.raises(gk.UnknownPresetError) as info:
            call()
        message = str(info.value)
        for kind in ("'prompt_lookup'", "'int4'", "'int8'", "preset"):
            assert kind in message, message
        if suggestion is None:
            assert "Did you mean" not in message, message
        else:
            assert suggestion in message, message
    # The command line: the same message, one line, exit status 2, before any model loads.
    def no_load(args):
        raise AssertionError("a wrong --draft is reported before the model loads")

    monkeypatch.setattr(cli, "_load", no_load)
    capsys.readouterr()  # the fixture's own output
    assert cli.main(["generate", "--draft", draft, "a"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'prompt_lookup'" in err and (suggestion or "") in err
    assert "`gemma-keras presets`" in err, err


@pytest.mark.once("jax")
def test_no_warning_judges_drafts_that_were_never_proposed():
    from gemma_keras.generation.drafting import PromptLookupDrafter
    from gemma_keras.generation.speculative import MIN_ROUNDS_TO_JUDGE, Speculation, Stats

    rounds = MIN_ROUNDS_TO_JUDGE * 2
    speculation = Speculation(PromptLookupDrafter(), 8)
    # Prompt lookup that found nothing to copy: every pass was plain decoding's one token.
    speculation.stats = Stats("prompt_lookup", 8, rounds=rounds, row_rounds=rounds,
                              tokens=rounds)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gk.SpeculationWarning)
        speculation._warn_if_it_did_not_pay()
    # A few drafts, all kept, still too few per pass: the warning says how many were
    # proposed and kept, not that the model rejected them.
    speculation.stats = Stats("prompt_lookup", 8, rounds=rounds, row_rounds=rounds,
                              drafted=3, accepted=3, tokens=rounds + 3)
    with pytest.warns(gk.SpeculationWarning) as record:
        speculation._warn_if_it_did_not_pay()
    message = str(record[0].message)
    assert f"proposed 3 drafts over {rounds} passes" in message and "kept 3" in message
