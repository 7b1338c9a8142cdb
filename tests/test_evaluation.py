"""Scoring against the references, on checkpoints they write at test time: `score` against
keras-hub's `score` and transformers' logits; `loglikelihood` / `loglikelihood_rolling`
against lm-evaluation-harness' own Hugging Face model (HFLM) on the same checkpoint."""

import keras
import numpy as np
import pytest

import gemma_keras as gk
from conftest import hf_logits, max_diff_on_real_tokens, token_batch

TOL = 1e-4


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")))


# ---- score -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["gemma_mqa", "gemma2_gqa"])
def test_score_equals_keras_hub_score_and_transformers(case, keras_hub_preset, hf_checkpoint,
                                                       vocab_size):
    directory, reference = keras_hub_preset(case)
    lm = gk.GemmaCausalLM.from_preset(directory, dtype="float32")
    ids, mask = token_batch(vocab_size)  # row 1 right-padded
    targets = np.roll(ids, -1, axis=1)
    for mode in ("logits", "loss"):
        kwargs = dict(padding_mask=mask, scoring_mode=mode,
                      target_ids=targets if mode == "loss" else None)
        ours = _numpy(lm.score(ids, **kwargs))
        theirs = _numpy(reference.score(ids, **kwargs))
        assert ours.shape == theirs.shape == ((2, ids.shape[1], vocab_size) if mode == "logits"
                                              else (2, ids.shape[1]))
        assert max_diff_on_real_tokens(ours, theirs, mask) < TOL, mode
    # And transformers' logits on its own checkpoint (soft-capped for Gemma 2).
    hf_directory, model = hf_checkpoint(case)
    lm = gk.GemmaCausalLM.from_preset(hf_directory, dtype="float32")
    assert max_diff_on_real_tokens(_numpy(lm.score(ids, mask)), hf_logits(model, ids, mask),
                                   mask) < TOL
    # Loss mode is the cross-entropy of the logits mode, position by position.
    logits = _numpy(lm.score(ids, mask)).astype("float64")
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    expected = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    losses = _numpy(lm.score(ids, mask, scoring_mode="loss", target_ids=targets))
    assert max_diff_on_real_tokens(losses, expected, mask) < TOL


def test_score_and_loglikelihood_on_gemma3_equal_transformers(hf_checkpoint, vocab_size):
    """keras-hub's Gemma3CausalLM has no score(): transformers is the reference. Logits and
    per-token losses of a Gemma 3 (QK-norm, 5:1 layers, RoPE per kind) against its own."""
    import torch

    directory, model = hf_checkpoint("gemma3")
    lm = gk.GemmaCausalLM.from_preset(directory, dtype="float32")
    ids, mask = token_batch(vocab_size)
    targets = np.roll(ids, -1, axis=1)
    theirs = hf_logits(model, ids, mask)
    assert max_diff_on_real_tokens(_numpy(lm.score(ids, mask)), theirs, mask) < TOL
    expected = torch.nn.functional.cross_entropy(
        torch.tensor(theirs).permute(0, 2, 1), torch.tensor(targets, dtype=torch.long),
        reduction="none").numpy()
    losses = _numpy(lm.score(ids, mask, scoring_mode="loss", target_ids=targets))
    assert max_diff_on_real_tokens(losses, expected, mask) < TOL


def test_score_hook_sees_what_keras_hub_shows_and_steers_the_model(keras_hub_preset, vocab_size):
    directory, reference = keras_hub_preset("gemma_mqa")
    lm = gk.GemmaCausalLM.from_preset(directory, dtype="float32")
    ids = token_batch(vocab_size)[0][:1]

    def recorder(seen):
        def hook(x, i):
            seen[i] = _numpy(x)
            return x
        return hook
    ours, theirs = {}, {}
    plain = _numpy(lm.score(ids))
    hooked = _numpy(lm.score(ids, layer_intercept_fn=recorder(ours)))
    reference.score(ids, layer_intercept_fn=recorder(theirs))
    assert sorted(ours) == sorted(theirs) == list(range(-1, lm.config.num_layers))
    for i in ours:  # the embeddings (before the scale) and every block's output
        assert np.abs(ours[i] - theirs[i]).max() < TOL, i
    assert np.abs(hooked - plain).max() < TOL  # eager with a hook == compiled without
    # What the hook returns is what the model continues with.
    last = lm.config.num_layers - 1
    zeroed = _numpy(lm.score(ids, layer_intercept_fn=lambda x, i: x * 0 if i == last else x))
    assert np.abs(zeroed - zeroed[:, :1]).max() < TOL  # every position now sees the same input
    assert np.abs(zeroed - plain).max() > 0.1


def test_score_refuses_bad_arguments(keras_hub_preset, vocab_size):
    lm = gk.GemmaCausalLM.from_preset(keras_hub_preset("gemma_mqa")[0])
    ids, mask = token_batch(vocab_size)
    with pytest.raises(gk.InvalidArgumentError, match="scoring_mode"):
        lm.score(ids, scoring_mode="probs")
    with pytest.raises(gk.InvalidArgumentError, match="target_ids"):
        lm.score(ids, scoring_mode="loss")
    with pytest.raises(gk.InvalidArgumentError, match="padding_mask"):
        lm.score(ids, padding_mask=mask[:, :3])
    with pytest.raises(ValueError):  # keras-hub callers catch ValueError
        lm.score(ids[0])


# ---- log-likelihoods against lm-eval's HFLM --------------------------------------------------
def _hflm(directory, max_length=None, batch_size=3):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(directory), device="cpu", dtype="float32", batch_size=batch_size,
                max_length=max_length)


def _instances(kind, arguments):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i)
            for i, a in enumerate(arguments)]


