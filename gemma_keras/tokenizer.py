"""GemmaTokenizer: Gemma's SentencePiece model, with special ids looked up from the vocabulary."""

from __future__ import annotations

import os
import pathlib
from typing import Iterable, List, Sequence, Tuple, Union

import numpy as np
import sentencepiece as spm

from gemma_keras.errors import CheckpointError

# Where each on-disk layout keeps the SentencePiece model, in the order they are tried.
TOKENIZER_FILES = ("assets/tokenizer/vocabulary.spm", "tokenizer.model")


# ---- Gemma's chat format: the one place it is written -----------------------------------
#     <bos><start_of_turn>user\n{message}<end_of_turn>\n<start_of_turn>model\n{reply}<end_of_turn>\n
# Used by `generate` (a string sent to an instruct model), chat sessions and the
# preprocessor's prompt/response pairs.
def format_turn(role: str, text: str) -> str:
    """One turn, opened; `format_turn("model", "")` opens the model's turn."""
    if role not in ("user", "model"):
        raise ValueError(f"role must be 'user' or 'model', got {role!r}.")
    return f"<start_of_turn>{role}\n{text}"


def format_chat(messages: List[Tuple[str, str]], add_generation_prompt: bool = True) -> str:
    """A conversation [(role, text), ...] as Gemma's prompt text (without <bos>); with
    add_generation_prompt the model's turn is opened at the end, ready for its reply."""
    text = "".join(format_turn(role, t) + "<end_of_turn>\n" for role, t in messages)
    return text + (format_turn("model", "") if add_generation_prompt else "")


class GemmaTokenizer:
    """Text <-> token ids with Gemma's SentencePiece model.

    `tokenize` does not add `<bos>` unless asked (as keras-hub's tokenizer); models and
    preprocessors add it. Special ids (`pad`, `bos`, `eos`, `<start_of_turn>`, ...) are read
    from the model's vocabulary, never assumed.
    """

    def __init__(self, proto: Union[bytes, str, os.PathLike]):
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

    @classmethod
    def from_preset(cls, preset) -> "GemmaTokenizer":
        """From a built-in preset name, a kaggle:// or hf:// handle, or a local directory."""
        from gemma_keras.checkpoints.resolve import resolve_preset

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
        token_id = self._sp.PieceToId(token)
        # SentencePiece maps unknown pieces to unk; tell those apart from "<unk>" itself.
        if token_id == self._sp.unk_id() and token != self._sp.IdToPiece(token_id):
            return None
        return token_id

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocabulary_size:
            raise ValueError(f"Token id {token_id} is outside the vocabulary "
                             f"[0, {self.vocabulary_size}).")
        return self._sp.IdToPiece(int(token_id))

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
        """A string gives a list of ids; a list of strings gives a list of lists."""
        if isinstance(text, str):
            return self._encode(text, add_bos, add_eos)
        if isinstance(text, bytes):
            return self._encode(text.decode("utf-8"), add_bos, add_eos)
        return [self._encode(t.decode("utf-8") if isinstance(t, bytes) else t, add_bos, add_eos)
                for t in text]

    def _encode(self, text, add_bos, add_eos):
        if not isinstance(text, str):
            raise TypeError(f"tokenize() takes strings, got {type(text).__name__}.")
        ids = self._sp.EncodeAsIds(text)
        return ([self.bos_token_id] if add_bos else []) + ids + (
            [self.eos_token_id] if add_eos else [])

    def detokenize(self, ids, skip_special: bool = False):
        """Ids back to text. One sequence gives a string; a batch gives a list of strings.

        Never raises on valid-typed input: incomplete byte-fallback sequences decode to
        U+FFFD, and ids beyond the SentencePiece vocabulary (checkpoints pad the embedding to
        256,128 rows) are dropped. With skip_special, pad/bos/eos and turn markers are dropped.
        """
        if isinstance(ids, (list, tuple)) and ids and not np.isscalar(ids[0]):
            return [self.detokenize(row, skip_special) for row in ids]  # batch, maybe ragged
        array = np.asarray(ids)
        if array.ndim == 0:
            return self._decode([int(array)], skip_special)
        if array.ndim == 1:
            return self._decode(array.tolist(), skip_special)
        return [self.detokenize(row, skip_special) for row in array]

    def _decode(self, ids: Iterable[int], skip_special: bool) -> str:
        special = {self.pad_token_id, self.bos_token_id, self.eos_token_id,
                   self.start_of_turn_id, self.end_of_turn_id} if skip_special else set()
        kept = [int(i) for i in ids if 0 <= int(i) < self.vocabulary_size and int(i) not in special]
        return self._sp.DecodeIds(kept)

    def save_assets(self, directory):
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "vocabulary.spm").write_bytes(self.proto)
