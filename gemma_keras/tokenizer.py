"""GemmaTokenizer: Gemma's SentencePiece model, with special ids looked up from the vocabulary."""

from __future__ import annotations

import os
import pathlib
import re
from typing import Iterable, List, Sequence, Union

import numpy as np
import sentencepiece as spm

from gemma_keras.errors import ArgumentTypeError, CheckpointError, InvalidArgumentError

# Where each on-disk layout keeps the SentencePiece model, in the order they are tried.
TOKENIZER_FILES = ("assets/tokenizer/vocabulary.spm", "tokenizer.model")


# ---- Gemma's chat format: the one place it is written -----------------------------------
#     <bos><start_of_turn>user\n{message}<end_of_turn>\n<start_of_turn>model\n{reply}<end_of_turn>\n
# Used by `generate` (a string sent to an instruct model), chat sessions, the preprocessor's
# prompt/response pairs and, as Jinja, the chat template of a Hugging Face save
# (checkpoints/hf_writer.py), whose tests hold the two equal.
def format_turn(role: str, text: str) -> str:
    """One turn, opened; `format_turn("model", "")` opens the model's turn."""
    if role not in ("user", "model"):
        raise InvalidArgumentError(f"role must be 'user' or 'model', got {role!r}.")
    return f"<start_of_turn>{role}\n{text}"


TURN_OPENER = "<start_of_turn>"
# The turn marker's name for each role a conversation may use: transformers (and so most chat
# front ends) call the model's turn "assistant".
TURN_ROLES = {"user": "user", "model": "model", "assistant": "model"}


def sends_as_chat(instruct, chat_template, text: str) -> bool:
    """Whether a string prompt goes in as one user turn of the chat format: the rule of
    `generate`'s chat_template ("auto", True, False), also applied by the exports (their
    runner and the SavedModel's graph read it from the export's metadata; tests keep them in
    step). "auto": yes for an instruct model (`instruct is True`), unless the text already has
    turn markers (written by the caller) or is empty (an empty prompt is <bos> alone)."""
    if chat_template == "auto":
        return instruct is True and text != "" and TURN_OPENER not in text
    return bool(chat_template)


def format_chat(messages, add_generation_prompt: bool = True) -> str:
    """A conversation as Gemma's prompt text (without <bos>); with add_generation_prompt the
    model's turn is opened at the end, ready for its reply.

    `messages`: (role, text) pairs, or {"role": ..., "content": text} dicts as transformers
    takes them. The text is what Google's chat template for its instruct checkpoints writes
    (google/gemma-3-*-it's tokenizer_config.json; Gemma 1 and 2's templates write the same
    turns), so the ids equal `apply_chat_template`'s on those checkpoints:
    - turns alternate user, model, user, ... ("assistant" is another name for "model");
    - Gemma has no system turn: a first "system" message is written at the start of the first
      turn, followed by a blank line (Gemma 1 and 2's templates refuse one; 3's does this);
    - each message's text is trimmed of surrounding whitespace (the templates' `| trim`, which
      is Python's str.strip); the system text is not, as in Google's template.
    """
    if not isinstance(messages, (list, tuple)):
        raise ArgumentTypeError(f"messages must be a list of (role, text) pairs, got "
                                f"{_describe(messages)}.")
    turns = [_message(i, message) for i, message in enumerate(messages)]
    first_prefix, offset = "", 0
    if turns and turns[0][0] == "system":
        first_prefix, offset = turns.pop(0)[1] + "\n\n", 1
    text = ""
    for i, (role, t) in enumerate(turns):
        role = TURN_ROLES.get(role, role)
        expected = ("user", "model")[i % 2]
        if role != expected:
            where = "only first" if role == "system" else f"{expected!r} expected"
            raise InvalidArgumentError(
                f"messages[{i + offset}] has role {turns[i][0]!r} ({where}): Gemma's turns "
                "alternate user, model, user, ..., starting with the user, after at most one "
                "system message; join consecutive messages of one role into one.")
        t = (first_prefix if i == 0 else "") + t.strip()
        text += format_turn(role, t) + "<end_of_turn>\n"
    return text + (format_turn("model", "") if add_generation_prompt else "")


