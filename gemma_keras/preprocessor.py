"""Training data for a causal LM: text (or prompt/response pairs) to token ids, next-token
labels and a per-label weight, from plain Python/NumPy or inside a tf.data graph."""

from __future__ import annotations

from typing import Optional

import numpy as np

from gemma_keras.errors import ArgumentTypeError, InvalidArgumentError
from gemma_keras.generation.options import flag, whole_number  # the argument checks' owner
from gemma_keras.tokenizer import GemmaTokenizer, format_chat, strip_graph

# The user turn around a prompt and the close of the model's turn, in Gemma's chat format.
_PROMPT_OPEN, _PROMPT_CLOSE = format_chat([("user", "\0")]).split("\0")
_RESPONSE_CLOSE = "<end_of_turn>"


class GemmaCausalLMPreprocessor:
    """`preprocessor(x)` -> `({"token_ids", "padding_mask"}, labels, sample_weight)`, each
    [batch, sequence_length].

    x: a string, a list of strings, `{"prompts": [...], "responses": [...]}`, or a list of
    records `{"prompt": ..., "response": ...}` / `{"text": ...}` (JSONL lines). A text is
    packed as `<bos> text <eos>`, a pair as `<bos> prompt response <eos>`, truncated on the
    right to `sequence_length + 1` tokens, then split into inputs and the labels one token
    ahead. `sample_weight` is 0 on padding and, for pairs, on labels inside the prompt, so
    the loss is on responses only. With `chat_format=True` a pair is written as one Gemma
    turn each: `<start_of_turn>user\\n{prompt}<end_of_turn>\\n<start_of_turn>model\\n` then
    `{response}<end_of_turn>`, which teaches an instruct model to close its turn.

    The fields (sequence_length, add_bos, add_eos, chat_format) are checked when set:
    `preprocessor.sequence_length = -5` raises gk.InvalidArgumentError there.

    `tf_map()` gives the same function as TensorFlow ops (tensorflow-text's SentencePiece) for
    `dataset.map`; the NumPy path needs no TensorFlow.
    """

    def __init__(self, tokenizer, sequence_length: int = 512, add_bos: bool = True,
                 add_eos: bool = True, chat_format: bool = False):
        if tokenizer is None:
            raise InvalidArgumentError(
                "A preprocessor needs a tokenizer; the model was loaded without one "
                "(load_tokenizer=False or no tokenizer file in the preset).")
        if not isinstance(tokenizer, GemmaTokenizer):
            raise ArgumentTypeError(f"tokenizer must be a gk.GemmaTokenizer, got "
                                    f"{type(tokenizer).__name__}.")
        self.tokenizer = tokenizer
        self.sequence_length = sequence_length
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.chat_format = chat_format

    # Settable fields, checked when set (`lm.preprocessor.sequence_length = -5` fails there,
    # naming the field, not with an error from deep inside the next fit()).
    @property
    def sequence_length(self) -> int:
        """Tokens per training example (inputs; the packed row is one longer for the
        labels). Longer examples are truncated on the right."""
        return self._sequence_length

    @sequence_length.setter
    def sequence_length(self, value):
        self._sequence_length = _positive_length("sequence_length", value)

    add_bos = property(lambda self: self._add_bos,
                       lambda self, value: setattr(self, "_add_bos", flag("add_bos", value)),
                       doc="Whether each example starts with <bos> (Gemma expects it).")
    add_eos = property(lambda self: self._add_eos,
                       lambda self, value: setattr(self, "_add_eos", flag("add_eos", value)),
                       doc="Whether each example ends with <eos>.")
    chat_format = property(
        lambda self: self._chat_format,
        lambda self, value: setattr(self, "_chat_format", flag("chat_format", value)),
        doc="Whether prompt/response pairs are written as Gemma chat turns.")

    # ---- NumPy ------------------------------------------------------------------------
    def __call__(self, x, sequence_length: Optional[int] = None):
        length = self._length(sequence_length)
        prompts, responses = _split(x)
        rows, starts = [], []
        for prompt, response in zip(prompts, responses):
            head = self._ids(self._prompt_text(prompt), bos=self.add_bos)
            tail = ([] if response is None
                    else self._ids(self._response_text(response), eos=self.add_eos))
            if response is None and self.add_eos:
                head = head + [self.tokenizer.eos_token_id]
            rows.append((head + tail)[:length + 1])
            starts.append(len(head) if response is not None else 0)
        packed = np.full((len(rows), length + 1), self.tokenizer.pad_token_id, "int32")
        mask = np.zeros((len(rows), length + 1), bool)
        for i, row in enumerate(rows):
            packed[i, :len(row)] = row
            mask[i, :len(row)] = True
        # Label j is token j + 1: it is trained when that token is real and past the prompt.
        column = np.arange(1, length + 1)[None, :]
        weight = mask[:, 1:] & (column >= np.array(starts)[:, None])
        features = {"token_ids": packed[:, :-1], "padding_mask": mask[:, :-1]}
        return features, packed[:, 1:], weight.astype("float32")

    def _ids(self, text, bos=False, eos=False):
        return self.tokenizer.tokenize(text, add_bos=bos, add_eos=eos)

    # In the chat format, prompt and response are trimmed as format_chat trims a turn's text
    # (Google's template): what a model is tuned on is what `generate` and `chat` send it.
    def _prompt_text(self, prompt):
        return _PROMPT_OPEN + prompt.strip() + _PROMPT_CLOSE if self.chat_format else prompt

    def _response_text(self, response):
        return response.strip() + _RESPONSE_CLOSE if self.chat_format else response

    def _length(self, sequence_length):
        if sequence_length is None:
            return self.sequence_length
        return _positive_length("sequence_length", sequence_length)

    # ---- TensorFlow graph -------------------------------------------------------------
    def tf_map(self, sequence_length: Optional[int] = None):
        """The same preprocessing as TensorFlow ops, for `tf.data.Dataset.map`. Takes a batch
        (or one) of strings, or a dict with "prompts" and "responses"."""
        import tensorflow as tf
        import tensorflow_text as tf_text

        length = self._length(sequence_length)
        sp = tf_text.SentencepieceTokenizer(model=self.tokenizer.proto, out_type=tf.int32)
        bos, eos, pad = (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id,
                         self.tokenizer.pad_token_id)

        def tokens(strings, prefix, suffix):  # [batch] strings -> ragged [batch, None]
            if self.chat_format:  # trimmed, as _prompt_text / _response_text
                strings = strip_graph(strings)
            return sp.tokenize(tf.strings.join([prefix, strings, suffix]))

        def constant(strings, token_id, present):  # [batch, 0 or 1] ragged
            # int64 row lengths, as tensorflow-text's ragged output.
            count = tf.fill(tf.shape(strings), tf.constant(1 if present else 0, tf.int64))
            return tf.RaggedTensor.from_row_lengths(
                tf.fill([tf.reduce_sum(count)], token_id), count)

        def preprocess(x):
            pairs = isinstance(x, dict)
            prompts = x["prompts"] if pairs else x
            scalar = prompts.shape.rank == 0
            prompts = tf.reshape(prompts, [-1])
            open_, close = (_PROMPT_OPEN, _PROMPT_CLOSE) if self.chat_format else ("", "")
            head = tf.concat([constant(prompts, bos, self.add_bos),
                              tokens(prompts, open_, close)], axis=1)
            if pairs:
                responses = tf.reshape(x["responses"], [-1])
                suffix = _RESPONSE_CLOSE if self.chat_format else ""
                starts = head.row_lengths()
                full = tf.concat([head, tokens(responses, "", suffix),
                                  constant(responses, eos, self.add_eos)], axis=1)
            else:
                starts = tf.zeros_like(head.row_lengths())
                full = tf.concat([head, constant(prompts, eos, self.add_eos)], axis=1)
            full = full[:, :length + 1]
            packed = full.to_tensor(default_value=pad, shape=[None, length + 1])
            mask = tf.sequence_mask(full.row_lengths(), length + 1)
            column = tf.range(1, length + 1, dtype=starts.dtype)[None, :]
            weight = tf.logical_and(mask[:, 1:], column >= starts[:, None])
            out = ({"token_ids": packed[:, :-1], "padding_mask": mask[:, :-1]},
                   packed[:, 1:], tf.cast(weight, "float32"))
            if scalar:
                out = tf.nest.map_structure(lambda t: t[0], out)
            return out

        return preprocess


