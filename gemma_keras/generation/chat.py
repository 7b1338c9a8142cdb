"""Multi-turn chat in Gemma's turn format, keeping the KV cache between turns.

    <bos><start_of_turn>user\\n{message}<end_of_turn>\\n<start_of_turn>model\\n{reply}<end_of_turn>\\n...

Each new message is fed as one chunk after what the cache already holds, so a turn costs
its own tokens, not the whole conversation again. Gemma has no system role; a system prompt
is put before the first user message, as Google's chat template does (`format_chat`, the
format's owner, writes every turn).
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple, Union

import numpy as np

from gemma_keras.errors import ArgumentTypeError, InvalidArgumentError
from gemma_keras.generation import drafting, options
from gemma_keras.generation.generate import resolve_stop_ids
from gemma_keras.generation.options import Decoding, GenerateOptions
from gemma_keras.generation.samplers import BeamSampler, build_sampler
from gemma_keras.generation.session import GenerationSession, Stopping, cache_bucket
# The format's one owner is the tokenizer module; imported here for `chat.format_chat` users.
from gemma_keras.tokenizer import format_chat, format_turn  # noqa: F401


class ChatSession:
    """`chat = lm.chat(); chat.send("Hi")` returns the model's reply; the conversation and its
    cache carry over to the next `send`. `history` holds (role, text) pairs."""

    def __init__(self, lm, system: Optional[str] = None, draft=None, draft_tokens=None,
                 on_speculation=None):
        tokenizer = lm.tokenizer
        if tokenizer is None or tokenizer.end_of_turn_id is None:
            raise InvalidArgumentError("chat() needs a tokenizer with Gemma's <start_of_turn> "
                                       "and <end_of_turn> pieces.")
        if system is not None and not isinstance(system, str):
            raise ArgumentTypeError(f"system must be a string (the instructions put before "
                                    f"the first message) or None, got {type(system).__name__}.")
        self.lm, self.system = lm, system
        # Replies are drafted and verified (generate's draft=); fixed for the chat because
        # the cache's rings are sized for the drafts when the session is made.
        self._speculation = drafting.resolve(lm, draft, draft_tokens, on_speculation)
        self.history: List[Tuple[str, str]] = []
        self._session: Optional[GenerationSession] = None
        self._tokens: List[int] = []  # everything the conversation holds, cached or not
        self._pending: List[int] = []  # sampled but not yet fed to the cache
        self.last_reply_ids: List[int] = []

    def reset(self):
        self.history, self._session, self._tokens, self._pending = [], None, [], []

    def _turn_tokens(self, message: str) -> List[int]:
        tokenizer = self.lm.tokenizer
        if not self.history:
            system = [("system", self.system)] if self.system else []
            return tokenizer.tokenize(format_chat(system + [("user", message)]), add_bos=True)
        # Close the model's last turn (its <end_of_turn> was sampled but never fed), then ask.
        closing = [] if self._pending[-1:] == [tokenizer.end_of_turn_id] else \
            [tokenizer.end_of_turn_id]
        return self._pending + closing + tokenizer.tokenize("\n" + format_chat([("user", message)]))

    def _prepare(self, message: str, max_new_tokens: int):
        chunk = self._turn_tokens(message)
        self._tokens += chunk[len(self._pending):] if self.history else chunk
        needed = len(self._tokens) + max_new_tokens
        limit = self.lm.backbone.config.max_sequence_length
        if needed > limit:
            raise InvalidArgumentError(
                f"The conversation would need {needed} tokens, more than the model's context "
                f"of {limit}; call reset() to start over.")
        session = self._session
        # A new session (one prefill of the whole conversation) only when the cache is full:
        # its capacity doubles, so this happens O(log length) times per conversation.
        lookahead = self._speculation.lookahead if self._speculation else 0
        if session is None or session.column + max(len(chunk), 16) * 2 + max_new_tokens \
                + lookahead > session.capacity:
            capacity = cache_bucket(max(2 * needed, 256), limit)
            self._session = GenerationSession(self.lm, [self._tokens], capacity,
                                              self._speculation)
        else:
            # The row's context is now the whole conversation (repetition_penalty reads it).
            session.restart_row(self._tokens, chunk)
        self._pending = []

    def send(self, message: str = None, *args, **kwargs) -> Union[str, Iterator[str]]:
        """Adds a user message and returns the reply (or, with stream=True, an iterator of
        its pieces; the reply joins the history when the iterator is exhausted).

        The sampling arguments are `generate`'s; repetition_penalty counts every token of
        the conversation so far. The reply never contains special pieces. generate's other
        keywords (beam search, stop strings, drafts, ...) are a gk.ArgumentTypeError that
        says where they go."""
        given = GenerateOptions.from_call(
            "chat.send()", args, kwargs, fields=options.SEND_FIELDS,
            positional=options.SEND_POSITIONAL, defaults=options.SEND_DEFAULTS,
            advice=SEND_ADVICE, first="message")
        if not isinstance(message, str):
            raise ArgumentTypeError(f"send() takes the message as a string, got "
                                    f"{type(message).__name__}.")
        given = given.checked()  # generate's checks: one place for both
        max_new_tokens = given.max_new_tokens
        if given.min_new_tokens > max_new_tokens:
            raise InvalidArgumentError(f"min_new_tokens={given.min_new_tokens} is more than "
                                       f"max_new_tokens={max_new_tokens}.")
        rng = np.random.default_rng(given.seed)
        stream = given.stream
        stop_ids = resolve_stop_ids(self.lm, "auto") | {self.lm.tokenizer.end_of_turn_id}
        decoding = Decoding(build_sampler(given.sampler, **given.sampling()), stop_ids,
                            given.min_new_tokens, given.repetition_penalty)
        if isinstance(decoding.sampler, BeamSampler):
            raise InvalidArgumentError("sampler: chat.send does not take beam search (a reply "
                                       "is chosen token by token, as it streams); use "
                                       "generate(num_beams=).")
        # Checked above, before the conversation changes: a bad argument leaves it as it was.
        self._prepare(message, max_new_tokens)
        self.history.append(("user", message))
        pieces = self._decode(max_new_tokens, decoding, rng)
        if stream:
            return pieces
        return "".join(pieces)

    def _decode(self, max_new_tokens, decoding, rng):
        session = self._session
        reply = []
        for piece in session.stream(max_new_tokens, decoding, rng,
                                    Stopping(frozenset(decoding.stop_ids))):
            reply.append(piece)
            yield piece
        generated = session.rows[0].generated
        # The last sampled token is not in the cache yet; the next turn feeds it.
        self._pending = generated[-1:]
        self._tokens += generated
        self.last_reply_ids = list(generated)
        self.history.append(("model", "".join(reply)))

    @property
    def token_ids(self) -> List[int]:
        """The whole conversation as token ids, the last reply included."""
        return list(self._tokens)


# The keywords are GenerateOptions' (their one definition): this signature shows
# chat.send's to help(), IDEs and inspect.
ChatSession.send.__signature__ = options.signature_of(
    "message", options.SEND_FIELDS, options.SEND_POSITIONAL,
    options.SEND_DEFAULTS)
SEND_KEYWORDS = ["message"] + options.SEND_FIELDS
_BEAM = ("Beam search is generate()'s only: a chat reply is chosen token by token, as it "
         "streams; use lm.generate(..., num_beams=k)")
_GENERATE_ONLY = "It is generate()'s; a chat reply is always the model's new turn alone"
# generate() keywords that chat.send() does not take, and what to do instead.
SEND_ADVICE = {
    "num_beams": _BEAM, "length_penalty": _BEAM, "early_stopping": _BEAM,
    "return_beams": _BEAM,
    "draft": "Drafting is set for the whole chat: lm.chat(draft=..., draft_tokens=...)",
    "draft_tokens": "Drafting is set for the whole chat: lm.chat(draft=..., draft_tokens=...)",
    "system": "The system prompt is set for the whole chat: lm.chat(system=...)",
    "stop_strings": "A reply ends at the model's <end_of_turn> (or max_new_tokens); "
                    "stop_strings are generate()'s",
    "stop_token_ids": "A reply ends at the model's <end_of_turn> or <eos>; stop_token_ids "
                      "are generate()'s",
    "max_length": "A reply's length is max_new_tokens=; max_length is generate()'s",
    "include_prompt": _GENERATE_ONLY,
    "chat_template": _GENERATE_ONLY,
    "skip_special_tokens": _GENERATE_ONLY,
}