def _message(i, message):
    """messages[i] as (role, text), checked."""
    if isinstance(message, dict):
        role, text = message.get("role"), message.get("content")
    elif isinstance(message, (list, tuple)) and len(message) == 2:
        role, text = message
    else:
        raise ArgumentTypeError(f"messages[{i}] must be a (role, text) pair or a dict with "
                                f"'role' and 'content', got {_describe(message)}.")
    if role != "system" and role not in TURN_ROLES:
        raise InvalidArgumentError(f"messages[{i}]: role must be 'system', 'user', 'model' or "
                                   f"'assistant', got {role!r}.")
    if not isinstance(text, str):
        raise ArgumentTypeError(f"messages[{i}]: the text must be a string, got "
                                f"{_describe(text)}.")
    return role, text


# The characters str.strip() (the templates' `| trim`) removes, as an RE2 class for TensorFlow
# graphs (tf.strings.regex_replace), which must trim as format_chat does: the SavedModel's chat
# template (exporting/signatures.py) and the preprocessor's tf.data path.
STRIP_RE2 = ("[\\t\\n\\x0b\\x0c\\r\\x1c-\\x1f \\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}"
             "\\x{2028}\\x{2029}\\x{202f}\\x{205f}\\x{3000}]")


def strip_graph(strings):
    """tf.strings `strings` with what str.strip removes removed (see STRIP_RE2)."""
    import tensorflow as tf

    return tf.strings.regex_replace(strings, f"^{STRIP_RE2}+|{STRIP_RE2}+$", "")


# Gemma's special pieces besides <pad>, <eos>, <bos> and <unk>, by name (their ids differ
# between vocabularies; a vocabulary may lack some): the turn markers; Gemma 3's image markers
# around an image's soft tokens, <start_of_image> and <end_of_image>, with the placeholder of
# one soft token (<image_soft_token> in transformers, <img> in keras-hub); and <mask>. They mark
# structure, not text: detokenize(skip_special=True) leaves them out (as transformers'
# skip_special_tokens), tokenize never splits one written in a text, and a Hugging Face save
# declares them special tokens.
SPECIAL_PIECES = ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                  "<image_soft_token>", "<img>", "<mask>")


