"""Scores of given text: keras-hub's `score`, and the log-likelihoods evaluation harnesses ask
for (`loglikelihood`, `loglikelihood_rolling`), computed as lm-evaluation-harness computes them
for a Hugging Face model, so the numbers are comparable with published ones.

How `loglikelihood` runs: each request is (context ids, continuation ids). The model reads
context + continuation less the last token, and the continuation's log-probability is summed
over the logits of its own positions. Requests are grouped by what precedes the scored
positions (in multiple-choice tasks, every choice of a question shares its context): a batch
prefills each distinct context once into a KV cache, copies the cache row to every
continuation of that context, and runs all continuations in one EXTEND pass over it, which
returns only the target tokens' log-probabilities and whether each was the argmax. Shapes are
bucketed (contexts to powers of two from 16, continuations from 4, groups to powers of two),
so a task compiles a handful of functions, not one per request.
"""

from __future__ import annotations

import itertools
from typing import List, Optional, Sequence, Tuple

import keras
import numpy as np
from keras import ops

from gemma_keras.errors import ArgumentTypeError, InvalidArgumentError
from gemma_keras.generation import options
from gemma_keras.layers.kv_cache import Mode, init_cache, select_rows
from gemma_keras.generation.session import power_of_two_bucket, prompt_bucket
from gemma_keras.generation.steps import model_step, pad_id

SCORING_MODES = ("logits", "loss")
MIN_CONTINUATION_BUCKET = 4
DEFAULT_BATCH_SIZE = 16


# ---- score: keras-hub's signature and meaning ------------------------------------------------
def score(lm, token_ids, padding_mask=None, scoring_mode="logits", layer_intercept_fn=None,
          target_ids=None):
    """See `GemmaCausalLM.score`."""
    if not isinstance(scoring_mode, str) or scoring_mode not in SCORING_MODES:
        raise InvalidArgumentError(
            f"scoring_mode must be one of {SCORING_MODES}, got {scoring_mode!r}.")
    if layer_intercept_fn is not None and not callable(layer_intercept_fn):
        raise ArgumentTypeError(f"layer_intercept_fn must be a function f(x, i) or None, got "
                                f"{type(layer_intercept_fn).__name__}.")
    vocab = lm.backbone.config.vocabulary_size
    token_ids = _id_input("token_ids", token_ids, vocab)
    padding_mask = _id_input("padding_mask", padding_mask, None, mask=True)
    target_ids = _id_input("target_ids", target_ids, vocab)
    if scoring_mode == "loss" and target_ids is None:
        raise InvalidArgumentError(
            "scoring_mode='loss' needs target_ids ([batch, num_tokens], the token each "
            "position should predict, e.g. keras.ops.roll(token_ids, -1, axis=1)).")
    shape = tuple(ops.shape(token_ids))
    if len(shape) != 2:
        raise InvalidArgumentError(f"token_ids must be [batch, num_tokens], got shape {shape}.")
    if padding_mask is None:
        padding_mask = ops.ones(shape, "int32")
    for name, value in (("padding_mask", padding_mask), ("target_ids", target_ids)):
        if value is not None and tuple(ops.shape(value)) != shape:
            raise InvalidArgumentError(f"{name} must have token_ids' shape {shape}, got "
                                       f"{tuple(ops.shape(value))}.")
    backbone = lm.backbone

    def logits_of(token_ids, padding_mask, intercept=None):
        hidden = backbone({"token_ids": token_ids, "padding_mask": padding_mask},
                          layer_intercept_fn=intercept)
        return backbone.logits(hidden)  # [batch, num_tokens, vocab], soft-capped

    if layer_intercept_fn is not None:
        # Eager: the hook may record activations or watch them in a gradient tape.
        logits = logits_of(token_ids, padding_mask, layer_intercept_fn)
        return logits if scoring_mode == "logits" else token_losses(logits, target_ids)
    steps = lm.compiled_steps()
    if scoring_mode == "logits":
        return steps.function("score_logits", logits_of)(_ints(token_ids), _ints(padding_mask))
    run = steps.function("score_loss", lambda ids, mask, targets: token_losses(
        logits_of(ids, mask), targets))
    return run(_ints(token_ids), _ints(padding_mask), _ints(target_ids))


