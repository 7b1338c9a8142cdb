"""Speculative decoding: a drafter proposes the next k tokens of each row, the target model
scores all of them in one forward pass over its cache, and each row keeps the longest prefix
the target agrees with, plus one token of the target's own.

Batch-1 decoding reads every weight once per token; verifying k drafts reads them once per
round, so a round that keeps m drafts yields m + 1 tokens for about the price of one step.

Exactness:
- Greedy: a draft is kept only when it is the target's argmax at its place, and the extra
  token is the target's argmax after the kept ones, so the text is plain greedy decoding's,
  token for token (up to the float rounding of a k+1-token pass against a 1-token one).
- Sampling: the rejection rule of Leviathan et al. 2023 / Chen et al. 2023. Draft x, drawn
  from the drafter's distribution q, is kept with probability min(1, p(x) / q(x)), p being
  the target's distribution as the sampler sees it (temperature, top-k, top-p and the logits
  rules applied); the first rejected place draws from max(0, p - q) renormalised, and a round
  whose drafts are all kept draws one more token from p. Each token is then distributed
  exactly as plain sampling from p would draw it. A drafter without a distribution (prompt
  lookup) has q = one-hot.

The caches: each row writes its chunk at its own column (`cache.write` with a start per
row), so rows that keep different numbers of drafts never leave holes; rejected drafts are
forgotten by `cache.truncate` at the start of the next pass (it is fused into that pass).
Rings keep `lookahead` extra slots so that writing drafts never overwrites a key a later
query still needs (see `cache.cache_slots`).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import List

import keras
import numpy as np
from keras import ops

from gemma_keras.errors import InvalidArgumentError, SpeculationWarning
from gemma_keras.layers.kv_cache import Mode, truncate
from gemma_keras.generation.samplers import draw
from gemma_keras.generation.steps import hits_stop, model_step, pad_id, stop_id_array


# Rounds before the acceptance is judged (a short completion says little).
MIN_ROUNDS_TO_JUDGE = 8


@dataclasses.dataclass
class Stats:
    """What the drafts of one decoding achieved: `lm.last_speculation` after `generate`
    (the model keeps what `on_speculation` is told)."""
    draft: str
    draft_tokens: int  # k: drafts per round
    rounds: int = 0  # target passes after the first token
    row_rounds: int = 0  # rows verified, summed over the passes
    drafted: int = 0  # drafts proposed over all rows and rounds
    accepted: int = 0  # drafts kept
    tokens: int = 0  # tokens the rounds produced (kept drafts + one per row and round)

    @property
    def acceptance(self) -> float:
        """The share of drafts the target kept."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens a row got per target pass (plain decoding: 1)."""
        return self.tokens / self.row_rounds if self.row_rounds else 0.0


def verify_function(backbone, greedy: bool):
    """The target's pass over a row's newest token and its drafts.

    ids, positions: [batch, n] (padding at position -1); cache; start: [batch], the column of
    each row's ids[:, 0]; keep: [batch], each row's last position to keep from earlier passes
    (the drafts a previous pass rejected are after it). Returns (the argmax after each token,
    [batch, n] int32, when `greedy`, else the float32 logits [batch, n, vocab]; the cache)."""

    def verify(ids, positions, cache, start, keep):
        logits, cache = model_step(backbone, ids, positions, truncate(cache, keep), start,
                                   Mode.DECODE, logits="all")  # [batch, n, vocab]
        if greedy:
            return ops.cast(ops.argmax(logits, axis=-1), "int32"), cache
        return logits, cache
    return verify