class GemmaTokenizer:
    """Text <-> token ids with Gemma's SentencePiece model.

    `tokenize` does not add `<bos>` unless asked (as keras-hub's tokenizer); models and
    preprocessors add it. Special ids (`pad`, `bos`, `eos`, `<start_of_turn>`, ...) are read
    from the model's vocabulary, never assumed.
    """

    def __init__(self, proto: Union[bytes, str, os.PathLike]):
        if not isinstance(proto, (bytes, str, os.PathLike)):
            raise ArgumentTypeError(
                f"proto must be the path of a SentencePiece model (str or pathlib.Path) or its "
                f"bytes, got {type(proto).__name__}; GemmaTokenizer.from_preset(preset) finds "
                "it in a preset.")
        source = f"{len(proto)} bytes" if isinstance(proto, bytes) else None
        if isinstance(proto, (str, os.PathLike)):
            path = pathlib.Path(proto)
            if not path.is_file():
                raise CheckpointError(f"Tokenizer file {path} does not exist.")
            proto = path.read_bytes()
            source = str(path)
        self.proto = bytes(proto)
        source = self._source = source or f"{len(self.proto)} bytes"
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self.proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError variously
            raise CheckpointError(
                f"Could not parse the SentencePiece tokenizer model ({source}): {e}. The file "
                "is corrupt or not a SentencePiece model.") from e
        self.pad_token_id = self._required_id("<pad>")
        self.eos_token_id = self._required_id("<eos>")
        self.bos_token_id = self._required_id("<bos>")
        self.unk_token_id = self._sp.unk_id()
        self.start_of_turn_id = self.token_to_id("<start_of_turn>")
        self.end_of_turn_id = self.token_to_id("<end_of_turn>")
        # SPECIAL_PIECES this vocabulary has, in that order.
        self.special_pieces = tuple(p for p in SPECIAL_PIECES if self.token_to_id(p) is not None)
        # What detokenize(skip_special=True) leaves out (and the exports' text with it): built
        # once, not per call (a stream decodes on every token).
        self.special_token_ids = frozenset(
            [self.pad_token_id, self.bos_token_id, self.eos_token_id]
            + [self.token_to_id(p) for p in self.special_pieces])
        # SentencePiece reads a user-defined piece written in a text as that piece, but a
        # control piece as characters: special pieces of the control type (a vocabulary may
        # make them so) are matched here before SentencePiece sees the text, as transformers
        # matches its special tokens, so that they are never split whatever their type.
        control = [p for p in self.special_pieces if self._sp.IsControl(self.token_to_id(p))]
        self._control_pieces = re.compile(
            "(" + "|".join(map(re.escape, control)) + ")") if control else None

    @classmethod
    def from_preset(cls, preset) -> "GemmaTokenizer":
        """From a built-in preset name, a kaggle:// or hf:// handle, or a local directory."""
        from gemma_keras.checkpoints.resolve import resolve_preset

        if not isinstance(preset, (str, os.PathLike)):
            raise ArgumentTypeError(f"preset must be a preset name, a kaggle:// or hf:// handle "
                                    f"or a directory (str or pathlib.Path), got "
                                    f"{_describe(preset)}.")
        directory = resolve_preset(preset)
        for name in TOKENIZER_FILES:
            if (directory / name).is_file():
                return cls(directory / name)
        raise CheckpointError(
            f"No tokenizer in {directory}: expected one of {list(TOKENIZER_FILES)}.")

    # ---- vocabulary ---------------------------------------------------------------------
    @property
    def vocabulary_size(self) -> int:
        return self._sp.GetPieceSize()

    def token_to_id(self, token: str):
        """The id of a piece, or None when the vocabulary does not have it."""
        if not isinstance(token, str):
            raise ArgumentTypeError(f"token must be a piece of the vocabulary as a string "
                                    f"(e.g. '<end_of_turn>'), got {type(token).__name__}.")
        token_id = self._sp.PieceToId(token)
        # SentencePiece maps unknown pieces to unk; tell those apart from "<unk>" itself.
        if token_id == self._sp.unk_id() and token != self._sp.IdToPiece(token_id):
            return None
        return token_id

    def id_to_token(self, token_id: int) -> str:
        token_id = _token_id("token_id", token_id)
        if not 0 <= token_id < self.vocabulary_size:
            raise InvalidArgumentError(f"token_id={token_id} is outside the vocabulary "
                             f"[0, {self.vocabulary_size}).")
        return self._sp.IdToPiece(int(token_id))

    def stop_token_ids(self, instruct) -> List[int]:
        """The ids that end a reply by default, <eos> first: also <end_of_turn> unless the
        model is known to be a base model (`instruct is False`), since instruct models end
        their turn with it and stopping there is harmless when we cannot tell. The one rule
        behind `generate(stop_token_ids="auto")`, the exports' stop ids and the eos ids a
        Hugging Face save writes (Google's instruct checkpoints list both)."""
        ids = [self.eos_token_id]
        if instruct is not False and self.end_of_turn_id is not None:
            ids.append(self.end_of_turn_id)
        return ids

    def _required_id(self, token):
        token_id = self.token_to_id(token)
        if token_id is None:
            raise CheckpointError(
                f"The tokenizer ({self._source}) has no {token} piece: it is not a Gemma "
                "tokenizer.")
        return token_id

    # ---- text <-> ids -------------------------------------------------------------------
    def tokenize(self, text: Union[str, Sequence[str]], add_bos: bool = False,
                 add_eos: bool = False):
        """A string gives a list of ids; a list of strings gives a list of lists (bytes are
        read as UTF-8). Anything else is a gk.ArgumentTypeError naming `text`."""
        _flag("add_bos", add_bos)
        _flag("add_eos", add_eos)
        if isinstance(text, (str, bytes)):
            return self._encode(_text(text, "text"), add_bos, add_eos)
        if not isinstance(text, (list, tuple, np.ndarray)) or (
                isinstance(text, np.ndarray) and text.ndim != 1):
            raise ArgumentTypeError(
                f"tokenize() takes text as a string or a list of strings, got "
                f"{_describe(text)}.")
        return [self._encode(_text(t, f"text[{i}]"), add_bos, add_eos)
                for i, t in enumerate(text)]

    def _encode(self, text, add_bos, add_eos):
        if self._control_pieces is None:
            ids = self._sp.EncodeAsIds(text)
        else:  # split on them: re.split puts each matched piece at an odd index
            parts = self._control_pieces.split(text)
            ids = [i for k, part in enumerate(parts) for i in (
                [self._sp.PieceToId(part)] if k % 2 else self._sp.EncodeAsIds(part))]
        return ([self.bos_token_id] if add_bos else []) + ids + (
            [self.eos_token_id] if add_eos else [])

    def detokenize(self, ids, skip_special: bool = False):
        """Ids back to text. One sequence gives a string; a batch gives a list of strings.

        Never raises on valid-typed input: incomplete byte-fallback sequences decode to
        U+FFFD, and ids beyond the SentencePiece vocabulary (checkpoints pad the embedding to
        256,128 rows) are dropped. With skip_special, pad/bos/eos and SPECIAL_PIECES (turn and
        image markers) are dropped.
        Ids that are not integers (strings, floats, None) are a gk.ArgumentTypeError naming
        `ids`; a tensor of any backend is read as its values.
        """
        _flag("skip_special", skip_special)
        if isinstance(ids, (list, tuple)) and ids and not np.isscalar(ids[0]):
            return [self.detokenize(row, skip_special) for row in ids]  # batch, maybe ragged
        array = _id_array(ids)
        if array.ndim == 0:
            return self._decode([int(array)], skip_special)
        if array.ndim == 1:
            return self._decode(array.tolist(), skip_special)
        return [self.detokenize(row, skip_special) for row in array]

    def _decode(self, ids: Iterable[int], skip_special: bool) -> str:
        special = self.special_token_ids if skip_special else frozenset()
        kept = [int(i) for i in ids if 0 <= int(i) < self.vocabulary_size and int(i) not in special]
        return self._sp.DecodeIds(kept)

    def save_assets(self, directory):
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "vocabulary.spm").write_bytes(self.proto)