def _id_input(name, value, vocab, mask=False):
    """score()'s id arrays checked: a NumPy array, nested lists or a backend tensor of
    integers (a mask: of numbers or bools); host values also within [0, vocab). Returns host values
    as a NumPy array, tensors as they are (reading them back would cost a device sync)."""
    if value is None:
        return None if name != "token_ids" else _refuse(name, value)
    if isinstance(value, (str, bytes, dict)) or np.isscalar(value):
        return _refuse(name, value)
    if isinstance(value, (list, tuple, np.ndarray)):
        try:
            array = np.asarray(value)
        except ValueError:  # ragged nesting
            raise ArgumentTypeError(
                f"{name} must be a [batch, num_tokens] array; its rows have different "
                "lengths: pad them to one length (and pass padding_mask).") from None
        if array.dtype.kind in "OUS":
            return _refuse(name, value)
        kind = array.dtype.kind
    elif hasattr(value, "shape") and hasattr(value, "dtype"):  # a tensor of any backend
        array = None
        dtype = keras.backend.standardize_dtype(value.dtype)
        kind = "b" if dtype == "bool" else "i" if "int" in dtype else "f"
    else:
        return _refuse(name, value)
    if kind not in ("iubf" if mask else "iu"):
        raise ArgumentTypeError(f"{name} must hold {'0/1 or bools' if mask else 'integer ids'}, "
                                f"got {value.dtype if array is None else array.dtype} values.")
    if array is None:
        return value
    if vocab is not None and array.size and not 0 <= array.min() <= array.max() < vocab:
        raise InvalidArgumentError(f"{name} must be in [0, {vocab}) (the model's vocabulary), "
                                   f"found {array.min()}..{array.max()}.")
    return array


def _refuse(name, value):
    text = (" Tokenize text first: np.array([lm.tokenizer.tokenize(text, add_bos=True)])."
            if name != "padding_mask" and (isinstance(value, (str, bytes)) or (
                isinstance(value, (list, tuple)) and value
                and isinstance(value[0], (str, bytes)))) else "")
    raise ArgumentTypeError(f"{name} must be token ids [batch, num_tokens] (a NumPy array or "
                            f"tensor of ints), got {type(value).__name__} {value!r:.60}.{text}")


def _ints(x):
    """An int32 host array (or tensor, left on its device) for a compiled function."""
    if isinstance(x, (np.ndarray, list, tuple)) or np.isscalar(x):
        return np.asarray(x).astype("int32")
    return ops.cast(x, "int32")


def token_losses(logits, target_ids):
    """Per-token cross-entropy [batch, num_tokens] of `target_ids` under `logits`, in float32
    (keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None))."""
    return -_target_log_probs(logits, target_ids)


def _target_log_probs(logits, targets):
    """log softmax(logits)[target] in float32: [batch, len]. The target's logit less the
    log-sum-exp: no [batch, len, vocab] array of log-probabilities is written (eager torch
    would write one; 256k-token vocabularies make it the largest array of the pass)."""
    logits = ops.cast(logits, "float32")
    targets = ops.cast(targets, "int32")[..., None]  # [batch, len, 1]
    chosen = ops.take_along_axis(logits, targets, axis=-1)[..., 0]  # [batch, len]
    return chosen - ops.logsumexp(logits, axis=-1)


