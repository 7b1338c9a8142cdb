"""The arguments of `generate` and `chat.send`, checked in one place before anything compiles,
and `Decoding`: how each next token is chosen from the step's float32 logits on the host.

Every mistake is one `GemmaError` naming the argument and what to pass instead:
`InvalidArgumentError` (also a ValueError) for a value that cannot be used,
`ArgumentTypeError` (also a TypeError) for a wrong type.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import numbers
from typing import Optional

import numpy as np

from gemma_keras.errors import ArgumentTypeError, InvalidArgumentError
from gemma_keras.generation.samplers import (GreedySampler, Sampler, apply_repetition_penalty,
                                             check_repetition_penalty, suppress)


def whole_number(name, value, minimum, hint=""):
    """`value` as an int >= minimum; None stays None. bool is refused (True is not 1 token)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be a whole number (an int), got {value!r}.{hint}")
    if value < minimum:
        raise InvalidArgumentError(f"{name} must be at least {minimum}, got {value}.{hint}")
    return int(value)


def flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be True or False, got {value!r}.")
    return bool(value)


def seed_value(seed):
    """None (fresh randomness every call) or an int >= 0 for numpy's generator."""
    return whole_number("seed", seed, 0, " Pass an int such as seed=1, or None.")


def chat_template_value(value):
    if value == "auto" or isinstance(value, bool):
        return value
    raise InvalidArgumentError(
        f"chat_template must be 'auto', True or False, got {value!r}.")


def stop_strings_value(stop_strings):
    """None or a list of non-empty strings (one string is accepted as a list of one)."""
    if stop_strings is None:
        return None
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if not isinstance(stop_strings, (list, tuple)) or not all(
            isinstance(s, str) for s in stop_strings):
        raise ArgumentTypeError(f"stop_strings must be a string or a list of strings, got "
                                f"{stop_strings!r}.")
    if any(s == "" for s in stop_strings):
        raise InvalidArgumentError("stop_strings has an empty string, which would end every "
                                   "completion before it starts; remove it.")
    return list(stop_strings) or None


# Keywords other libraries use for what `generate` / `chat.send` call otherwise: an unknown
# keyword is answered with the name to use instead of Python's bare TypeError.
KEYWORD_ALIASES = {
    "max_tokens": "max_new_tokens",  # llama.cpp, vLLM, the OpenAI API
    "max_new_token": "max_new_tokens",
    "num_tokens": "max_new_tokens",
    "max_len": "max_length",
    "prompt": "inputs",
    "prompts": "inputs",
    "eos_token_id": "stop_token_ids",
    "stop_ids": "stop_token_ids",
    "stop": "stop_strings",  # the OpenAI API, vLLM
    "stop_sequences": "stop_strings",
    "skip_special": "skip_special_tokens",
    "penalty": "repetition_penalty",
    "rng_seed": "seed",
    "random_seed": "seed",
}
# transformers keywords that have no one-word counterpart here, with what to do instead.
KEYWORD_ADVICE = {
    "do_sample": "Sampling is chosen by sampler= ('random', 'top_k', 'top_p') or by giving "
                 "temperature=, top_k= or top_p= (or min_p=); leave them unset for greedy "
                 "decoding",
    "num_return_sequences": "Call generate with the prompt repeated in a list (and a seed) "
                            "for several samples, or num_beams=k, return_beams=True for k "
                            "beams",
    "streamer": "Pass stream=True and iterate over the pieces",
    "attention_mask": "Pass the dict {'token_ids', 'padding_mask'} as inputs",
    "input_ids": "Pass the dict {'token_ids', 'padding_mask'} as inputs",
}