REQUESTS = [
    ("The quick brown fox", " jumps over the lazy dog"),
    ("The quick brown fox ", "jumps"),          # trailing space moves to the continuation
    ("", "Keras is a deep learning API"),       # empty context: <bos> alone
    ("Gemma models are", " lightweight"),
] + [("The quick brown fox 12 jumps over the lazy dog number", f" {n}") for n in
     ("84", "7", "lazy dog", "Gemma")]          # one context, four choices


# Gemma 2 (sliding window: a ring buffer that wraps, soft-caps) on every backend. The MQA case
# runs the same scoring code on a Gemma 1 model, whose logits test_parity.py checks against
# transformers on every backend: one pass (JAX, where it is quickest) keeps it against HFLM.
@pytest.mark.parametrize("case", [pytest.param("gemma_mqa", marks=pytest.mark.once("jax")),
                                  "gemma2_gqa"])
def test_loglikelihood_equals_lm_eval_hflm(case, hflm_checkpoint):
    directory, model = hflm_checkpoint(case, embedding_std=0.02)
    lm = gk.GemmaCausalLM.from_preset(directory, dtype="float32")
    # Requests whose continuation is transformers' own greedy continuation: is_greedy True.
    import torch

    hf_tokens = []
    for context in ("The quick brown fox", "Keras is"):
        ids = lm.tokenizer.tokenize(context, add_bos=True)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)
        hf_tokens.append((ids, out[0, len(ids):].tolist()))
    ours = lm.loglikelihood(REQUESTS, batch_size=3)  # the 4-choice context split across batches
    reference = _hflm(directory).loglikelihood(_instances("loglikelihood", REQUESTS))
    for (value, greedy), (expected, expected_greedy) in zip(ours, reference):
        assert abs(value - expected) < TOL and greedy == expected_greedy
    # Token ids: the greedy continuations, and a long context (Gemma 2: beyond its window of
    # 5, so the continuations read a ring buffer that wrapped during the prefill).
    from gemma_keras.evaluation import loglikelihood_tokens

    long_context = lm.tokenizer.tokenize(" ".join(["lazy dog 7"] * 6), add_bos=True)
    pairs = hf_tokens + [(long_context, [5, 6, 7]), (long_context, [9])]
    ours = loglikelihood_tokens(lm, pairs, batch_size=4)
    reference = _hflm(directory)._loglikelihood_tokens(
        [(("", ""), context, continuation) for context, continuation in pairs])
    assert [g for _, g in ours[:2]] == [True, True]
    for (value, greedy), (expected, expected_greedy) in zip(ours, reference):
        assert abs(value - expected) < TOL and greedy == expected_greedy
    # Batch size never changes a result.
    assert np.allclose([v for v, _ in loglikelihood_tokens(lm, pairs, batch_size=1)],
                       [v for v, _ in ours], atol=TOL)


def test_loglikelihood_rolling_equals_lm_eval_windows_scored_by_hflm(hflm_checkpoint):
    """Texts longer than the context are read in lm-eval's rolling windows; every token is
    scored once, from <bos>. Reference: lm-eval's window functions on the same tokens, scored
    by HFLM (HFLM's own `loglikelihood_rolling` also scores a second <bos> its tokenizer adds:
    the harness model `gemma_keras` reproduces that, see test_evaluation_harness.py)."""
    from lm_eval import utils

    directory, _ = hflm_checkpoint("gemma2_gqa")
    lm = gk.GemmaCausalLM.from_preset(directory, dtype="float32")
    texts = ["The quick brown fox 3 jumps over the lazy dog number 21. " * 3, "Keras", "x"]
    max_length = 16
    ours = lm.loglikelihood_rolling(texts, max_length=max_length, batch_size=4)
    hflm = _hflm(directory, max_length=max_length)
    for text, value in zip(texts, ours):
        tokens = lm.tokenizer.tokenize(text)
        windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
            token_list=tokens, prefix_token=lm.tokenizer.bos_token_id, max_seq_len=max_length,
            context_len=1)]
        assert len(windows) == -(-len(tokens) // max_length)
        expected = sum(v for v, _ in hflm._loglikelihood_tokens(
            [(("", ""), context, continuation) for context, continuation in windows]))
        assert abs(value - expected) < TOL * max(1, len(tokens) / 10), text[:20]
    # Within one window, rolling is the log-likelihood of the text after an empty context.
    short = lm.loglikelihood_rolling(["Keras is a deep learning API"])[0]
    assert abs(short - lm.loglikelihood([("", "Keras is a deep learning API")])[0][0]) < TOL


def test_loglikelihood_refuses_bad_requests(keras_hub_preset):
    lm = gk.GemmaCausalLM.from_preset(keras_hub_preset("gemma_mqa")[0])
    from gemma_keras.evaluation import loglikelihood_tokens

    with pytest.raises(gk.ArgumentTypeError, match="pair"):
        lm.loglikelihood([("only a context",)])
    with pytest.raises(gk.ArgumentTypeError, match="list"):
        lm.loglikelihood("The quick brown fox")
    with pytest.raises(gk.ArgumentTypeError, match="continuation"):
        lm.loglikelihood([("context", None)])
    with pytest.raises(gk.InvalidArgumentError, match="at least one token"):
        loglikelihood_tokens(lm, [([2, 5], [])])
    with pytest.raises(gk.InvalidArgumentError, match=r"\[0, "):
        loglikelihood_tokens(lm, [([2, 5], [10 ** 6])])
    with pytest.raises(gk.InvalidArgumentError, match="batch_size"):
        lm.loglikelihood([("a", "b")], batch_size=0)
    with pytest.raises(gk.ArgumentTypeError, match="texts"):
        lm.loglikelihood_rolling(["fine", 3])
