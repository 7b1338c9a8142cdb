"""The functions generation compiles: one model step, and the greedy loop built from it.

`model_step` is the one forward pass over a cache: prefill and the host loop, the compiled
greedy loop, chat, beam steps, the drafters, speculative verify passes and rounds, scoring's
continuations, the SavedModel's generate and the LiteRT signatures all run the model through
it. `CompiledSteps`
keeps each model's compiled steps, built on first use by the backend's `compile_step`; the
model holds its own (`GemmaCausalLM.compiled_steps()`).
"""

from __future__ import annotations

import numpy as np
from keras import ops

from gemma_keras import backends
from gemma_keras.layers.kv_cache import Mode, capacity


def pad_id(lm) -> int:
    """The token fed to padding slots: the tokenizer's <pad>, 0 without a tokenizer."""
    return lm.tokenizer.pad_token_id if lm.tokenizer is not None else 0


def model_step(backbone, token_ids, positions, cache, start, mode, logits="last"):
    """The one forward pass over a cache. token_ids, positions: [batch, len] (positions -1
    on padding), written at columns start.. of `cache` (an int, or [batch] for per-row
    columns). Returns (float32 logits, the updated cache); logits: "last" -> after each
    row's last column [batch, vocab]; "all" -> after every column [batch, len, vocab] (a
    speculative verify pass, scoring continuations); None -> no logits (a chunk of a longer
    prompt: only the cache is needed)."""
    hidden, cache = backbone({"token_ids": token_ids, "positions": positions},
                             cache=cache, start=start, mode=mode)
    if logits is None:
        return None, cache
    if logits == "last":  # the head on the last column only: a 256k-row product per token
        return ops.cast(backbone.logits(hidden[:, -1:, :])[:, 0, :], "float32"), cache
    return ops.cast(backbone.logits(hidden), "float32"), cache


def stop_id_array(stop_ids):
    """Stop ids as the compiled loops take them: int32 [n], padded with -1 to a multiple of 8
    (one compiled shape for any handful of stop ids)."""
    array = np.full(-(-max(len(stop_ids), 1) // 8) * 8, -1, "int32")
    array[: len(stop_ids)] = sorted(stop_ids)
    return array


def hits_stop(tokens, stop_ids):
    """tokens [...] int32, stop_ids [n] (padded with -1): whether each token is a stop id."""
    return ops.any(tokens[..., None] == stop_ids, axis=-1)


def greedy_loop(backbone, pad):
    """Greedy decoding as a loop inside the compiled function, so the host dispatches once
    per `generate` instead of once per token (on CPU that dispatch, the logits copy and the
    bookkeeping were 10-20% of a step). Same semantics as the host loop of
    `GenerationSession.decode`: a finished row is fed a padding slot (position -1), and the
    loop ends early once every row has hit a stop id. Exported SavedModels run it too."""

    def loop(tokens, positions, done, cache, start, steps, stop_ids):
        # tokens, positions, done: [batch], the next token to feed per row, its position
        # and whether the row has finished; stop_ids: [n] (padded with -1).
        # Returns (new tokens [batch, slots], steps run, cache, next positions).
        out = ops.zeros((ops.shape(tokens)[0], capacity(cache)), "int32")

        def cond(i, tokens, positions, done, out, cache):
            return ops.logical_and(i < steps, ops.logical_not(ops.all(done)))

        def body(i, tokens, positions, done, out, cache):
            feed = ops.where(done, pad, tokens)[:, None]        # [batch, 1]
            fed_at = ops.where(done, -1, positions)[:, None]   # [batch, 1]
            logits, cache = model_step(backbone, feed, fed_at, cache, start + i, Mode.DECODE)
            new = ops.cast(ops.argmax(logits, axis=-1), "int32")  # [batch]
            out = ops.slice_update(out, [0, i], new[:, None])
            positions = ops.where(done, positions, positions + 1)
            done = ops.logical_or(done, hits_stop(new, stop_ids))
            return i + 1, new, positions, done, out, cache

        i, _, positions, _, out, cache = ops.while_loop(
            cond, body, (ops.zeros((), "int32"), tokens, positions, done, out, cache))
        return out, i, cache, positions
    return loop


class CompiledSteps:
    """The compiled functions of one GemmaCausalLM: a step per `Mode`, the greedy loop, and
    whatever else runs the model compiled (scoring: `function`)."""

    def __init__(self, lm):
        self.lm = lm
        self._steps = {}

    def __call__(self, mode: Mode, token_ids, positions, cache, start):
        if mode not in self._steps:
            backbone = self.lm.backbone

            def step(token_ids, positions, cache, start):
                return model_step(backbone, token_ids, positions, cache, start, mode)
            # The cache (argument 2) is donated: the caller only uses the one returned.
            self._steps[mode] = backends.get().compile_step(self.lm, step, donate_argnums=(2,))
        return self._steps[mode](token_ids, positions, cache, start)

    def function(self, key, fn, donate_argnums=(), others=()):
        """`fn` compiled by the backend once for this model under `key`, and dropped with the
        other steps when the model's variables change. others: further models `fn` runs
        (a speculative loop's draft model), whose variables become inputs too."""
        if others:
            key = (key, tuple(id(v) for m in others for v in m.variables))
        if key not in self._steps:
            holder = _Variables(self.lm, *others) if others else self.lm
            self._steps[key] = backends.get().compile_step(holder, fn,
                                                           donate_argnums=donate_argnums)
        return self._steps[key]

    def greedy_loop(self, tokens, positions, done, cache, start, steps, stop_ids):
        """Up to `steps` greedy decode steps in one compiled call (see `greedy_loop`)."""
        if "greedy_loop" not in self._steps:
            self._steps["greedy_loop"] = backends.get().compile_step(
                self.lm, greedy_loop(self.lm.backbone, pad_id(self.lm)), donate_argnums=(3,))
        return self._steps["greedy_loop"](tokens, positions, done, cache, start, steps,
                                          stop_ids)


class _Variables:
    """Several models' variables as one model's, for `compile_step` (which reads only
    `.variables`)."""

    def __init__(self, *models):
        self.variables = [v for m in models for v in m.variables]