# ---- argument checks ------------------------------------------------------------------------
def _describe(value):
    return "None" if value is None else f"{type(value).__name__} {value!r:.60}"


def _text(value, name):
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidArgumentError(f"{name} is bytes that are not UTF-8 ({e}); pass a "
                                       "string.") from e
    if not isinstance(value, str):
        raise ArgumentTypeError(f"tokenize() takes strings; {name} is {_describe(value)}.")
    return value


def _flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be True or False, got {_describe(value)}.")


def _token_id(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{name} must be an integer token id, got {_describe(value)}.")
    return int(value)


def _id_array(ids):
    """`ids` (a list, NumPy array or backend tensor of ids) as a NumPy integer array."""
    if ids is None or isinstance(ids, (str, bytes, dict)):
        raise ArgumentTypeError(f"detokenize() takes token ids (an int, a list of ints or an "
                                f"integer array), got {_describe(ids)}; text is already "
                                "detokenized.")
    if not isinstance(ids, (int, np.integer, list, tuple, np.ndarray)):
        try:  # a tensor of any backend (torch tensors that carry gradients included)
            import keras

            ids = keras.ops.convert_to_numpy(ids)
        except Exception as e:
            raise ArgumentTypeError(f"detokenize() takes token ids, got "
                                    f"{_describe(ids)}.") from e
    try:
        array = np.asarray(ids)
    except ValueError as e:  # a ragged nesting NumPy cannot stack
        raise ArgumentTypeError(f"ids must be a sequence of ids or of id sequences, got "
                                f"{_describe(ids)}.") from e
    if array.dtype.kind not in "iu" and not (array.size == 0 and array.dtype.kind == "f"):
        raise ArgumentTypeError(f"ids must be integers, got {array.dtype} values "
                                f"{_describe(ids)}.")
    return array.astype("int64") if array.dtype.kind == "f" else array
