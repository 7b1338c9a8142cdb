"""Beam search, as transformers 5 searches (`GenerationMixin._beam_search`), so that
`generate(..., sampler="beam", num_beams=k)` returns what transformers' `generate(num_beams=k,
do_sample=False)` returns for the same checkpoint.

How it runs: each prompt is prefilled once, and its cache row copied to its `num_beams`
beams: the decode batch is [batch * num_beams] rows, beam j of prompt b in row b * num_beams
+ j. Each step is one compiled call that gathers the cache rows of the beams chosen at the
previous step (`cache.select_rows`) and then decodes their new tokens, so reordering the
beams never leaves the device and costs no extra dispatch. The choice of beams runs on the
host, in NumPy, on the step's float32 log-softmax, with transformers' arithmetic and order of
operations (float32 sums and divisions), so that its scores and near-ties come out the same.

The search, per step and prompt (transformers' names in brackets):
- every running beam's score plus each token's log-prob gives num_beams x vocab candidates;
  the best `keep` = max(2, 1 + number of stop ids) * num_beams are kept, so that at least
  num_beams of them do not end in a stop id [_get_top_k_continuations];
- the best num_beams candidates that did not just stop (a stop id, or the last new token)
  run on [_get_running_beams_for_next_iteration];
- the candidates among the best num_beams that did stop are scored sum of log-probs /
  (new tokens ** length_penalty) and join the finished hypotheses if they beat the worst of
  the best num_beams so far; none join once the prompt is done [_update_finished_beams];
- a prompt is done when no running beam is expected to beat its worst finished hypothesis:
  scored at its current length (early_stopping False or True), at the longest possible
  length ("never", with a positive length_penalty) [_check_early_stop_heuristic]. The search
  ends when every prompt is done, or with early_stopping=True when every prompt has
  num_beams finished hypotheses, or when every candidate stopped
  [_beam_search_has_unfinished_sequences].
The result per prompt is its finished hypotheses, best first.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import keras
import numpy as np

from gemma_keras.errors import InvalidArgumentError
from gemma_keras.generation import options
from gemma_keras.layers.kv_cache import Mode, select_rows
from gemma_keras.generation.samplers import BeamSampler, GreedySampler, suppress
from gemma_keras.generation.session import GenerationSession, _Row
from gemma_keras.generation.steps import model_step

# transformers' stand-in for minus infinity: added to the scores of candidates that must
# not be chosen, so they sort below every real one yet stay finite.
EXCLUDED = np.float32(-1.0e9)


def plan(sampler, return_beams, args) -> Tuple[object, Optional[BeamSampler]]:
    """(the sampler to decode with, the BeamSampler of a beam search or None), with every
    combination beam search cannot serve refused before anything compiles (args: the
    checked `GenerateOptions`). num_beams=1 is greedy decoding (as in transformers) unless
    all beams are asked for."""
    return_beams = options.flag("return_beams", return_beams)
    if not isinstance(sampler, BeamSampler):
        if return_beams:
            raise InvalidArgumentError("return_beams=True needs beam search: pass num_beams= "
                                       "(or sampler='beam').")
        return sampler, None
    if return_beams or sampler.return_all_beams:
        if sampler.num_beams == 1:
            raise InvalidArgumentError("return_beams needs num_beams >= 2 (num_beams=1 is "
                                       "greedy decoding, which keeps no beams).")
        sampler = BeamSampler(sampler.num_beams, sampler.length_penalty,
                              sampler.early_stopping, return_all_beams=True)
    elif sampler.num_beams == 1:
        return GreedySampler(), None
    for refused, reason in _REFUSED:
        if getattr(args, refused) not in (None, False):
            raise InvalidArgumentError(f"Beam search (num_beams={sampler.num_beams}) does not "
                                       f"take {refused}: {reason}")
    return sampler, sampler


# What beam search cannot serve, each with its own reason and what to do instead.
_REFUSED = (
    ("stream", "it picks the best whole sequences only at the end, so there is nothing to "
               "stream. Drop stream=True, or stream with greedy or sampled decoding."),
    ("stop_strings", "beams end on stop_token_ids only (a stop string can end inside a token, "
                     "after the beam was ranked). Pass the ids as stop_token_ids, or cut the "
                     "returned text at the string."),
    ("repetition_penalty", "gemma_keras's beam search scores each beam by its unchanged "
                           "log-probabilities (as transformers' without logits processors). "
                           "Drop repetition_penalty, or use it with greedy or sampled "
                           "decoding."),
)


@dataclasses.dataclass
class Beams:
    """The search state of a batch, [batch, num_beams] per prompt and beam (NumPy).

    running_*: the beams still decoding (their score: the sum of their tokens' log-probs),
    finished_*: the best finished hypotheses so far (their score: length-penalized), best
    first; a slot never filled scores EXCLUDED. tokens hold the new tokens only,
    [batch, num_beams, max_new_tokens], valid up to the matching length."""

    running_tokens: np.ndarray
    running_scores: np.ndarray
    finished_tokens: np.ndarray
    finished_scores: np.ndarray
    finished_lengths: np.ndarray
    finished: np.ndarray  # whether the slot holds a hypothesis that really ended
    undecided: np.ndarray  # [batch] whether a running beam may still beat the finished ones

    @classmethod
    def start(cls, batch, num_beams, max_new_tokens):
        running_scores = np.zeros((batch, num_beams), "float32")
        # Only beam 0's candidates are considered at the first step: the beams are copies.
        running_scores[:, 1:] = EXCLUDED
        tokens = np.zeros((batch, num_beams, max_new_tokens), "int32")
        return cls(tokens, running_scores, tokens.copy(),
                   np.full((batch, num_beams), EXCLUDED, "float32"),
                   np.zeros((batch, num_beams), "int32"),
                   np.zeros((batch, num_beams), bool), np.ones(batch, bool))


def _top(scores, k):
    """Indices of the k largest of each row of scores [batch, n], largest first; among equal
    scores the lower index first. [batch, k]"""
    if k < scores.shape[1]:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # the k best, unordered
    else:
        part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    chosen = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -chosen), axis=1)
    return np.take_along_axis(part, order, axis=1)


def _take(array, index):
    """array [batch, n, ...] rows chosen per batch by index [batch, k]: [batch, k, ...]."""
    return array[np.arange(array.shape[0])[:, None], index]


def log_softmax(logits):
    """float32 log-softmax over the last axis (transformers' beam scores are float32)."""
    logits = np.asarray(logits, "float32")
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def advance(beams: Beams, log_probs, step, max_new_tokens, stop_ids, sampler: BeamSampler):
    """One step of the search: log_probs [batch * num_beams, vocab] float32 after the running
    beams' tokens, `step` tokens generated so far. Returns (the beam each new running beam
    continues [batch, num_beams], its new token [batch, num_beams], whether the search is
    over)."""
    batch, num_beams = beams.running_scores.shape
    vocab = log_probs.shape[-1]
    keep = max(2, 1 + len(stop_ids)) * num_beams
    scores = (log_probs.reshape(batch, num_beams, vocab)
              + beams.running_scores[:, :, None])  # [batch, beams, vocab]
    scores = scores.reshape(batch, num_beams * vocab)
    top = _top(scores, keep)  # [batch, keep]
    top_scores = np.take_along_axis(scores, top, axis=1)
    source, token = top // vocab, (top % vocab).astype("int32")
    candidates = _take(beams.running_tokens, source)  # [batch, keep, max_new_tokens]
    candidates[:, :, step] = token
    stopped = np.isin(token, list(stop_ids)) | (step + 1 >= max_new_tokens)  # [batch, keep]

    # The best candidates that go on.
    going = top_scores + stopped.astype("float32") * EXCLUDED
    best = _top(going, num_beams)  # [batch, beams]
    beams.running_tokens = _take(candidates, best)
    beams.running_scores = np.take_along_axis(going, best, axis=1)

    # The candidates among the best num_beams that stopped join the finished hypotheses.
    # The same float32 operations as transformers, one at a time: its scores and ties.
    ended = stopped & (np.arange(keep) < num_beams)[None, :]
    penalized = top_scores / np.float32(float(step + 1) ** sampler.length_penalty)
    full = beams.finished.all(axis=1, keepdims=True) & (sampler.early_stopping is True)
    penalized = penalized + full.astype("float32") * EXCLUDED
    penalized = penalized + (~beams.undecided[:, None]).astype("float32") * EXCLUDED
    penalized = penalized + (~ended).astype("float32") * EXCLUDED
    merged = np.concatenate([beams.finished_scores, penalized], axis=1)
    kept = _top(merged, num_beams)
    beams.finished_scores = np.take_along_axis(merged, kept, axis=1)
    beams.finished_tokens = _take(np.concatenate([beams.finished_tokens, candidates], 1), kept)
    beams.finished_lengths = np.take_along_axis(np.concatenate(
        [beams.finished_lengths, np.full((batch, keep), step + 1, "int32")], 1), kept, axis=1)
    beams.finished = np.take_along_axis(np.concatenate([beams.finished, ended], 1), kept, 1)

    # Whether a running beam may still beat the worst finished hypothesis.
    length = (max_new_tokens if sampler.early_stopping == "never"
              and sampler.length_penalty > 0 else step + 1)
    hoped = beams.running_scores[:, :1] / np.float32(float(length) ** sampler.length_penalty)
    worst = np.where(beams.finished, beams.finished_scores.min(axis=1, keepdims=True),
                     EXCLUDED)
    beams.undecided &= np.any(hoped > worst, axis=1)
    over = (not beams.undecided.any()
            or (beams.finished.all() and sampler.early_stopping is True)
            or stopped.all())
    return (np.take_along_axis(source, best, axis=1), np.take_along_axis(token, best, axis=1),
            over)


def _step(backbone):
    """The compiled beam step: the chosen beams' cache rows, then one decode step."""
    def run(cache, rows, token_ids, positions, start):
        # rows: [batch * beams], the row of `cache` each beam continues.
        return model_step(backbone, token_ids, positions, select_rows(cache, rows), start,
                          Mode.DECODE)
    return run


def search(session: GenerationSession, max_new_tokens, sampler: BeamSampler, stop_ids,
           min_new_tokens=0) -> List[List[Tuple[_Row, float]]]:
    """Beam search from the prompts `session` has prefilled: per prompt, its num_beams
    finished hypotheses (a row: the prompt and the new tokens, the stop id included) and
    their scores, best first. Its rows get their best hypothesis."""
    batch, num_beams = len(session.rows), sampler.num_beams
    steps = session.steps
    # Every beam of a prompt starts as a copy of its prefilled row.
    copies = np.repeat(np.arange(batch, dtype="int32"), num_beams)
    cache = steps.function("select_rows", select_rows, donate_argnums=(0,))(
        session.cache, copies)
    logits = session.logits[copies]  # [batch * beams, vocab]
    decode = steps.function("beam_step", _step(session.lm.backbone), donate_argnums=(0,))
    beams = Beams.start(batch, num_beams, max_new_tokens)
    offsets = np.arange(batch)[:, None] * num_beams  # [batch, 1]: each prompt's first row
    positions = np.repeat(session.next_position, num_beams)[:, None]  # [batch * beams, 1]
    for step in range(max_new_tokens):
        log_probs = log_softmax(logits)
        if step < min_new_tokens and stop_ids:  # transformers' MinNewTokensLength rule
            log_probs = suppress(log_probs, list(range(len(log_probs))), sorted(stop_ids))
        source, token, over = advance(beams, log_probs, step, max_new_tokens, stop_ids,
                                      sampler)
        if over:
            break
        logits, cache = decode(cache, (source + offsets).reshape(-1).astype("int32"),
                               token.reshape(-1, 1), positions + step,
                               np.asarray(session.column + step, "int32"))
        logits = np.asarray(keras.ops.convert_to_numpy(logits), "float32")
    session.adopt_cache(cache)
    ranked = []
    for b, row in enumerate(session.rows):
        hypotheses = [(_Row(row.prompt, beams.finished_tokens[b, j, :n].tolist(), True),
                       float(beams.finished_scores[b, j]))
                      for j, n in enumerate(beams.finished_lengths[b])]
        session.finish_row(b, hypotheses[0][0].generated)
        ranked.append(hypotheses)
    return ranked
