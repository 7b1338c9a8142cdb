"""`GemmaCausalLM.generate`: its arguments checked, prompts prepared, a `GenerationSession`
(generation/session.py) run, and its rows turned into the outputs asked for."""

from __future__ import annotations

import keras
import numpy as np

from gemma_keras.errors import ArgumentTypeError, InvalidArgumentError
from gemma_keras.generation import drafting, options
from gemma_keras.generation import beam
from gemma_keras.generation.options import Decoding, GenerateOptions
from gemma_keras.generation.samplers import build_sampler
from gemma_keras.generation.session import GenerationSession, Stopping
from gemma_keras.generation.steps import pad_id
from gemma_keras.tokenizer import format_chat, sends_as_chat

DEFAULT_MAX_NEW_TOKENS = 128


def resolve_stop_ids(lm, stop_token_ids) -> set:
    tokenizer = lm.tokenizer
    if isinstance(stop_token_ids, str) and stop_token_ids == "auto":
        if tokenizer is None:
            raise InvalidArgumentError(
                "stop_token_ids='auto' needs the model's tokenizer; pass ids.")
        return set(tokenizer.stop_token_ids(lm.instruct))
    if stop_token_ids is None:
        return set()
    if isinstance(stop_token_ids, (str, bytes)) or not isinstance(
            stop_token_ids, (list, tuple, set, frozenset, np.ndarray)):
        raise ArgumentTypeError(f"stop_token_ids must be 'auto', None or a list of token ids, "
                                f"got {stop_token_ids!r}.")
    return {options.whole_number("stop_token_ids[i]", i.item() if isinstance(i, np.generic)
                                 else i, 0) for i in stop_token_ids}


_INPUT_FORMS = ("generate() takes inputs as a string, a list of strings, or the dict "
                "{'token_ids', 'padding_mask'}")


def uses_chat_template(lm, chat_template, text):
    """Whether a string prompt is sent as one user turn in Gemma's chat format
    (gemma_keras.tokenizer.sends_as_chat, the rule's one owner)."""
    return sends_as_chat(lm.instruct, chat_template, text)


def prepare_prompts(lm, inputs, chat_template="auto"):
    """(token lists, kind, texts) where kind is "text", "batch" or "ids" and texts are the
    prompt strings as given (None for ids)."""
    if isinstance(inputs, dict):
        if "token_ids" not in inputs:
            raise InvalidArgumentError(f"inputs is a dict with the keys {sorted(map(str, inputs))}"
                                       f"; pre-tokenized inputs are the dict {{'token_ids', "
                                       f"'padding_mask'}}.")
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


def generate(lm, inputs, options: GenerateOptions, on_speculation=None):
    """`GemmaCausalLM.generate` with its options gathered (`GenerateOptions.from_call`).
    on_speculation(stats): told what the drafts achieved, when draft= decodes."""
    # Everything is checked before the first compilation or cache allocation.
    args = options.checked()
    sampler = build_sampler(args.sampler, **args.sampling())
    sampler, beams = beam.plan(sampler, args.return_beams, args)
    prompts, kind, texts = prepare_prompts(lm, inputs, args.chat_template)
    new = plan_lengths(lm, prompts, args.max_length, args.max_new_tokens)
    if args.min_new_tokens > new:
        raise InvalidArgumentError(f"min_new_tokens={args.min_new_tokens} is more than the "
                                   f"{new} new tokens asked for; raise max_new_tokens.")
    stop_ids = resolve_stop_ids(lm, args.stop_token_ids)
    if args.stop_strings and lm.tokenizer is None:
        raise InvalidArgumentError("stop_strings need the model's tokenizer.")
    decoding = Decoding(sampler, stop_ids, args.min_new_tokens, args.repetition_penalty)
    speculation = drafting.resolve(lm, args.draft, args.draft_tokens, on_speculation)
    rng = np.random.default_rng(args.seed)
    stopping = Stopping(frozenset(stop_ids), args.stop_strings, args.skip_special_tokens)
    if beams is not None:  # see generation/beam.py
        if speculation is not None:
            raise InvalidArgumentError("Beam search does not take draft=: drafts are checked "
                                       "against one sequence per prompt, not num_beams.")
        session = GenerationSession(lm, prompts, max(len(p) for p in prompts) + new)
        ranked = beam.search(session, new, beams, stop_ids, args.min_new_tokens)
        if beams.return_all_beams:
            return _all_beams(lm, session, ranked, kind, texts, args, stopping)
        return _outputs(lm, session, session.rows, kind, texts, args, stopping)
    if args.stream:
        if kind != "text":
            raise InvalidArgumentError("stream=True takes one string prompt.")
        session = GenerationSession(lm, prompts, len(prompts[0]) + new, speculation)
        return session.stream(new, decoding, rng, stopping)
    session = GenerationSession(lm, prompts, max(len(p) for p in prompts) + new, speculation)
    session.decode(new, decoding, rng, stopping)
    return _outputs(lm, session, session.rows, kind, texts, args, stopping)


def _outputs(lm, session, rows, kind, texts, args, stopping):
    """What generate returns for `rows`, one per prompt."""
    if kind == "ids":
        return _as_ids(lm, rows, args.include_prompt)
    # The prompt exactly as given (not re-detokenized, not the chat-template markup), so
    # `text[len(prompt):]` is always the completion.
    outputs = [(text if args.include_prompt else "") + session.completion_text(row, stopping)
               for text, row in zip(texts, rows)]
    return outputs[0] if kind == "text" else outputs


def _all_beams(lm, session, ranked, kind, texts, args, stopping):
    """return_beams: per prompt, [(output, score)] for each of its beams, best first; the
    output is a prompt's text as generate returns it, or its ids (prompt and new tokens, or
    the new tokens alone) as a 1-D array. One string prompt gives its list alone."""
    per_prompt = [
        [(_as_ids(lm, [row], args.include_prompt)["token_ids"][0] if kind == "ids" else
          _outputs(lm, session, [row], "text", [texts[b]], args, stopping), score)
         for row, score in hypotheses]
        for b, hypotheses in enumerate(ranked)]
    return per_prompt[0] if kind == "text" else per_prompt


def _as_ids(lm, rows, include_prompt=True):
    """keras-hub's form: prompt then generated tokens (the stop token included), right-padded;
    without the prompt, the generated tokens alone."""
    sequences = [(row.prompt if include_prompt else []) + row.generated for row in rows]
    width = max(len(s) for s in sequences)
    ids = np.full((len(rows), width), pad_id(lm), "int32")
    mask = np.zeros((len(rows), width), bool)
    for r, s in enumerate(sequences):
        ids[r, : len(s)] = s
        mask[r, : len(s)] = True
    return {"token_ids": ids, "padding_mask": mask}