# ---- lm-evaluation-harness' tokenization of a request ---------------------------------------
def encode_request(tokenizer, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits a request for a Hugging
    Face Gemma: trailing spaces of the context move to the continuation, both are tokenized
    together and split where the context's own tokens end, and the context starts with
    <bos>. An empty context is <bos> alone."""
    for name, value in (("context", context), ("continuation", continuation)):
        if not isinstance(value, str):
            raise ArgumentTypeError(f"A loglikelihood request is (context, continuation), two "
                                    f"strings; its {name} is {type(value).__name__}.")
    if context == "":
        continuation_ids = tokenizer.tokenize(continuation)
        if continuation_ids[:1] == [tokenizer.bos_token_id]:
            return continuation_ids[:1], continuation_ids[1:]
        return [tokenizer.bos_token_id], continuation_ids
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.tokenize(context + continuation, add_bos=True)
    context_ids = tokenizer.tokenize(context, add_bos=True)
    return context_ids, whole[len(context_ids):]


def rolling_windows(tokens: Sequence[int], prefix: int, max_length: int):
    """[(context ids, continuation ids)] covering `tokens` in windows of at most `max_length`
    tokens: the first predicts tokens[0] from `prefix`; each later window predicts the next
    tokens from as many preceding ones as fit (lm-evaluation-harness' rolling windows with
    context_len=1, made disjoint). Every token is predicted exactly once."""
    tokens = list(tokens)
    windows = []
    first = min(max_length, len(tokens))
    if first:
        windows.append(([prefix], tokens[:first]))
    done = first
    while done < len(tokens):
        end = min(len(tokens), done + max_length)
        # end > max_length here, so the slice starts at 0 or later.
        windows.append((tokens[end - max_length - 1:done], tokens[done:end]))
        done = end
    return windows


# ---- log-likelihoods of continuations ---------------------------------------------------------
def loglikelihood_tokens(lm, requests, batch_size: int = DEFAULT_BATCH_SIZE,
                         max_length: Optional[int] = None, progress=None):
    """requests: [(context ids, continuation ids)] -> [(sum of the continuation's log-probs,
    whether greedy decoding gives the continuation)], in the requests' order.

    Sequences longer than `max_length` + 1 (default: the model's context) lose their oldest
    tokens, as lm-evaluation-harness truncates them. `progress`: an optional callable told how
    many requests each batch finished (a progress bar's `update`)."""
    config = lm.backbone.config
    max_length = config.max_sequence_length if max_length is None else max_length
    batch_size = _positive("batch_size", batch_size)
    max_length = _positive("max_length", max_length)
    rows = [_fed_row(i, context, continuation, max_length, config.vocabulary_size)
            for i, (context, continuation) in enumerate(_pairs(requests))]
    # Longest contexts first (tight buckets, and the slowest batch compiles first); each
    # context's continuations together, so the batch prefills it once.
    rows.sort(key=lambda r: (-len(r.prefix), r.prefix, -len(r.chunk)))
    results = [None] * len(rows)
    for batch in _batches(rows, batch_size):
        for row, value in zip(batch, _score_batch(lm, batch, batch_size)):
            results[row.index] = value
        if progress is not None:
            progress(len(batch))
    return results


class _Row:
    """One request as the model reads it: `prefix` (prefilled, shared), then `chunk` (the
    tokens whose logits score `targets`)."""

    def __init__(self, index, prefix, chunk, targets):
        self.index, self.prefix, self.chunk, self.targets = index, prefix, chunk, targets


def _pairs(requests):
    if isinstance(requests, (str, bytes)) or not isinstance(requests, (list, tuple)):
        raise ArgumentTypeError(f"requests must be a list of (context, continuation) pairs, "
                                f"got {type(requests).__name__}.")
    for i, pair in enumerate(requests):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise ArgumentTypeError(f"requests[{i}] must be a (context, continuation) pair, "
                                    f"got {pair!r:.80}.")
        yield pair


def _fed_row(index, context, continuation, max_length, vocabulary_size):
    try:
        context, continuation = ([_whole(t) for t in context], [_whole(t) for t in continuation])
    except (TypeError, ValueError):
        raise ArgumentTypeError(f"requests[{index}] must be (context ids, continuation ids), "
                                f"two lists of ints, got {context!r:.40} and "
                                f"{continuation!r:.40}.") from None
    if not context or not continuation:
        raise InvalidArgumentError(
            f"requests[{index}]: context and continuation must each hold at least one token "
            f"(start the context with <bos>).")
    if not 0 <= min(context + continuation) <= max(context + continuation) < vocabulary_size:
        raise InvalidArgumentError(f"requests[{index}]: token ids must be in "
                                   f"[0, {vocabulary_size}).")
    if len(continuation) > max_length:
        raise InvalidArgumentError(
            f"requests[{index}]: the continuation has {len(continuation)} tokens, more than "
            f"the {max_length} the model reads at once.")
    whole = (context + continuation)[-(max_length + 1):]
    fed, n = whole[:-1], len(continuation)
    return _Row(index, tuple(fed[: len(fed) - n]), fed[len(fed) - n:], whole[-n:])


def _whole(value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(value)
    return int(value)


def _batches(rows, batch_size):
    """Consecutive rows in batches of at most `batch_size`, a context's rows kept together
    unless they alone exceed a batch."""
    batch = []
    for _, group in itertools.groupby(rows, key=lambda r: r.prefix):
        group = list(group)
        if batch and len(batch) + len(group) > batch_size:
            yield batch
            batch = []
        while len(group) > batch_size:
            yield group[:batch_size]
            group = group[batch_size:]
        batch += group
    if batch:
        yield batch


def _score_batch(lm, batch, batch_size):
    """[(log-prob sum, is_greedy)] for the rows of one batch."""
    config = lm.backbone.config
    pad = pad_id(lm)
    prefixes = list(dict.fromkeys(r.prefix for r in batch))  # distinct, in order
    group_of = {p: g for g, p in enumerate(prefixes)}
    longest_prefix = max(len(p) for p in prefixes)
    width = prompt_bucket(longest_prefix, config.max_sequence_length) if longest_prefix else 0
    longest_chunk = max(len(r.chunk) for r in batch)
    chunk_width = min(power_of_two_bucket(longest_chunk, MIN_CONTINUATION_BUCKET),
                      config.max_sequence_length)
    groups = power_of_two_bucket(len(prefixes))
    rows = min(power_of_two_bucket(len(batch)), power_of_two_bucket(batch_size))
    steps = lm.compiled_steps()
    cache = init_cache(config, groups, width + chunk_width,
                       lm.backbone.dtype_policy.compute_dtype)
    if width:
        # Contexts right-aligned (left padding), positions 0.. over their real tokens.
        ids = np.full((groups, width), pad, "int32")
        positions = np.full((groups, width), -1, "int32")
        for g, prefix in enumerate(prefixes):
            if prefix:
                ids[g, width - len(prefix):] = prefix
                positions[g, width - len(prefix):] = np.arange(len(prefix))
        _, cache = steps(Mode.PREFILL, ids, positions, cache, np.asarray(0, "int32"))
    # Continuations left-aligned after their context (right padding), with its row of the
    # cache; padding rows read group 0 and are dropped.
    ids = np.full((rows, chunk_width), pad, "int32")
    positions = np.full((rows, chunk_width), -1, "int32")
    targets = np.zeros((rows, chunk_width), "int32")
    source = np.zeros(rows, "int32")
    for r, row in enumerate(batch):
        n = len(row.chunk)
        ids[r, :n], targets[r, :n] = row.chunk, row.targets
        positions[r, :n] = len(row.prefix) + np.arange(n)
        source[r] = group_of[row.prefix]
    log_probs, greedy = steps.function("continuations", _continuations(lm.backbone))(
        cache, source, ids, positions, targets, np.asarray(width, "int32"))
    log_probs = np.asarray(keras.ops.convert_to_numpy(log_probs), "float64")
    greedy = np.asarray(keras.ops.convert_to_numpy(greedy))
    return [(float(log_probs[r, : len(row.chunk)].sum()), bool(greedy[r, : len(row.chunk)].all()))
            for r, row in enumerate(batch)]


def _continuations(backbone):
    def run(cache, source, ids, positions, targets, start):
        # cache: [groups, ...] per buffer; source: [rows], the group each row continues.
        cache = select_rows(cache, source)
        logits, _ = model_step(backbone, ids, positions, cache, start, Mode.EXTEND,
                               logits="all")  # [rows, chunk, vocab]
        greedy = ops.cast(ops.argmax(logits, axis=-1), "int32") == targets  # [rows, chunk]
        return _target_log_probs(logits, targets), greedy
    return run


def _positive(name, value):
    return options.whole_number(name, value.item() if isinstance(value, np.generic) else value,
                                1)


# ---- text requests ----------------------------------------------------------------------------
def loglikelihood(lm, requests, batch_size=DEFAULT_BATCH_SIZE, progress=None):
    """See `GemmaCausalLM.loglikelihood`."""
    tokenizer = _tokenizer(lm)
    pairs = [encode_request(tokenizer, *pair) for pair in _pairs(requests)]
    return loglikelihood_tokens(lm, pairs, batch_size=batch_size, progress=progress)


def loglikelihood_rolling(lm, texts, batch_size=DEFAULT_BATCH_SIZE, max_length=None,
                          progress=None):
    """See `GemmaCausalLM.loglikelihood_rolling`."""
    tokenizer = _tokenizer(lm)
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise ArgumentTypeError(f"texts must be a list of strings, got "
                                f"{type(texts).__name__}.")
    max_length = lm.backbone.config.max_sequence_length if max_length is None else max_length
    max_length = _positive("max_length", max_length)
    windows, owner = [], []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ArgumentTypeError(f"texts[{i}] must be a string, got {type(text).__name__}.")
        for window in rolling_windows(tokenizer.tokenize(text), tokenizer.bos_token_id,
                                      max_length):
            windows.append(window)
            owner.append(i)
    totals = [0.0] * len(texts)
    scores = loglikelihood_tokens(lm, windows, batch_size, max_length, progress)
    for i, (value, _) in zip(owner, scores):
        totals[i] += value
    return totals


def _tokenizer(lm):
    if lm.tokenizer is None:
        raise InvalidArgumentError("This model has no tokenizer: score token ids with "
                                   "`gemma_keras.evaluation.loglikelihood_tokens`.")
    return lm.tokenizer
