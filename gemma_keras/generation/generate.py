"""The decode loop: prefill the prompt in one pass, then one compiled step per token.

What compiles when: one prefill function per (batch, prompt bucket, cache bucket) and one
decode step per (batch, cache bucket). Prompts are left-padded to a power-of-two bucket (at
least 16) and the cache to a multiple of 128 columns, so a new prompt length reuses an
existing compilation unless it crosses a bucket boundary.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, List, Sequence

import keras
import numpy as np
from keras import ops

from gemma_keras.errors import ArgumentTypeError, InvalidArgumentError
from gemma_keras.generation import options
from gemma_keras.generation.cache import init_cache
from gemma_keras.generation.compile import compile_step, loops_compile
from gemma_keras.generation.options import Decoding
from gemma_keras.generation.samplers import (Sampler, build_sampler,
                                             check_repetition_penalty)
from gemma_keras.tokenizer import format_chat

DEFAULT_MAX_NEW_TOKENS = 128
MIN_PROMPT_BUCKET = 16
CACHE_BUCKET = 128


def prompt_bucket(length: int, limit: int) -> int:
    bucket = MIN_PROMPT_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, max(limit, length))


def cache_bucket(columns: int, limit: int) -> int:
    return min(-(-columns // CACHE_BUCKET) * CACHE_BUCKET, max(limit, columns))


class CompiledSteps:
    """The compiled model steps of one GemmaCausalLM, created on first use and kept."""

    def __init__(self, lm):
        self.lm = lm
        self._steps = {}

    def __call__(self, mode, token_ids, positions, cache, start):
        if mode not in self._steps:
            self._steps[mode] = compile_step(self.lm, self._step_fn(mode), donate_argnums=(2,))
        return self._steps[mode](token_ids, positions, cache, start)

    def greedy_loop(self, tokens, positions, done, cache, start, steps, stop_ids):
        """Up to `steps` greedy decode steps in one compiled call (see `_greedy_loop_fn`)."""
        if "greedy_loop" not in self._steps:
            self._steps["greedy_loop"] = compile_step(self.lm, self._greedy_loop_fn(),
                                                      donate_argnums=(3,))
        return self._steps["greedy_loop"](tokens, positions, done, cache, start, steps,
                                          stop_ids)

    def _step_fn(self, mode):
        backbone = self.lm.backbone

        def step(token_ids, positions, cache, start):
            hidden, cache = backbone({"token_ids": token_ids, "positions": positions},
                                     cache=cache, start=start, mode=mode)
            # Only the last column's logits are needed: [batch, vocab]
            return ops.cast(backbone.logits(hidden[:, -1:, :])[:, 0, :], "float32"), cache
        return step

    def _greedy_loop_fn(self):
        tokenizer = self.lm.tokenizer
        pad = tokenizer.pad_token_id if tokenizer is not None else 0
        return greedy_loop_fn(self.lm.backbone, pad)


def greedy_loop_fn(backbone, pad):
    """Greedy decoding as a loop inside the compiled function, so the host dispatches once
    per `generate` instead of once per token (on CPU that dispatch, the logits copy and the
    bookkeeping were 10-20% of a step). Same semantics as the host loop of
    `GenerationSession.decode`: a finished row is fed a padding slot (position -1), and the
    loop ends early once every row has hit a stop id. Exported SavedModels run it too."""

    def loop(tokens, positions, done, cache, start, steps, stop_ids):
        # tokens, positions, done: [batch], the next token to feed per row, its position
        # and whether the row has finished; stop_ids: [n] (padded with -1).
        # Returns (new tokens [batch, slots], steps run, cache, next positions).
        batch = ops.shape(tokens)[0]
        slots = cache["global"]["positions"].shape[1] or ops.shape(cache["global"]["positions"])[1]
        out = ops.zeros((batch, slots), "int32")

        def cond(i, tokens, positions, done, out, cache):
            return ops.logical_and(i < steps, ops.logical_not(ops.all(done)))

        def body(i, tokens, positions, done, out, cache):
            feed = ops.where(done, pad, tokens)[:, None]        # [batch, 1]
            fed_at = ops.where(done, -1, positions)[:, None]   # [batch, 1]
            hidden, cache = backbone({"token_ids": feed, "positions": fed_at},
                                     cache=cache, start=start + i, mode="decode")
            logits = ops.cast(backbone.logits(hidden)[:, 0, :], "float32")
            new = ops.cast(ops.argmax(logits, axis=-1), "int32")  # [batch]
            out = ops.slice_update(out, [0, i], new[:, None])
            positions = ops.where(done, positions, positions + 1)
            done = ops.logical_or(done, ops.any(new[:, None] == stop_ids[None, :], axis=-1))
            return i + 1, new, positions, done, out, cache

        i, _, positions, _, out, cache = ops.while_loop(
            cond, body, (ops.zeros((), "int32"), tokens, positions, done, out, cache))
        return out, i, cache, positions
    return loop


@dataclasses.dataclass
class _Row:
    prompt: List[int]  # everything the row's context held before this decoding
    generated: List[int] = dataclasses.field(default_factory=list)
    done: bool = False


class GenerationSession:
    """A batch being decoded: the cache, the next column, and each row's tokens.

    `GemmaCausalLM.generate` runs one to completion; a chat keeps one alive across turns and
    extends it with each new message instead of re-reading the conversation.
    """

    def __init__(self, lm, prompts: Sequence[Sequence[int]], total_columns: int):
        self.lm = lm
        self.steps = lm._compiled_steps()
        config = lm.backbone.config
        self.rows = [_Row(list(p)) for p in prompts]
        width = prompt_bucket(max(len(p) for p in prompts), config.max_sequence_length)
        # Columns: the padded prompt, then one per new token.
        self.capacity = cache_bucket(width + total_columns - max(len(p) for p in prompts),
                                     config.max_sequence_length)
        self.cache = init_cache(config, len(prompts), self.capacity,
                                lm.backbone.dtype_policy.compute_dtype)
        self.column = 0  # next free column
        self.next_position = np.zeros(len(prompts), "int32")
        self.logits = self._feed([list(p) for p in prompts], mode="prefill")

    def _feed(self, chunks, mode):
        """Feeds one chunk per row, left-padded to a common bucketed width; returns the logits
        [batch, vocab] after each row's last token."""
        width = prompt_bucket(max(len(c) for c in chunks), self.capacity) if mode != "decode" else 1
        if self.column + width > self.capacity:
            raise InvalidArgumentError(
                f"The conversation needs {self.column + width} cache columns but this session "
                f"holds {self.capacity}; start a new one with a larger max_length.")
        pad = self.lm.tokenizer.pad_token_id if self.lm.tokenizer is not None else 0
        ids = np.full((len(chunks), width), pad, "int32")
        positions = np.full((len(chunks), width), -1, "int32")
        for r, chunk in enumerate(chunks):
            if chunk:
                ids[r, width - len(chunk):] = chunk
                positions[r, width - len(chunk):] = self.next_position[r] + np.arange(len(chunk))
                self.next_position[r] += len(chunk)
        logits, self.cache = self.steps(mode, ids, positions, self.cache,
                                        np.asarray(self.column, "int32"))
        self.column += width
        return np.asarray(keras.ops.convert_to_numpy(logits), "float32")

    def extend(self, chunks):
        """Appends tokens (one list per row) after what the cache holds."""
        self.logits = self._feed(chunks, mode="extend")

    def step(self, tokens):
        """Feeds one sampled token per row (finished rows get a padding slot)."""
        chunks = [[t] if not row.done else [] for row, t in zip(self.rows, tokens)]
        self.logits = self._feed(chunks, mode="decode")

    def decode(self, max_new_tokens, decoding, rng, on_token=None):
        """Chooses up to max_new_tokens per row with `decoding` (a `Decoding`, or a bare
        Sampler with no stop ids), stopping rows at a stop id (kept in `generated`);
        `on_token(row_index)` is called after each row gets a token."""
        if isinstance(decoding, Sampler):
            decoding = Decoding(decoding, set())
        stop_ids = decoding.stop_ids
        on_device = on_token is None and loops_compile()
        for i in range(max_new_tokens):
            tokens = decoding.select(self.logits, self.rows, rng)
            self._record(tokens, stop_ids, on_token)
            if all(row.done for row in self.rows) or i == max_new_tokens - 1:
                return
            # The rest in one compiled loop, once no host-side rule is left to apply
            # (min_new_tokens reached, no repetition penalty).
            if on_device and decoding.compiled_loop_can_finish(self.rows):
                return self._greedy_on_device(tokens, max_new_tokens - 1 - i, stop_ids)
            self.step(tokens)

    def _record(self, tokens, stop_ids, on_token=None):
        for r, (row, token) in enumerate(zip(self.rows, tokens)):
            if row.done:
                continue
            row.generated.append(int(token))
            row.done = int(token) in stop_ids
            if on_token is not None:
                on_token(r)

    def _greedy_on_device(self, tokens, steps, stop_ids):
        """The rest of a greedy `decode` as one compiled loop: feeds `tokens` and decodes up
        to `steps` more tokens per row."""
        if self.column + steps > self.capacity:
            raise InvalidArgumentError(
                f"Decoding {steps} more tokens needs {self.column + steps} cache columns but "
                f"this session holds {self.capacity}.")
        stops = np.full(-(-max(len(stop_ids), 1) // 8) * 8, -1, "int32")  # fixed shape
        stops[: len(stop_ids)] = sorted(stop_ids)
        done = np.array([row.done for row in self.rows])
        out, count, self.cache, positions = self.steps.greedy_loop(
            np.asarray(tokens, "int32"), self.next_position.copy(), done, self.cache,
            np.asarray(self.column, "int32"), np.asarray(steps, "int32"), stops)
        count = int(keras.ops.convert_to_numpy(count))
        out = np.asarray(keras.ops.convert_to_numpy(out))
        self.column += count
        self.next_position = np.asarray(keras.ops.convert_to_numpy(positions), "int32")
        self.logits = None  # the loop keeps its logits; only chat (host loop) needs them
        for j in range(count):
            self._record(out[:, j], stop_ids)


def resolve_stop_ids(lm, stop_token_ids) -> set:
    tokenizer = lm.tokenizer
    if isinstance(stop_token_ids, str) and stop_token_ids == "auto":
        if tokenizer is None:
            raise InvalidArgumentError(
                "stop_token_ids='auto' needs the model's tokenizer; pass ids.")
        ids = {tokenizer.eos_token_id}
        # Instruct models end their turn with <end_of_turn>. When we cannot tell whether the
        # model is instruction-tuned (a plain local directory), stopping there is harmless.
        if lm.instruct is not False and tokenizer.end_of_turn_id is not None:
            ids.add(tokenizer.end_of_turn_id)
        return ids
    if stop_token_ids is None:
        return set()
    if isinstance(stop_token_ids, (str, bytes)) or not isinstance(
            stop_token_ids, (list, tuple, set, frozenset, np.ndarray)):
        raise ArgumentTypeError(f"stop_token_ids must be 'auto', None or a list of token ids, "
                                f"got {stop_token_ids!r}.")
    return {options.whole_number("stop_token_ids[i]", i.item() if isinstance(i, np.generic)
                                 else i, 0) for i in stop_token_ids}


_INPUT_FORMS = ("generate() takes a string, a list of strings, or the dict "
                "{'token_ids', 'padding_mask'}")


def uses_chat_template(lm, chat_template, text):
    """Whether a string prompt is sent as one user turn in Gemma's chat format.

    "auto": yes for an instruct model (`lm.instruct is True`), unless the text already has
    turn markers (written by the caller) or is empty (an empty prompt is <bos> alone).
    """
    if chat_template == "auto":
        return lm.instruct is True and text != "" and "<start_of_turn>" not in text
    return chat_template


def prepare_prompts(lm, inputs, chat_template="auto"):
    """(token lists, kind, texts) where kind is "text", "batch" or "ids" and texts are the
    prompt strings as given (None for ids)."""
    if isinstance(inputs, dict):
        if "token_ids" not in inputs:
            raise InvalidArgumentError("Pre-tokenized input must be a dict with 'token_ids' "
                                       "and 'padding_mask'.")
        ids = np.asarray(keras.ops.convert_to_numpy(inputs["token_ids"]))
        mask = inputs.get("padding_mask")
        # A bool mask: an int one would index rows by position instead of selecting tokens.
        mask = (np.ones_like(ids, bool) if mask is None
                else np.asarray(keras.ops.convert_to_numpy(mask)).astype(bool))
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise InvalidArgumentError(
                f"token_ids must be [batch, length] with a padding_mask of the same shape; "
                f"got {ids.shape} and {mask.shape}.")
        if ids.dtype.kind not in "iu":
            raise ArgumentTypeError(f"token_ids must be integers, got dtype {ids.dtype}.")
        vocab = lm.backbone.config.vocabulary_size
        if ids[mask].size and not (0 <= ids[mask].min() and ids[mask].max() < vocab):
            raise InvalidArgumentError(
                f"token_ids must be in [0, {vocab}) (the model's vocabulary), found "
                f"{ids[mask].min()}..{ids[mask].max()}.")
        prompts = [row[m].tolist() for row, m in zip(ids, mask)]
        kind, texts = "ids", None
    else:
        if inputs is None or not isinstance(inputs, (str, list, tuple, np.ndarray)):
            raise ArgumentTypeError(f"{_INPUT_FORMS}; got {_describe(inputs)}.")
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        bad = [t for t in texts if not isinstance(t, str)]
        if bad:
            raise ArgumentTypeError(f"{_INPUT_FORMS}; the list holds {_describe(bad[0])}.")
        if lm.tokenizer is None:
            raise InvalidArgumentError("This model has no tokenizer: pass pre-tokenized input "
                                       "{'token_ids', 'padding_mask'}.")
        if chat_template is True and lm.tokenizer.start_of_turn_id is None:
            raise InvalidArgumentError("chat_template=True needs a tokenizer with Gemma's "
                                       "<start_of_turn> and <end_of_turn> pieces; this one "
                                       "has none.")
        # Every Gemma sequence starts with <bos>; an empty prompt is just <bos>.
        prompts = [lm.tokenizer.tokenize(
            format_chat([("user", t)]) if uses_chat_template(lm, chat_template, t) else t,
            add_bos=True) for t in texts]
        kind = "text" if isinstance(inputs, str) else "batch"
    if not prompts:
        raise InvalidArgumentError("generate() got an empty batch: pass at least one prompt.")
    if any(len(p) == 0 for p in prompts):
        raise InvalidArgumentError("A pre-tokenized prompt has no tokens (its padding_mask is "
                                   "all zero); start each prompt with <bos>.")
    return prompts, kind, texts


def _describe(value):
    return "None" if value is None else f"{type(value).__name__} {value!r:.60}"


def plan_lengths(lm, prompts, max_length, max_new_tokens):
    """Validated number of new tokens to generate."""
    limit = lm.backbone.config.max_sequence_length
    longest = max(len(p) for p in prompts)
    if longest > limit:
        raise InvalidArgumentError(f"The longest prompt has {longest} tokens, more than the "
                                   f"model's context of {limit}; shorten it.")
    if max_length is not None and max_new_tokens is not None:
        raise InvalidArgumentError("Pass max_length (prompt + new tokens) or max_new_tokens, "
                                   "not both.")
    if max_length is not None:
        if max_length <= longest:
            raise InvalidArgumentError(
                f"max_length={max_length} leaves no room to generate: the longest prompt "
                f"already has {longest} tokens. Use max_new_tokens.")
        new = max_length - longest
    else:
        new = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    if longest + new > limit:
        raise InvalidArgumentError(f"{longest} prompt tokens + {new} new tokens exceed the "
                                   f"model's context of {limit}; lower max_new_tokens.")
    return new


def check_arguments(max_length=None, max_new_tokens=None, min_new_tokens=0, seed=None,
                    stream=False, stop_strings=None, repetition_penalty=None,
                    chat_template="auto", include_prompt=True, skip_special_tokens=True):
    """The scalar arguments of generate, checked and normalized before any work."""
    return dict(
        max_length=options.whole_number("max_length", max_length, 1),
        max_new_tokens=options.whole_number("max_new_tokens", max_new_tokens, 1),
        min_new_tokens=options.whole_number("min_new_tokens", min_new_tokens, 0),
        seed=options.seed_value(seed),
        stream=options.flag("stream", stream),
        stop_strings=options.stop_strings_value(stop_strings),
        repetition_penalty=check_repetition_penalty(repetition_penalty),
        chat_template=options.chat_template_value(chat_template),
        include_prompt=options.flag("include_prompt", include_prompt),
        skip_special_tokens=options.flag("skip_special_tokens", skip_special_tokens))


def _completion_text(tokenizer, row: _Row, stop_ids, stop_strings, skip_special=True):
    ids = row.generated[:-1] if row.generated and row.generated[-1] in stop_ids else row.generated
    text = tokenizer.detokenize(ids, skip_special=skip_special) if ids else ""
    for s in stop_strings or ():
        cut = text.find(s)
        if cut >= 0:
            text = text[:cut]
    return text


def generate(lm, inputs, max_length=None, max_new_tokens=None, sampler=None,
             stop_token_ids="auto", seed=None, stream=False, stop_strings=None, *,
             temperature=None, top_k=None, top_p=None, min_new_tokens=0,
             repetition_penalty=None, chat_template="auto", include_prompt=True,
             skip_special_tokens=True):
    # Everything is checked before the first compilation or cache allocation.
    args = check_arguments(max_length, max_new_tokens, min_new_tokens, seed, stream,
                           stop_strings, repetition_penalty, chat_template, include_prompt,
                           skip_special_tokens)
    sampler = build_sampler(sampler, temperature=temperature, top_k=top_k, top_p=top_p)
    prompts, kind, texts = prepare_prompts(lm, inputs, args["chat_template"])
    new = plan_lengths(lm, prompts, args["max_length"], args["max_new_tokens"])
    if args["min_new_tokens"] > new:
        raise InvalidArgumentError(f"min_new_tokens={args['min_new_tokens']} is more than the "
                                   f"{new} new tokens asked for; raise max_new_tokens.")
    stop_ids = resolve_stop_ids(lm, stop_token_ids)
    stop_strings = args["stop_strings"]
    if stop_strings and lm.tokenizer is None:
        raise InvalidArgumentError("stop_strings need the model's tokenizer.")
    decoding = Decoding(sampler, stop_ids, args["min_new_tokens"], args["repetition_penalty"])
    rng = np.random.default_rng(args["seed"])
    skip_special = args["skip_special_tokens"]
    if args["stream"]:
        if kind != "text":
            raise InvalidArgumentError("stream=True takes one string prompt.")
        return _stream(lm, prompts, new, decoding, rng, stop_strings, skip_special)
    session = GenerationSession(lm, prompts, max(len(p) for p in prompts) + new)
    on_token = None
    if stop_strings:
        def on_token(r):
            row = session.rows[r]
            if any(s in lm.tokenizer.detokenize(row.generated) for s in stop_strings):
                row.done = True
    session.decode(new, decoding, rng, on_token)
    if kind == "ids":
        return _as_ids(lm, session.rows, args["include_prompt"])
    # The prompt exactly as given (not re-detokenized, not the chat-template markup), so
    # `text[len(prompt):]` is always the completion.
    outputs = [(text if args["include_prompt"] else "")
               + _completion_text(lm.tokenizer, row, stop_ids, stop_strings, skip_special)
               for text, row in zip(texts, session.rows)]
    return outputs[0] if kind == "text" else outputs


def _as_ids(lm, rows, include_prompt=True):
    """keras-hub's form: prompt then generated tokens (the stop token included), right-padded;
    without the prompt, the generated tokens alone."""
    pad = lm.tokenizer.pad_token_id if lm.tokenizer is not None else 0
    sequences = [(row.prompt if include_prompt else []) + row.generated for row in rows]
    width = max(len(s) for s in sequences)
    ids = np.full((len(rows), width), pad, "int32")
    mask = np.zeros((len(rows), width), bool)
    for r, s in enumerate(sequences):
        ids[r, : len(s)] = s
        mask[r, : len(s)] = True
    return {"token_ids": ids, "padding_mask": mask}


def _stream(lm, prompts, new, decoding, rng, stop_strings, skip_special) -> Iterator[str]:
    session = GenerationSession(lm, prompts, len(prompts[0]) + new)
    return stream_session(lm, session, new, decoding, rng, stop_strings, skip_special)


def stream_session(lm, session, new, decoding, rng, stop_strings,
                   skip_special=True) -> Iterator[str]:
    """Decodes row 0 of a prefilled session with `decoding` (a `Decoding`), yielding
    completion text as it is decoded.

    Never splits a multi-byte character: text ending in U+FFFD (bytes of a character still
    to come) is held back until the rest arrives or decoding ends.
    """
    tokenizer = lm.tokenizer
    stop_ids = decoding.stop_ids
    row = session.rows[0]
    emitted = ""
    for i in range(new):
        token = int(decoding.select(session.logits, session.rows[:1], rng)[0])
        row.generated.append(token)
        row.done = token in stop_ids
        text = _completion_text(tokenizer, row, stop_ids, stop_strings, skip_special)
        stopped_by_string = any(s in tokenizer.detokenize(row.generated)
                                for s in stop_strings or ())
        final = row.done or stopped_by_string or i == new - 1
        if (final or not text.endswith("\ufffd")) and len(text) > len(emitted):
            yield text[len(emitted):]
            emitted = text
        if final:
            return
        session.step([token])