def _split(x):
    """(prompts, responses) lists; responses are None for plain texts."""
    x = records_to_columns(x)
    if isinstance(x, dict):
        if set(x) != {"prompts", "responses"}:
            raise InvalidArgumentError(
                f"x: a dict of training data needs exactly the keys 'prompts' and 'responses' "
                f"(lists of strings), got {sorted(map(str, x))}; one example per dict is a "
                f"record: pass a list of {{'prompt': ..., 'response': ...}} dicts.")
        prompts, responses = _strings(x["prompts"], "prompts"), _strings(x["responses"],
                                                                         "responses")
        if len(prompts) != len(responses):
            raise InvalidArgumentError(f"{len(prompts)} prompts but {len(responses)} "
                                       "responses: each prompt needs its response.")
        return prompts, responses
    prompts = _strings(x, "x")
    return prompts, [None] * len(prompts)


# The record forms, one example per dict: the lines of a `gemma-keras finetune` JSONL file.
RECORD_FORMS = ("{'text': ...}", "{'prompt': ..., 'response': ...}")


def is_records(x) -> bool:
    """Whether x is a non-empty list (or tuple) of dicts: records, one example each."""
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(v, dict) for v in x)


def records_to_columns(x, name="x", labels=None):
    """A list of records (JSONL lines read with json.loads) as fit's columnar forms: texts
    from {"text": ...}, {"prompts", "responses"} from {"prompt": ..., "response": ...}; one
    kind per list. The one rule for both `fit` and `gemma-keras finetune`'s JSONL file (which
    passes `labels`, "file:line" per record, for its messages). Other keys of a record are
    ignored. Anything else is returned as it is."""
    if not is_records(x):
        return x
    texts, prompts, responses = [], [], []
    for i, record in enumerate(x):
        label = labels[i] if labels is not None else f"{name}[{i}]"
        if isinstance(record.get("text"), (str, bytes)):
            texts.append(record["text"])
        elif isinstance(record.get("prompt"), (str, bytes)) and isinstance(
                record.get("response"), (str, bytes)):
            prompts.append(record["prompt"])
            responses.append(record["response"])
        else:
            raise InvalidArgumentError(
                f"{label} is a dict with keys {sorted(map(str, record))}; a training "
                f"record is {' or '.join(RECORD_FORMS)} with string values (the lines of a "
                "JSONL file for `gemma-keras finetune`).")
        if texts and prompts:
            raise InvalidArgumentError(
                f"{name} mixes text records and prompt/response records ({label}); use "
                "one kind.")
    return texts if texts else {"prompts": prompts, "responses": responses}


def _strings(values, name):
    if isinstance(values, (str, bytes)):
        values = [values]
    if not isinstance(values, (list, tuple, np.ndarray)):
        raise ArgumentTypeError(f"{name} must be a string or a list of strings, got "
                                f"{type(values).__name__}.")
    values = [v.decode("utf-8") if isinstance(v, bytes) else v
              for v in np.asarray(values, dtype=object).reshape(-1).tolist()]
    bad = [type(v).__name__ for v in values if not isinstance(v, str)]
    if bad:
        raise ArgumentTypeError(f"{name} must hold strings, found {bad[0]}.")
    return values


def _positive_length(name, value):
    return whole_number(name, value, 1, " (a number of tokens, e.g. 256)")
