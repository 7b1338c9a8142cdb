"""A small reference runner for LiteRT exports: greedy text generation with the LiteRT
interpreter, the way an on-device runtime drives the `prefill` and `decode` signatures.

Needs only numpy, sentencepiece and the interpreter (`pip install ai-edge-litert`; TensorFlow's
`tf.lite.Interpreter` is used when that is missing). It does not import Keras or TensorFlow
otherwise, so it is also a template for a runtime elsewhere:

    python -m gemma_keras.exporting.runner out/gemma.tflite "What is Keras?" --max-new-tokens 32

It answers like `GemmaCausalLM.generate`'s defaults: for an instruct model (the JSON's
"instruct") a prompt goes in as one user turn of Gemma's chat format, built from the JSON's
"chat_template" strings (`--no-chat-template` / chat_template=False: the text as written);
generation ends at the JSON's "stop_token_ids" and its "skip_token_ids" stay out of the text.

The protocol (see signatures.py):
1. Tokens are <bos> + the prompt's pieces (gemma_keras.exporting.apply_chat_template says
   which string that is). Every cache tensor starts as zeros.
2. `prefill(tokens [1, P], input_pos [P], kv_cache_*)` for all prompt tokens but the last,
   P at a time; a short last chunk is padded at the end with input_pos -1. Each call returns
   the updated `kv_cache_*`, fed to the next call.
3. `decode(tokens [1, 1], input_pos [1], kv_cache_*)` with the last prompt token, then with
   each generated token at the next position; it returns `logits` [1, vocab] and the cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
from typing import List, Optional

import numpy as np

# Keras-free: the stop rules GemmaCausalLM.generate follows, and its chat-template rule.
from gemma_keras.errors import ArgumentTypeError, ExportError, GemmaError, InvalidArgumentError
from gemma_keras.exporting.spec import (apply_chat_template, chat_template_value, litert_paths,
                                        native_logs_hidden)
from gemma_keras.generation.stopping import completion_ids


def _interpreter(model_path, num_threads):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            import tensorflow as tf
        except ImportError:
            raise ImportError("The LiteRT runner needs an interpreter: pip install "
                              "\"gemma-keras[litert]\" (ai-edge-litert), or tensorflow.") from None
        Interpreter = tf.lite.Interpreter
    return Interpreter(model_path=str(model_path), num_threads=num_threads)


def _check_hash(path: pathlib.Path, want: Optional[str], metadata_path: pathlib.Path):
    """Refuses `path` when its sha256 is not the one the export's metadata recorded (exports
    before the hashes were recorded have none: not checked). Hashing reads the file once
    (~1 s per GB), before the interpreter maps it."""
    if want is None:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    if digest.hexdigest() != want:
        raise ExportError(
            f"{path} does not match {metadata_path} (not the file that export wrote): an "
            "export interrupted part-way, or files of different exports side by side. "
            "Export again (overwrite=True / --overwrite).")


class LiteRTGenerator:
    """Greedy generation from a LiteRT export written by `gk.export(..., format="litert")`."""

    def __init__(self, path, num_threads: Optional[int] = None):
        model_path, tokenizer_path, metadata_path = litert_paths(path)
        for required in (model_path, metadata_path, tokenizer_path):
            if not required.is_file():
                raise FileNotFoundError(
                    f"{required} does not exist: a LiteRT export is the .tflite file with "
                    "tokenizer.model and its .json beside it, as gk.export writes them.")
        self.metadata = json.loads(metadata_path.read_text())
        for file, key in ((model_path, "model_sha256"), (tokenizer_path, "tokenizer_sha256")):
            _check_hash(file, self.metadata.get(key), metadata_path)
        import sentencepiece as spm

        self.tokenizer = spm.SentencePieceProcessor()
        self.tokenizer.LoadFromSerializedProto(tokenizer_path.read_bytes())
        self.interpreter = _interpreter(model_path, num_threads)
        self._prefill = self.interpreter.get_signature_runner("prefill")
        self._decode = self.interpreter.get_signature_runner("decode")
        self.max_length = self.metadata["max_length"]
        self.prefill_length = self.metadata["prefill_length"]
        self.stop_token_ids = set(self.metadata["stop_token_ids"])
        # Exports written before these were recorded: no template, plain decoding.
        self.skip_token_ids = set(self.metadata.get("skip_token_ids", ()))

    def new_cache(self):
        shape = self.metadata["kv_cache"]["shape"]
        return {name: np.zeros(shape, np.float32) for name in self.metadata["kv_cache"]["names"]}

    def prefill(self, ids: List[int], cache, start: int = 0):
        """Writes `ids` (at positions start..) into the cache; returns the cache. A prompt
        that arrives in parts is prefilled part by part, each at `start` = the tokens the
        cache already holds."""
        length = self.prefill_length
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)):
            raise ArgumentTypeError(f"start must be a whole number (the position of ids[0]), "
                                    f"got {start!r}.")
        if start < 0:
            raise InvalidArgumentError(f"start must be at least 0 (the position of ids[0]), "
                                       f"got {start}.")
        if start + len(ids) > self.max_length:
            raise InvalidArgumentError(f"{start + len(ids)} tokens do not fit this export's "
                                       f"cache of {self.max_length}.")
        for offset in range(0, len(ids), length):
            end = min(len(ids), offset + length)
            # A padded chunk must not run past the cache (its write would be clamped onto
            # other slots): start the last one earlier instead. Rewriting earlier slots with
            # the same tokens at the same positions stores the same keys and values.
            begin = min(offset, self.max_length - length - start)
            if begin < 0:
                # Less than a chunk before the cache's end and the tokens before `start` not
                # ours to rewrite (an earlier call's): one token at a time through `decode`,
                # which writes one slot.
                for i in range(offset, end):
                    _, cache = self.decode(ids[i], start + i, cache)
                continue
            chunk, first = ids[begin:end], start + begin
            tokens = np.zeros((1, length), np.int32)
            positions = np.full((length,), -1, np.int32)
            tokens[0, : len(chunk)] = chunk
            positions[: len(chunk)] = np.arange(first, first + len(chunk))
            cache = dict(self._prefill(tokens=tokens, input_pos=positions, **cache))
        return cache

    def decode(self, token: int, position: int, cache):
        """One step: (logits [vocab] float32, updated cache)."""
        out = dict(self._decode(tokens=np.array([[token]], np.int32),
                                input_pos=np.array([position], np.int32), **cache))
        logits = out.pop("logits")[0]
        return logits, out

    def generate_ids(self, prompt_ids: List[int], max_new_tokens: int = 32) -> List[int]:
        """Greedy continuation of `prompt_ids` (<bos> included); the stop token, if reached,
        ends the list and is not part of it."""
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: start it with <bos>.")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise ArgumentTypeError(f"max_new_tokens must be a whole number (an int), got "
                                    f"{max_new_tokens!r}.")
        if max_new_tokens < 1:
            raise InvalidArgumentError(f"max_new_tokens must be at least 1, got "
                                       f"{max_new_tokens}.")
        if len(prompt_ids) + max_new_tokens > self.max_length:
            raise ValueError(
                f"{len(prompt_ids)} prompt tokens + max_new_tokens={max_new_tokens} exceed "
                f"this export's max_length of {self.max_length}; shorten the prompt or "
                "export with a larger max_length.")
        cache = self.prefill(list(prompt_ids[:-1]), self.new_cache())
        token, position, generated = prompt_ids[-1], len(prompt_ids) - 1, []
        for _ in range(max_new_tokens):
            logits, cache = self.decode(token, position, cache)
            token, position = int(np.argmax(logits)), position + 1
            generated.append(token)
            if token in self.stop_token_ids:
                break
        return completion_ids(generated, self.stop_token_ids)

    def prompt_ids(self, prompt: str, chat_template="auto") -> List[int]:
        """<bos> + the pieces of the string `generate` sends for `prompt`."""
        if not isinstance(prompt, str):
            raise ArgumentTypeError(f"prompt must be a string, got {type(prompt).__name__}.")
        text = apply_chat_template(self.metadata, prompt, chat_template_value(chat_template))
        return [self.metadata["bos_token_id"]] + self.tokenizer.EncodeAsIds(text)

    def generate(self, prompt: str, max_new_tokens: int = 32, chat_template="auto") -> str:
        """The prompt's greedy completion text, as `GemmaCausalLM.generate(prompt,
        include_prompt=False)`: chat_template "auto" (an instruct model's prompt as one user
        turn; False: the text as written; True: always a user turn)."""
        ids = self.generate_ids(self.prompt_ids(prompt, chat_template), max_new_tokens)
        # As GemmaTokenizer.detokenize(skip_special=True): special pieces and ids past the
        # SentencePiece vocabulary (padded embedding tables) are left out.
        size = self.tokenizer.GetPieceSize()
        return self.tokenizer.DecodeIds([i for i in ids
                                         if i < size and i not in self.skip_token_ids])


def _check_model_path(path: pathlib.Path):
    """The mistakes a person makes on the command line, as one line each."""
    if not path.exists():
        return f"{path}: no such file; give the .tflite file that gk.export wrote."
    if path.is_dir():
        if not (path / "model.tflite").is_file():
            return f"{path} is a directory without model.tflite; give the .tflite file."
    elif path.suffix != ".tflite":
        return f"{path} is not a .tflite file; give the .tflite file that gk.export wrote."
    return None


class _UsageError(Exception):
    pass


class _OneLineParser(argparse.ArgumentParser):
    """argparse's mistakes as one line (no usage block), like the gemma-keras CLI's."""

    def error(self, message):
        raise _UsageError(message)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def main(argv=None):
    """Exit status 0, or 2 with one line on stderr for a wrong argument (a --max-new-tokens
    below 1 included), a wrong path, a file that is not a LiteRT export, or a prompt too long
    for the export (no traceback)."""
    import sys

    parser = _OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the .tflite file (or the export directory)")
    parser.add_argument("prompt")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=32)
    parser.add_argument("--no-chat-template", dest="chat_template", action="store_const",
                        const=False, default="auto",
                        help="send the prompt as written (default: an instruct model's "
                             "prompt goes in as one user turn of Gemma's chat format)")
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        print(f"gemma_keras.exporting.runner: error: {e}", file=sys.stderr)
        return 2
    path = pathlib.Path(args.model)
    problem = _check_model_path(path)
    try:
        if problem is None:
            with native_logs_hidden():  # the interpreter's C++ "INFO: Created ... delegate"
                text = LiteRTGenerator(path).generate(args.prompt, args.max_new_tokens,
                                                      chat_template=args.chat_template)
            print(text)
            return 0
    except (FileNotFoundError, ImportError, GemmaError) as e:
        # a missing companion file, no interpreter, files that do not match their JSON
        problem = str(e)
    except ValueError as e:  # the interpreter's "not a model" or our too-long prompt
        problem = f"{path}: {str(e).strip().splitlines()[0]}"
    print(f"gemma_keras.exporting.runner: error: {problem}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
