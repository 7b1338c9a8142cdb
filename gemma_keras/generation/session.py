"""The host side of decoding: a batch's cache and rows, fed through the compiled steps.

What compiles when: one prefill function per (batch, prompt bucket, cache bucket) and one
decode step per (batch, cache bucket). Prompts are left-padded to a power-of-two bucket (at
least 16) and the cache to a multiple of 128 columns, so a new prompt length reuses an
existing compilation unless it crosses a bucket boundary.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, List, Optional, Sequence

import keras
import numpy as np

from gemma_keras import backends
from gemma_keras.errors import InvalidArgumentError
from gemma_keras.layers.kv_cache import Mode, init_cache
from gemma_keras.generation.options import Decoding
from gemma_keras.generation.samplers import Sampler
from gemma_keras.generation.steps import pad_id, stop_id_array
from gemma_keras.generation.stopping import RowText, completion_ids, cut_at_stop_strings, growth

MIN_PROMPT_BUCKET = 16
CACHE_BUCKET = 128


def power_of_two_bucket(n: int, least: int = 1) -> int:
    """The smallest power of two times `least` that is >= n: the compiled shapes' buckets."""
    bucket = least
    while bucket < n:
        bucket *= 2
    return bucket


def prompt_bucket(length: int, limit: int) -> int:
    return min(power_of_two_bucket(length, MIN_PROMPT_BUCKET), max(limit, length))