def refuse_unknown_keywords(function, unknown, valid, advice=None):
    """Raises ArgumentTypeError (a TypeError, as Python's own for an unexpected keyword)
    for the keywords in `unknown`, naming the one to use instead where one is known and
    listing the keywords `function` takes. advice: {keyword: what to do instead} for
    keywords that belong elsewhere (e.g. generate's beam search in chat.send)."""
    if not unknown:
        return
    name = sorted(unknown)[0]
    valid = list(valid)
    advice = {**KEYWORD_ADVICE, **(advice or {})}
    if name in advice:
        hint = f" {advice[name]}."
    else:
        close = ([KEYWORD_ALIASES[name]] if KEYWORD_ALIASES.get(name) in valid
                 else difflib.get_close_matches(name, valid, n=2, cutoff=0.6))
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise ArgumentTypeError(f"{function} got an unknown keyword argument {name!r}.{hint} It "
                            f"takes: {', '.join(valid)}.")


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """Everything `generate` takes besides its inputs, with its defaults: the one definition
    of those keywords. `GemmaCausalLM.generate`'s signature is made from these fields (the
    first seven are also positional after the inputs, in keras-hub's order), `chat.send`
    takes the subset `SEND_FIELDS`, and the CLI and the lm-eval model build one and pass it
    as `options=`. What each means is in `GemmaCausalLM.generate`'s docstring. `checked()`
    validates and normalises every scalar before anything compiles."""

    max_length: Optional[int] = None
    max_new_tokens: Optional[int] = None
    sampler: object = None
    stop_token_ids: object = "auto"
    seed: Optional[int] = None
    stream: bool = False
    stop_strings: object = None
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    min_new_tokens: int = 0
    repetition_penalty: Optional[float] = None
    chat_template: object = "auto"
    include_prompt: bool = True
    num_beams: Optional[int] = None
    length_penalty: Optional[float] = None
    early_stopping: object = None
    return_beams: bool = False
    skip_special_tokens: bool = True
    draft: object = None
    draft_tokens: Optional[int] = None

    def checked(self) -> "GenerateOptions":
        """The scalar options checked and normalised (the sampler's own arguments and the
        drafts are checked where they are built: samplers.build_sampler, drafting.resolve).
        Raises InvalidArgumentError / ArgumentTypeError naming the option."""
        return dataclasses.replace(
            self,
            max_length=whole_number("max_length", self.max_length, 1),
            max_new_tokens=whole_number("max_new_tokens", self.max_new_tokens, 1),
            min_new_tokens=whole_number("min_new_tokens", self.min_new_tokens, 0),
            seed=seed_value(self.seed),
            stream=flag("stream", self.stream),
            stop_strings=stop_strings_value(self.stop_strings),
            repetition_penalty=check_repetition_penalty(self.repetition_penalty),
            chat_template=chat_template_value(self.chat_template),
            include_prompt=flag("include_prompt", self.include_prompt),
            skip_special_tokens=flag("skip_special_tokens", self.skip_special_tokens))

    def sampling(self) -> dict:
        """The keywords `samplers.build_sampler` takes."""
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                    min_p=self.min_p, num_beams=self.num_beams,
                    length_penalty=self.length_penalty, early_stopping=self.early_stopping)

    @classmethod
    def from_call(cls, function, args, kwargs, fields=None, positional=None, defaults=None,
                  advice=None, first="inputs"):
        """The options of a call `function(first, *args, **kwargs)`: positional `args` in
        the order of `positional`, keywords among `fields` (default: every field), others
        refused by name (`refuse_unknown_keywords`, with `advice`); an `options=`
        GenerateOptions gives the values not passed. defaults: other defaults than the
        fields' (chat.send's max_new_tokens)."""
        fields = list(FIELDS if fields is None else fields)
        positional = list(POSITIONAL if positional is None else positional)
        kwargs = dict(kwargs)
        base = kwargs.pop("options", None)
        if base is not None and not isinstance(base, GenerateOptions):
            raise ArgumentTypeError(f"options must be a gk.GenerateOptions, got "
                                    f"{type(base).__name__}.")
        if len(args) > len(positional):
            raise ArgumentTypeError(
                f"{function} takes {first} and at most {len(positional)} more positional "
                f"arguments ({', '.join(positional)}), got {1 + len(args)}; pass the others "
                "by keyword.")
        values = dict(zip(positional, args))
        for name in kwargs:
            if name in values:
                raise ArgumentTypeError(f"{function} got two values for {name!r} (by "
                                        "position and by keyword).")
        refuse_unknown_keywords(function, {k: v for k, v in kwargs.items() if k not in fields},
                                [first] + fields + ["options"], advice)
        given = dict(defaults or {})
        if base is not None:  # its fields left at the dataclass default keep the call's own
            given.update({name: getattr(base, name) for name in fields
                          if getattr(base, name) != _DEFAULTS[name]})
        return cls(**{**given, **values, **kwargs})


