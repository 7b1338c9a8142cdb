"""Drafters for speculative decoding (generation/speculative.py): who proposes the next
tokens, and `generate(draft=...)` turned into one.

- `PromptLookupDrafter`: no model. The row's last n tokens (n = 3, 2, 1) are looked up
  earlier in its prompt and completion, and the tokens that followed are proposed: free
  drafts for copy-heavy tasks (editing, summarising, code), as transformers'
  `prompt_lookup_num_tokens`.
- `ModelDrafter`: a smaller model with the same tokenizer (`draft="gemma2_2b_en"` or a
  loaded GemmaCausalLM), or the target's own weights quantized (`draft="int4"`), decoding
  k tokens ahead with its own KV cache.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import List, Optional

import keras
import numpy as np
from keras import ops

from gemma_keras import backends
from gemma_keras.checkpoints.resolve import check_draft
from gemma_keras.errors import InvalidArgumentError, SpeculationWarning
from gemma_keras.generation import options
from gemma_keras.layers.kv_cache import Mode, truncate
from gemma_keras.generation.samplers import draw
from gemma_keras.generation.steps import model_step, pad_id

# Drafts per round when `draft_tokens` is not given. Prompt lookup's drafts cost only the
# verify pass's extra columns, so it drafts further ahead.
DEFAULT_DRAFT_TOKENS = {"prompt_lookup": 8, "model": 4}
MAX_DRAFT_TOKENS = 32
SELF_DRAFT_MODES = ("int8", "int4")


@dataclasses.dataclass
class Drafts:
    tokens: List[List[int]]  # per row, up to k proposed tokens
    probs: Optional[np.ndarray] = None  # [batch, k, vocab]: the distribution each was drawn
    #                                     from; None: chosen deterministically

    def probs_of(self, row):
        return None if self.probs is None else self.probs[row]


class PromptLookupDrafter:
    """Proposes the tokens that followed the latest earlier occurrence of the row's last
    n-gram (the longest n from `max_ngram` down to `min_ngram` that occurs)."""

    name = "prompt_lookup"
    # Tokens per target pass below which drafting is slower than plain decoding: a pass
    # over 1 + k columns costs about two one-token steps on CPU (XLA runs a product of 2+
    # rows ~3x slower than a 1-row one on the demo's weights). bench/speculative_speed.py,
    # JAX, compiled rounds: 1.87 tokens per pass with k=4 was 0.95x of plain decoding.
    pays_above = 2.0

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def begin(self, histories, positions, max_new_tokens, draft_tokens):
        pass

    def propose(self, histories, positions, live, k, decoding, rng) -> Drafts:
        return Drafts([self.lookup(h, k) if alive else [] for h, alive in zip(histories, live)])

    def device_propose(self, k):
        """`propose` for `speculative.greedy_rounds`: (the function, the models it runs)."""
        def propose(history, length, position, live, state):
            drafts, drafted = lookup_on_device(history, length, k, self.max_ngram,
                                               self.min_ngram)
            return drafts, drafted, state
        return propose, ()

    def device_state(self):
        return np.zeros((), "int32")  # nothing: the history is the whole state

    def keep_device_state(self, state):
        pass

    def lookup(self, history, k) -> List[int]:
        tokens = np.asarray(history, "int64")
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(tokens) <= n:
                continue
            # Windows that start before the final n-gram itself: their continuation exists.
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if hits.size:
                start = hits[-1] + n  # the most recent occurrence
                return tokens[start:start + k].tolist()
        return []


def lookup_on_device(history, length, k, max_ngram, min_ngram):
    """`PromptLookupDrafter.lookup` in keras.ops for every row at once: history [batch, H]
    int32 with `length` [batch] tokens per row. Returns (drafts [batch, k], how many of them
    are drafts [batch])."""
    slots = history.shape[1]
    follows = ops.full_like(length, -1)  # [batch] where the proposed continuation starts
    for n in range(max_ngram, min_ngram - 1, -1):
        tail = ops.take_along_axis(  # [batch, n] the row's last n tokens
            history, ops.clip(length[:, None] - n + ops.arange(n, dtype="int32")[None, :],
                              0, slots - 1), axis=1)
        windows = slots - n
        match = history[:, :windows] == tail[:, :1]  # [batch, windows]: an n-gram starts here
        for i in range(1, n):
            match = ops.logical_and(match, history[:, i:i + windows] == tail[:, i:i + 1])
        start = ops.arange(windows, dtype="int32")[None, :]
        # Windows that end before the final n-gram's last token: their continuation exists.
        match = ops.logical_and(match, start + n <= length[:, None] - 1)
        latest = ops.max(ops.where(match, start, -1), axis=1)  # [batch] the most recent
        follows = ops.where(ops.logical_and(follows < 0, latest >= 0), latest + n, follows)
    drafted = ops.where(follows >= 0, ops.minimum(k, length - follows), 0)
    index = ops.clip(follows[:, None] + ops.arange(k, dtype="int32")[None, :], 0, slots - 1)
    return ops.take_along_axis(history, index, axis=1), ops.cast(drafted, "int32")


def _draft_pass(backbone):
    """The drafter's pass over a chunk at per-row columns, after forgetting what follows
    `keep`: (float32 logits after each row's last token [batch, vocab], cache)."""

    def step(ids, positions, cache, start, keep):
        return model_step(backbone, ids, positions, truncate(cache, keep), start, Mode.DECODE)
    return step


def _greedy_drafts(backbone, k):
    """k greedy drafts in one compiled call: the first from the [token before, newest token]
    chunk, then k - 1 one-token steps. Returns (drafts [batch, k] int32, cache)."""

    def run(ids, positions, cache, start, keep):
        logits, cache = model_step(backbone, ids, positions, truncate(cache, keep), start,
                                   Mode.DECODE)
        token = ops.cast(ops.argmax(logits, axis=-1), "int32")  # [batch]
        newest = positions[:, -1:]  # [batch, 1]; -1 on rows that are done
        out = ops.zeros((ops.shape(ids)[0], k), "int32")
        out = ops.slice_update(out, [0, 0], token[:, None])

        def body(i, state):
            token, out, cache = state
            fed_at = ops.where(newest >= 0, newest + i, -1)
            logits, cache = model_step(backbone, token[:, None], fed_at, cache, start + 1 + i,
                                       Mode.DECODE)
            token = ops.cast(ops.argmax(logits, axis=-1), "int32")
            return token, ops.slice_update(out, [0, i], token[:, None]), cache

        _, out, cache = ops.fori_loop(1, k, body, (token, out, cache))
        return out, cache
    return run


class ModelDrafter:
    """Drafts with a GemmaCausalLM of its own, which keeps its own cache: each round it
    forgets its rejected drafts, reads the row's two newest tokens (the older one again: it
    may be a draft it never read) and decodes k tokens ahead."""

    # A floor: the verify pass as PromptLookupDrafter's, and the drafter's own k passes
    # cost on top, by its size (a 2-of-6-layer draft paid 1.16x at 4.88 tokens per pass).
    pays_above = 2.0

    def __init__(self, lm, name: str):
        self.lm, self.name = lm, name
        self.session = None

    def begin(self, histories, positions, max_new_tokens, draft_tokens):
        from gemma_keras.generation.session import GenerationSession

        # Prefill every row's context; its logits are the target's business.
        self.session = GenerationSession(
            self.lm, histories, max(len(h) for h in histories) + max_new_tokens,
            lookahead=draft_tokens + 1)
        self.column0 = self.session.column  # the column of each row's newest token
        self.position0 = np.asarray(positions, "int32").copy()

    def device_propose(self, k):
        """`propose` for `speculative.greedy_rounds`: (the function, the models it runs). Its
        state: (the drafter's cache, the column of each row's newest token at `begin` and
        that token's position)."""
        greedy = _greedy_drafts(self.lm.backbone, k)
        pad = pad_id(self.lm)

        def propose(history, length, position, live, state):
            cache, column0, position0 = state
            slots = history.shape[1]
            two = ops.arange(2, dtype="int32")[None, :]
            ids = ops.take_along_axis(history, ops.clip(length[:, None] - 2 + two, 0, slots - 1),
                                      axis=1)  # [batch, 2]: the row's two newest tokens
            ids = ops.where(live[:, None], ids, pad)
            fed = ops.where(live[:, None], position[:, None] - 1 + two, -1)
            newest = column0 + (position - position0)  # [batch] column of the newest
            drafts, cache = greedy(ids, fed, cache, newest - 1, position - 2)
            return drafts, ops.full_like(length, k), (cache, column0, position0)
        return propose, (self.lm,)

    def device_state(self):
        return (self.session.cache, np.asarray(self.column0, "int32"), self.position0)

    def keep_device_state(self, state):
        self.session.adopt_cache(state[0])

    def propose(self, histories, positions, live, k, decoding, rng) -> Drafts:
        session = self.session
        batch = len(histories)
        newest = self.column0 + (positions - self.position0)  # [batch] column of the newest
        ids = np.full((batch, 2), pad_id(self.lm), "int32")
        fed = np.full((batch, 2), -1, "int32")
        for r in np.flatnonzero(live):
            ids[r] = histories[r][-2:]
            fed[r] = positions[r] - 1, positions[r]
        start = (newest - 1).astype("int32")
        keep = (positions - 2).astype("int32")  # the older token is read again
        steps = self.lm.compiled_steps()
        if decoding.greedy:
            run = steps.function(("greedy_drafts", k), _greedy_drafts(self.lm.backbone, k))
            out = session.with_cache(lambda cache: run(ids, fed, cache, start, keep))
            out = np.asarray(keras.ops.convert_to_numpy(out))
            return Drafts([out[r].tolist() if live[r] else [] for r in range(batch)])
        # Sampling: each draft drawn on the host from the sampler's distribution of the
        # drafter's logits, which the acceptance test needs.
        step = steps.function("draft_pass", _draft_pass(self.lm.backbone))
        tokens = np.zeros((batch, k), "int64")
        probs = None
        never = np.full(batch, np.iinfo("int32").max, "int32")
        for j in range(k):
            logits = session.with_cache(
                lambda cache: step(ids, fed, cache, start, keep))
            logits = np.asarray(keras.ops.convert_to_numpy(logits), "float32")
            contexts = [h + tokens[r, :j].tolist() for r, h in enumerate(histories)]
            counts = [0] * batch  # min_new_tokens is the target's rule; q only guides
            q = decoding.sampler.probs(decoding.adjust(logits, contexts, counts))
            if probs is None:
                probs = np.zeros((batch, k, q.shape[-1]))
            probs[:, j] = q
            tokens[:, j] = draw(q, rng)
            ids = tokens[:, j:j + 1].astype("int32")
            fed = np.where(live, positions + 1 + j, -1).astype("int32")[:, None]
            start, keep = (newest + 1 + j).astype("int32"), never
        return Drafts([tokens[r].tolist() if live[r] else [] for r in range(batch)], probs)


# ---- generate(draft=...) -----------------------------------------------------------------
def resolve(lm, draft, draft_tokens, on_speculation=None):
    """`generate`'s draft= and draft_tokens= -> a `speculative.Speculation`, or None.
    on_speculation(stats): called with each decoding's `speculative.Stats`."""
    from gemma_keras.generation.speculative import Speculation

    if draft is None:
        if draft_tokens is not None:
            raise InvalidArgumentError("draft_tokens= needs draft= (a model, 'int4' or "
                                       "'prompt_lookup').")
        return None
    k = options.whole_number("draft_tokens", draft_tokens, 1)
    if k is not None and k > MAX_DRAFT_TOKENS:
        raise InvalidArgumentError(f"draft_tokens={k}: at most {MAX_DRAFT_TOKENS} drafts per "
                                   "round (4-8 is usual).")
    if isinstance(draft, str):  # a mistyped kind or preset: said before anything loads
        check_draft(draft)
    if draft in SELF_DRAFT_MODES and not backends.get().narrow_products_pay():
        warnings.warn(
            f"draft={draft!r}: on this backend and device the {draft} weights are widened to "
            "float32 before each product, so the quantized copy drafts no faster than the "
            "model itself and drafting is slower than plain decoding. Use PyTorch for "
            f"{draft} self-drafting, a smaller draft model, or draft='prompt_lookup'.",
            SpeculationWarning, stacklevel=4)
    if isinstance(draft, str) and draft == "prompt_lookup":
        return Speculation(PromptLookupDrafter(), k or DEFAULT_DRAFT_TOKENS["prompt_lookup"],
                           on_speculation)
    return Speculation(ModelDrafter(lm.draft_model(draft), _name(draft)),
                       k or DEFAULT_DRAFT_TOKENS["model"], on_speculation)


def _name(draft):
    return draft if isinstance(draft, str) else type(draft).__name__