def cache_bucket(columns: int, limit: int) -> int:
    return min(-(-columns // CACHE_BUCKET) * CACHE_BUCKET, max(limit, columns))


@dataclasses.dataclass
class _Row:
    prompt: List[int]  # everything the row's context held before this decoding
    generated: List[int] = dataclasses.field(default_factory=list)
    done: bool = False
    text: Optional[RowText] = None  # kept while decoding when stop strings or a stream read it


@dataclasses.dataclass
class Stopping:
    """What ends a row and what its text is: stop ids, stop strings, special pieces."""
    stop_ids: frozenset = frozenset()
    stop_strings: Optional[List[str]] = None
    skip_special: bool = True


def record(row: _Row, token, stopping: Stopping):
    """Appends a chosen token to a row that is still decoding, and ends the row at a stop id
    or stop string."""
    if row.done:
        return
    token = int(token)
    row.generated.append(token)
    row.done = token in stopping.stop_ids
    if row.text is not None and row.text.add(token):
        row.done = True  # a stop string appeared


class GenerationSession:
    """A batch being decoded: the cache, the next column, and each row's tokens.

    `GemmaCausalLM.generate` runs one to completion; a chat keeps one alive across turns and
    extends it with each new message instead of re-reading the conversation.

    The decode state (cache, column, next_position, logits) is read-only outside this class:
    strategies that run a compiled loop of their own (speculative rounds, beams, a drafter)
    hand back what the loop returned through `with_cache` / `adopt_cache` / `moved_to`.
    """

    def __init__(self, lm, prompts: Sequence[Sequence[int]], total_columns: int,
                 speculation=None, lookahead: int = 0):
        """speculation: a `speculative.Speculation` that decodes after the first token, or
        None. lookahead: columns (and ring slots) for tokens written and then forgotten
        (a Speculation's drafts, a drafter's own)."""
        self.lm = lm
        self.speculation = speculation
        if speculation is not None:
            lookahead = speculation.lookahead
        self.steps = lm.compiled_steps()
        config = lm.backbone.config
        self.rows = [_Row(list(p)) for p in prompts]
        width = prompt_bucket(max(len(p) for p in prompts), config.max_sequence_length)
        # Columns: the padded prompt, then one per new token.
        self.capacity = cache_bucket(
            width + total_columns + lookahead - max(len(p) for p in prompts),
            config.max_sequence_length + lookahead)
        self._cache = init_cache(config, len(prompts), self.capacity,
                                 lm.backbone.dtype_policy.compute_dtype, lookahead=lookahead)
        self._column = 0  # next free column
        self._next_position = np.zeros(len(prompts), "int32")
        self._logits = self._feed([list(p) for p in prompts], Mode.PREFILL)

    # ---- the decode state, read-only outside -----------------------------------------------
    @property
    def cache(self):
        return self._cache

    @property
    def column(self) -> int:
        """The next free column (the same for every row: prompts are left-padded)."""
        return self._column

    @property
    def next_position(self) -> np.ndarray:
        """[batch] the position the next token of each row takes (a copy)."""
        return self._next_position.copy()

    @property
    def logits(self):
        """[batch, vocab] float32 after each row's last token, or None after a compiled loop
        (which keeps its logits)."""
        return self._logits

    def with_cache(self, fn):
        """fn(cache) -> (result, new cache): runs a compiled function that takes this
        session's cache (donated: only the returned one is used), keeps the new cache and
        returns the result."""
        result, self._cache = fn(self._cache)
        return result

    def adopt_cache(self, cache):
        """The cache a compiled loop returned for this session's (which it donated)."""
        self._cache = cache

    def moved_to(self, column, next_position):
        """After a compiled loop of a strategy's own: the next free column and each row's
        next position. The loop keeps its logits."""
        self._column = int(column)
        self._next_position = np.asarray(next_position, "int32").copy()
        self._logits = None

    def restart_row(self, context, chunk):
        """Row 0 (a chat's) starts a new completion after `context`, everything its
        conversation holds (repetition_penalty reads it); `chunk` is fed after the cache."""
        row = self.rows[0]
        row.prompt, row.generated, row.done = list(context), [], False
        self.extend([chunk])

    def finish_row(self, r, generated):
        """Row r's completion is `generated` (a strategy's result, e.g. the best beam)."""
        self.rows[r].generated, self.rows[r].done = list(generated), True

    def _feed(self, chunks, mode: Mode):
        """Feeds one chunk per row, left-padded to a common bucketed width; returns the logits
        [batch, vocab] after each row's last token."""
        width = (1 if mode is Mode.DECODE
                 else prompt_bucket(max(len(c) for c in chunks), self.capacity))
        if self._column + width > self.capacity:
            raise InvalidArgumentError(
                f"The conversation needs {self._column + width} cache columns but this session "
                f"holds {self.capacity}; start a new one with a larger max_length.")
        ids = np.full((len(chunks), width), pad_id(self.lm), "int32")
        positions = np.full((len(chunks), width), -1, "int32")
        for r, chunk in enumerate(chunks):
            if chunk:
                ids[r, width - len(chunk):] = chunk
                positions[r, width - len(chunk):] = self._next_position[r] + np.arange(len(chunk))
                self._next_position[r] += len(chunk)
        logits, self._cache = self.steps(mode, ids, positions, self._cache,
                                         np.asarray(self._column, "int32"))
        self._column += width
        return np.asarray(keras.ops.convert_to_numpy(logits), "float32")

    def extend(self, chunks):
        """Appends tokens (one list per row) after what the cache holds."""
        self._logits = self._feed(chunks, Mode.EXTEND)

    def step(self, tokens):
        """Feeds one sampled token per row (finished rows get a padding slot)."""
        chunks = [[t] if not row.done else [] for row, t in zip(self.rows, tokens)]
        self._logits = self._feed(chunks, Mode.DECODE)

    def decode(self, max_new_tokens, decoding, rng, stopping: Optional[Stopping] = None):
        """Chooses up to max_new_tokens per row with `decoding` (a `Decoding`, or a bare
        Sampler with no stop ids), stopping rows as `stopping` says (the stop id is kept in
        `generated`)."""
        for _ in self.decoding_steps(max_new_tokens, decoding, rng, stopping):
            pass

    def decoding_steps(self, max_new_tokens, decoding, rng, stopping=None,
                       on_host=False) -> Iterator[None]:
        """`decode` as a generator that yields after each token chosen on the host (the
        decoding runs as far as it is iterated). Greedy decoding with nothing left to do per
        token on the host finishes in one compiled loop where the backend compiles loops,
        unless `on_host` (a stream reads every token)."""
        if isinstance(decoding, Sampler):
            decoding = Decoding(decoding, set())
        stopping = stopping or Stopping(frozenset(decoding.stop_ids))
        if stopping.stop_strings or on_host:  # the text is read while decoding
            for row in self.rows:
                row.text = RowText(self.lm.tokenizer, stopping.stop_ids,
                                   stopping.stop_strings, stopping.skip_special)
        on_device = not on_host and not stopping.stop_strings and backends.get().loops_compile
        for i in range(max_new_tokens):
            tokens = decoding.select(self._logits, self.rows, rng)
            self._record(tokens, stopping)
            yield
            if all(row.done for row in self.rows) or i == max_new_tokens - 1:
                return
            if self.speculation is not None:  # the rest drafted and verified
                yield from self.speculation.decoding_steps(
                    self, tokens, max_new_tokens - 1 - i, decoding, rng, stopping, on_device)
                return
            # The rest in one compiled loop, once no host-side rule is left to apply
            # (min_new_tokens reached, no repetition penalty).
            if on_device and decoding.compiled_loop_can_finish(self.rows):
                return self._greedy_on_device(tokens, max_new_tokens - 1 - i, stopping)
            self.step(tokens)

    def _record(self, tokens, stopping):
        for row, token in zip(self.rows, tokens):
            record(row, token, stopping)

    def _greedy_on_device(self, tokens, steps, stopping):
        """The rest of a greedy `decode` as one compiled loop: feeds `tokens` and decodes up
        to `steps` more tokens per row."""
        if self._column + steps > self.capacity:
            raise InvalidArgumentError(
                f"Decoding {steps} more tokens needs {self._column + steps} cache columns but "
                f"this session holds {self.capacity}.")
        stops = stop_id_array(stopping.stop_ids)
        done = np.array([row.done for row in self.rows])
        out, count, self._cache, positions = self.steps.greedy_loop(
            np.asarray(tokens, "int32"), self._next_position.copy(), done, self._cache,
            np.asarray(self._column, "int32"), np.asarray(steps, "int32"), stops)
        count = int(keras.ops.convert_to_numpy(count))
        out = np.asarray(keras.ops.convert_to_numpy(out))
        # The loop keeps its logits; only chat (host loop) needs them.
        self.moved_to(self._column + count, keras.ops.convert_to_numpy(positions))
        for j in range(count):
            self._record(out[:, j], stopping)

    def completion_text(self, row, stopping: Stopping) -> str:
        """A row's final text: without its stop id, cut before the first stop string."""
        ids = completion_ids(row.generated, stopping.stop_ids)
        text = self.lm.tokenizer.detokenize(ids, skip_special=stopping.skip_special) if ids else ""
        return cut_at_stop_strings(text, stopping.stop_strings)

    def stream(self, max_new_tokens, decoding, rng, stopping: Stopping) -> Iterator[str]:
        """Decodes row 0 of the session, yielding its completion text as it is decoded.

        Never splits a multi-byte character (bytes of a character still to come wait for the
        rest) and never yields the start of a stop string that may be completing; the pieces
        join to exactly `completion_text`."""
        row = self.rows[0]
        emitted = ""
        for _ in self.decoding_steps(max_new_tokens, decoding, rng, stopping, on_host=True):
            if row.done:
                break
            piece = growth(row.text.settled(), emitted)
            if piece:
                emitted += piece
                yield piece
        piece = growth(self.completion_text(row, stopping), emitted)
        if piece:
            yield piece