FIELDS = [field.name for field in dataclasses.fields(GenerateOptions)]
_DEFAULTS = {field.name: field.default for field in dataclasses.fields(GenerateOptions)}
# generate's positional arguments after the inputs, in keras-hub's order.
POSITIONAL = FIELDS[:7]
# The options chat.send takes (a reply's own), positional in this order after the message.
SEND_FIELDS = ["max_new_tokens", "sampler", "seed", "stream", "temperature", "top_k",
               "top_p", "min_p", "min_new_tokens", "repetition_penalty"]
SEND_POSITIONAL = SEND_FIELDS[:4]
SEND_DEFAULTS = {"max_new_tokens": 256}


def signature_of(first, fields, positional, defaults=None):
    """An `inspect.Signature` for a method `(self, first, *args, **kwargs)` that lists the
    options it takes (for help(), IDEs and inspect): positional-or-keyword, then
    keyword-only, with their defaults, and `options=None`."""
    defaults = {**_DEFAULTS, **(defaults or {})}
    kind = inspect.Parameter
    parameters = [kind("self", kind.POSITIONAL_OR_KEYWORD),
                  kind(first, kind.POSITIONAL_OR_KEYWORD, default=None)]
    parameters += [kind(name, kind.POSITIONAL_OR_KEYWORD, default=defaults[name])
                   for name in positional]
    parameters += [kind(name, kind.KEYWORD_ONLY, default=defaults[name])
                   for name in fields if name not in positional]
    parameters.append(kind("options", kind.KEYWORD_ONLY, default=None))
    return inspect.Signature(parameters)


@dataclasses.dataclass
class Decoding:
    """How each row's next token is chosen: the logits rules, then the sampler.

    stop_ids end a row (the stop token is kept in its ids, never in its text).
    min_new_tokens: the stop ids are masked out of a row's logits until it has that many
    new tokens (transformers' `min_new_tokens`). repetition_penalty: see
    `samplers.apply_repetition_penalty`; None is none.
    """

    sampler: Sampler
    stop_ids: set
    min_new_tokens: int = 0
    repetition_penalty: Optional[float] = None

    def select(self, logits, rows, rng):
        """Next token per row [batch] from logits [batch, vocab] float32; `rows` have
        `.prompt` (everything the row's context holds before this call's tokens) and
        `.generated`."""
        return self.sampler.select(self.adjust(
            logits, [row.prompt + row.generated for row in rows],
            [len(row.generated) for row in rows]), rng)

    def adjust(self, logits, contexts, counts):
        """The logits rules: logits [batch, vocab] of rows whose context is `contexts[r]`
        (token lists) after `counts[r]` new tokens, as the sampler must see them."""
        if self.repetition_penalty is not None:
            logits = apply_repetition_penalty(logits, contexts, self.repetition_penalty)
        early = [r for r, n in enumerate(counts) if n < self.min_new_tokens]
        if early and self.stop_ids:
            logits = suppress(logits, early, sorted(self.stop_ids))
        return logits

    @property
    def greedy(self):
        return type(self.sampler) is GreedySampler

    @property
    def has_rules(self):
        """Whether `adjust` can change logits (else the argmax needs no host round trip)."""
        return self.repetition_penalty is not None or (
            self.min_new_tokens > 0 and bool(self.stop_ids))

    def compiled_loop_can_finish(self, rows):
        """Whether the rest of the decoding may run as the compiled greedy loop, which
        applies argmax and the stop ids but none of the logits rules above."""
        return (type(self.sampler) is GreedySampler and self.repetition_penalty is None
                and all(row.done or len(row.generated) >= self.min_new_tokens
                        for row in rows))