def greedy_rounds(backbone, propose, pad, k):
    """Greedy speculative decoding as a loop inside one compiled function: every round
    drafts (`propose`, keras.ops), verifies, accepts and appends on the device, so the host
    dispatches once per `generate` instead of once per round. On CPU a round trip to the
    host cost ~10 ms against a 2.5 ms step of the demo preset's compiled greedy loop
    (bench/speculative_speed.py, JAX), which no acceptance rate could pay back.

    Same rounds as `Speculation.decoding_steps` on the host, with one shape for every
    round: each pass verifies 1 + k columns, the columns past a row's drafts at position -1.

    propose(history, length, position, live, state) -> (drafts [batch, k] int32, how many
    of them are drafts [batch], state): the drafter (`PromptLookupDrafter.device_propose`,
    `ModelDrafter.device_propose`), with `state` its own (a draft model's cache).

    Arguments: last, position, column, keep, done, remaining: [batch] (the chosen token not
    yet cached, its position and column, the last position to keep from earlier passes,
    whether the row hit a stop id, tokens it may still make); history [batch, H] and length
    [batch]: each row's tokens so far, `last` included, left-aligned; stop_ids [n] (-1
    padded). Returns (history, length, position, column, keep, counts [5] = rounds,
    row_rounds, drafted, accepted, tokens as in `Stats`, cache, state)."""

    def rounds(last, position, column, keep, done, remaining, history, length, stop_ids,
               cache, state):
        slots = history.shape[1]
        place = ops.arange(k + 1, dtype="int32")[None, :]  # [1, k + 1]

        def live_of(done, remaining):
            return ops.logical_and(ops.logical_not(done), remaining > 0)

        def cond(last, position, column, keep, done, remaining, history, length, counts,
                 cache, state):
            return ops.any(live_of(done, remaining))

        def body(last, position, column, keep, done, remaining, history, length, counts,
                 cache, state):
            live = live_of(done, remaining)  # [batch]
            drafts, drafted, state = propose(history, length, position, live, state)
            drafted = ops.where(live, drafted, 0)
            valid = ops.logical_and(place <= drafted[:, None], live[:, None])  # [batch, k+1]
            ids = ops.where(valid, ops.concatenate([last[:, None], drafts], axis=1), pad)
            fed = ops.where(valid, position[:, None] + place, -1)
            # No truncate before the pass: every pass writes 1 + k columns from the row's
            # newest token on, over all of the previous pass's rejected drafts.
            logits, cache = model_step(backbone, ids, fed, cache, column, Mode.DECODE,
                                       logits="all")
            out = ops.cast(ops.argmax(logits, axis=-1), "int32")  # [batch, k + 1]
            agree = ops.logical_and(drafts == out[:, :k], place[:, :k] < drafted[:, None])
            accepted = ops.sum(ops.cumprod(ops.cast(agree, "int32"), axis=1), axis=1)
            # The row's new tokens: out[:, :count] (a kept draft is the target's argmax),
            # cut after a stop id and at the tokens the row may still make.
            stop = ops.logical_and(hits_stop(out, stop_ids), place <= accepted[:, None])
            first_stop = ops.cast(ops.argmax(ops.cast(stop, "int32"), axis=1), "int32")
            stopped = ops.any(stop, axis=1)
            count = ops.where(stopped, first_stop + 1, accepted + 1)
            count = ops.where(live, ops.minimum(count, remaining), 0)
            done = ops.logical_or(done, ops.logical_and(stopped, first_stop < count))
            # history[r, length + j] = out[r, j] for j < count
            offset = ops.arange(slots, dtype="int32")[None, :] - length[:, None]
            appended = ops.take_along_axis(out, ops.clip(offset, 0, k), axis=1)
            history = ops.where(ops.logical_and(offset >= 0, offset < count[:, None]),
                                appended, history)
            newest = ops.take_along_axis(out, ops.clip(count - 1, 0, k)[:, None], axis=1)
            last = ops.where(count > 0, newest[:, 0], last)
            position, column, length = position + count, column + count, length + count
            remaining = remaining - count
            keep = ops.where(live, position - 1, keep)
            counts = counts + ops.stack([
                ops.ones((), "int32"), ops.sum(ops.cast(live, "int32")), ops.sum(drafted),
                ops.sum(ops.where(live, accepted, 0)), ops.sum(count)])
            return (last, position, column, keep, done, remaining, history, length, counts,
                    cache, state)

        counts = ops.zeros((5,), "int32")
        (_, position, column, keep, _, _, history, length, counts, cache,
         state) = ops.while_loop(
            cond, body, (last, position, column, keep, done, remaining, history, length,
                         counts, cache, state))
        # Forget the last round's rejected drafts now: a chat extends this cache next.
        return history, length, position, column, keep, counts, truncate(cache, keep), state
    return rounds


