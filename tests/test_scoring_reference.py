"""`is_greedy` and log-likelihoods against lm-eval's own Hugging Face model (HFLM) on
requests whose continuation is only partly the model's argmax: the first token greedy and a
later one not, the other way round, one in the middle, all and none. A continuation is greedy
only when every one of its tokens is the argmax (lm-eval: `(greedy_tokens == cont).all()`).

The rule is host-side and the same on every backend (the log-probabilities themselves are
compared with HFLM by test_evaluation_harness): this runs in one backend's pass."""

import pytest

import gemma_keras as gk

TOL = 1e-4
CASE = "gemma2_gqa"  # the checkpoint test_evaluation_harness scores (built once a session)
CONTEXTS = ["The quick brown fox", "Keras is"]


def _argmax_after(model, ids):
    """transformers' most likely next token after `ids`."""
    import torch

    with torch.no_grad():
        return int(model(torch.tensor([ids])).logits[0, -1].argmax())


def _other(model, ids):
    """A token that is not the argmax after `ids` (nor a special piece)."""
    best = _argmax_after(model, ids)
    return 300 if best != 300 else 301  # ids past the 256 byte pieces: merged pieces


def _requests(lm, model):
    """[(context ids, continuation ids, what)]: 3-token continuations of each context built
    from transformers' argmax at each place."""
    out = []
    for context in CONTEXTS:
        ctx = lm.tokenizer.tokenize(context, add_bos=True)

        def then(prefix, n, pick):
            """`prefix` and n more tokens, each chosen by pick(model, ids so far)."""
            tokens = list(prefix)
            for _ in range(n):
                tokens.append(pick(model, ctx + tokens))
            return tokens
        greedy = then([], 3, _argmax_after)
        first = _other(model, ctx)
        out += [(ctx, greedy, "all greedy"),
                (ctx, then(greedy[:2], 1, _other), "last not greedy"),
                (ctx, then([first], 2, _argmax_after), "first not greedy"),
                (ctx, then(then(greedy[:1], 1, _other), 1, _argmax_after), "middle not greedy"),
                (ctx, then([first], 2, _other), "none greedy")]
    return out


@pytest.mark.once("torch")
def test_partly_greedy_continuations_equal_hflm(hflm_checkpoint):
    from lm_eval.models.huggingface import HFLM

    from gemma_keras.evaluation.harness import GemmaKerasLM

    directory, model = hflm_checkpoint(CASE, embedding_std=0.02)
    lm = gk.GemmaCausalLM.from_preset(str(directory), dtype="float32")
    hflm = HFLM(pretrained=str(directory), device="cpu", dtype="float32", batch_size=4)
    built = _requests(lm, model)
    requests = [(("", ""), ctx, cont) for ctx, cont, _ in built]
    want = hflm._loglikelihood_tokens(requests, disable_tqdm=True)
    got = GemmaKerasLM(lm=lm)._loglikelihood_tokens(requests, disable_tqdm=True)
    for (_, _, what), (value, greedy), (want_value, want_greedy) in zip(built, got, want):
        assert abs(value - want_value) < TOL and greedy == want_greedy, (what, value,
                                                                         want_value, greedy)
    # The requests discriminate: lm-eval calls only the wholly greedy ones greedy.
    assert [g for _, g in want] == [what == "all greedy" for _, _, what in built]