class Speculation:
    """Decodes a `GenerationSession` after its first token with `drafter` proposing
    `draft_tokens` tokens per round (see the module docstring)."""

    def __init__(self, drafter, draft_tokens: int, on_speculation=None):
        """on_speculation(stats): told each decoding's `Stats` when it ends."""
        self.drafter, self.k = drafter, draft_tokens
        self.on_speculation = on_speculation
        # Columns a round may write past what it keeps: the newest token and k drafts.
        self.lookahead = draft_tokens + 1
        self.stats = None

    def decoding_steps(self, session, tokens, max_new_tokens, decoding, rng, stopping,
                       on_device=False):
        """Continues `session` (whose rows just recorded `tokens`, not yet fed to the
        cache) for up to `max_new_tokens` more tokens per row; yields after each token of a
        round (`GenerationSession.stream` reads row 0 there). on_device: greedy decoding
        with nothing to do per token on the host may run every round in one compiled loop
        (`greedy_rounds`; the backend compiles loops, no stream or stop string reads the
        text)."""
        self.stats = Stats(self.drafter.name, self.k)
        if on_device and decoding.compiled_loop_can_finish(session.rows):
            self._rounds_on_device(session, tokens, max_new_tokens, stopping)
        else:
            yield from self._rounds_on_host(session, tokens, max_new_tokens, decoding, rng,
                                            stopping)
        if self.on_speculation is not None:
            self.on_speculation(self.stats)
        self._warn_if_it_did_not_pay()

    def _rounds_on_device(self, session, tokens, max_new_tokens, stopping):
        from gemma_keras.generation.session import record

        rows, lm = session.rows, session.lm
        batch = len(rows)
        histories = [row.prompt + row.generated for row in rows]
        self.drafter.begin(histories, session.next_position, max_new_tokens, self.k)
        # Room for every token this call may append, in a bucket so that calls share
        # compilations.
        width = -(-(max(map(len, histories)) + max_new_tokens) // 128) * 128
        history = np.zeros((batch, width), "int32")
        for r, h in enumerate(histories):
            history[r, :len(h)] = h
        length = np.array([len(h) for h in histories], "int32")
        stops = stop_id_array(stopping.stop_ids)
        propose, others = self.drafter.device_propose(self.k)
        run = session.steps.function(
            ("speculative_rounds", self.drafter.name, self.k),
            greedy_rounds(lm.backbone, propose, pad_id(lm), self.k), donate_argnums=(9,),
            others=others)
        position = session.next_position
        (history, new_length, position, column, _, counts, cache,
         state) = run(np.asarray(tokens, "int32"), position,
                      np.full(batch, session.column, "int32"), position - 1,
                      np.array([row.done for row in rows]),
                      np.full(batch, max_new_tokens, "int32"), history, length, stops,
                      session.cache, self.drafter.device_state())
        session.adopt_cache(cache)
        self.drafter.keep_device_state(state)
        history, new_length = (np.asarray(keras.ops.convert_to_numpy(x))
                               for x in (history, new_length))
        counts = np.asarray(keras.ops.convert_to_numpy(counts)).tolist()
        (self.stats.rounds, self.stats.row_rounds, self.stats.drafted, self.stats.accepted,
         self.stats.tokens) = counts
        for r, row in enumerate(rows):
            for token in history[r, length[r]:new_length[r]]:
                record(row, token, stopping)
        session.moved_to(np.max(keras.ops.convert_to_numpy(column)),
                         keras.ops.convert_to_numpy(position))

    def _rounds_on_host(self, session, tokens, max_new_tokens, decoding, rng, stopping):
        from gemma_keras.generation.session import record

        rows, lm = session.rows, session.lm
        batch = len(rows)
        steps = session.steps
        greedy_on_device = decoding.greedy and not decoding.has_rules
        verify_key = ("verify", greedy_on_device)
        verify = steps.function(verify_key, verify_function(lm.backbone, greedy_on_device),
                                donate_argnums=(2,))
        last = np.asarray(tokens, "int32")  # [batch] chosen, not yet in the target's cache
        position = session.next_position  # [batch] position of `last` (a copy)
        column = np.full(batch, session.column, "int32")  # [batch] column of `last`
        keep = position - 1  # everything before `last` is in the cache and stays
        remaining = np.array([max_new_tokens] * batch)
        histories = [row.prompt + row.generated for row in rows]
        self.drafter.begin(histories, position, max_new_tokens, self.k)
        pad = pad_id(lm)
        while True:
            live = np.array([not row.done for row in rows]) & (remaining > 0)
            if not live.any():
                break
            drafts = self.drafter.propose(histories, position, live, self.k, decoding, rng)
            width = 1 + max(len(d) for d, alive in zip(drafts.tokens, live) if alive)
            if width > 1:
                width = 1 + self.k  # one compiled shape per k (and one without drafts)
            if int(column[live].max()) + width > session.capacity:
                raise InvalidArgumentError(  # the session was sized for this; a bug if hit
                    f"Speculative decoding needs {int(column.max()) + width} cache columns "
                    f"but the session holds {session.capacity}.")
            ids = np.full((batch, width), pad, "int32")
            fed = np.full((batch, width), -1, "int32")
            for r in np.flatnonzero(live):
                chunk = [int(last[r])] + list(drafts.tokens[r])
                ids[r, :len(chunk)] = chunk
                fed[r, :len(chunk)] = position[r] + np.arange(len(chunk))
            out = session.with_cache(lambda cache: verify(ids, fed, cache, column, keep))
            out = np.asarray(keras.ops.convert_to_numpy(out))
            self.stats.rounds += 1
            self.stats.row_rounds += int(live.sum())
            kept = self._accept(out, drafts, live, histories, rows, decoding, rng)
            # Recorded token by token, so a stream sees each one; a row that ends (stop id,
            # stop string, max_new_tokens) mid-round drops the rest.
            recorded = np.zeros(batch, "int32")
            for j in range(max(len(k) for k in kept)):
                for r in np.flatnonzero(live):
                    if j < len(kept[r]) and remaining[r] > 0 and not rows[r].done:
                        record(rows[r], kept[r][j], stopping)
                        histories[r].append(int(kept[r][j]))
                        recorded[r] += 1
                        remaining[r] -= 1
                yield
            self.stats.tokens += int(recorded.sum())
            # `last` and the kept drafts before the newest recorded token are cached; that
            # token is the next `last`.
            position += recorded
            column += recorded
            keep = np.where(live, position - 1, keep)
            last = np.array([h[-1] for h in histories], "int32")
        # Forget the last round's rejected drafts now: a chat extends this cache next.
        session.adopt_cache(truncate(session.cache, keep))
        session.moved_to(column.max(), position)

    def _warn_if_it_did_not_pay(self):
        stats, pays = self.stats, self.drafter.pays_above
        # Nothing drafted (prompt lookup found no earlier occurrence to copy): there is no
        # acceptance to judge, and "kept 0 of 0 drafts" would blame drafts that never were.
        if stats.drafted == 0 or stats.rounds < MIN_ROUNDS_TO_JUDGE:
            return
        if stats.tokens_per_round < pays:
            # Both causes are named: few drafts proposed (prompt lookup on text that does not
            # repeat) and few kept (a drafter that disagrees with the model).
            warnings.warn(
                f"draft={stats.draft!r}: {stats.tokens_per_round:.2f} tokens per pass; the "
                f"drafter proposed {stats.drafted} drafts over {stats.row_rounds} passes "
                f"(counted per row; at most {stats.draft_tokens} a pass) and the model kept "
                f"{stats.accepted} of them. Below about {pays} tokens per pass drafting is "
                "slower than plain decoding on CPU (bench/speculative_speed.py). Try fewer "
                "draft_tokens, another drafter, or none.", SpeculationWarning, stacklevel=4)

    def _accept(self, out, drafts, live, histories, rows, decoding, rng) -> List[List[int]]:
        """Per row: the kept drafts and then the target's own token."""
        kept = [[] for _ in rows]
        on_device = out.ndim == 2  # argmaxes computed by the verify pass
        for r in np.flatnonzero(live):
            proposed = list(drafts.tokens[r])
            self.stats.drafted += len(proposed)
            if on_device:
                targets = out[r]
                n = 0
                while n < len(proposed) and proposed[n] == targets[n]:
                    n += 1
                kept[r] = proposed[:n] + [int(targets[n])]
            else:
                kept[r] = self._sample_row(out[r], proposed, drafts.probs_of(r), histories[r],
                                           len(rows[r].generated), decoding, rng)
                n = len(kept[r]) - 1
            self.stats.accepted += n
        return kept

    @staticmethod
    def _sample_row(logits, proposed, draft_probs, history, count, decoding, rng):
        """One row's round on the host: logits [n, vocab] float32 of the target after
        `last` and each draft; draft_probs [len(proposed), vocab] or None (one-hot)."""
        # The target's distribution at each place, its rules seeing the drafts before it.
        contexts = [history + proposed[:j] for j in range(len(proposed) + 1)]
        adjusted = decoding.adjust(logits[:len(contexts)], contexts,
                                   [count + j for j in range(len(contexts))])
        if decoding.greedy:
            targets = np.argmax(adjusted, axis=-1)
            n = 0
            while n < len(proposed) and proposed[n] == targets[n]:
                n += 1
            return proposed[:n] + [int(targets[n])]
        p = decoding.sampler.probs(adjusted)  # [places, vocab] float64
        kept = []
        for j, token in enumerate(proposed):
            if draft_probs is None:  # a deterministic draft: q is one-hot at `token`
                q = np.zeros_like(p[j])
                q[token] = 1.0
            else:
                q = draft_probs[j]
            if rng.random() * q[token] < p[j, token]:  # with probability min(1, p / q)
                kept.append(token)
                continue
            residual = np.maximum(p[j] - q, 0.0)
            total = residual.sum()
            # total is 0 only when p == q, where a rejection cannot happen; guard anyway.
            residual = residual / total if total > 0 else p[j]
            return kept + [int(draw(residual[None], rng)[0])]
        return kept + [int(draw(p[len(proposed)][None], rng)[0])]
