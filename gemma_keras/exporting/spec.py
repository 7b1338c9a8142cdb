"""What an export is, shared by the process that asks for it (`gemma_keras.exporting.export`),
the TensorFlow process that writes it (`build.py`) and the LiteRT runner (`runner.py`, which
imports no Keras): the formats and limits, the `ExportSpec` handed to the child, the LiteRT
file names, the chat template as the export's metadata records and applies it, and the filter
that keeps the native runtimes' log lines off the terminal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import sys
import tempfile
from typing import Optional

from gemma_keras.errors import ArgumentTypeError, ExportError, InvalidArgumentError
from gemma_keras.tokenizer import TURN_OPENER, format_chat, sends_as_chat

FORMATS = ("saved_model", "litert")
QUANTIZE = (None, "int8", "float16")
# A FlatBuffer addresses its contents with 32-bit offsets.
FLATBUFFER_LIMIT = 2 ** 31
DEFAULT_MAX_LENGTH = 1024
DEFAULT_PREFILL_LENGTH = 128
METADATA_FILE = "gemma_export.json"
# The SavedModel signature that continues the text as written (generate's chat_template=False).
NO_TEMPLATE_SIGNATURE = "generate_no_chat_template"
TENSORFLOW_EXTRA = ("pip install \"gemma-keras[tensorflow]\" (and \"gemma-keras[litert]\" to run "
                    "a .tflite with gemma_keras.exporting.runner)")


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    path: str
    format: str
    quantize: Optional[str]
    max_length: int
    prefill_length: int
    allow_large_file: bool
    overwrite: bool = False

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


def litert_paths(path):
    """(model file, tokenizer file, metadata file) for a LiteRT export path."""
    path = pathlib.Path(path)
    model = path if path.suffix == ".tflite" else path / "model.tflite"
    return model, model.parent / "tokenizer.model", model.with_suffix(".json")


def chat_template_metadata():
    """Gemma's one-user-turn prompt as the strings around the user's text, for the export's
    metadata: {"prefix", "suffix", "unless_contains"}. Taken from `format_chat`, the format's
    one owner, and checked to be prefix + text + suffix for any text, so the SavedModel's
    graph and the runner (which have no gemma_keras) build exactly the string `generate`
    tokenizes. "unless_contains": the turn-opening piece; a prompt holding it already has
    turns and is sent as it is (generate's "auto" rule, sends_as_chat in
    gemma_keras/tokenizer.py)."""
    probe = "\ue000"  # a private-use character: not in the template's own text
    prefix, suffix = format_chat([("user", probe)]).split(probe)
    for text in ("", "a\nb ", probe * 2, "\u3000 x\t\n"):
        # The text is trimmed as Google's template trims it (str.strip).
        if format_chat([("user", text)]) != prefix + text.strip() + suffix:
            raise ExportError("gemma_keras.tokenizer.format_chat no longer puts the user's "
                              "text between a fixed prefix and suffix; the export's chat "
                              "template (gemma_keras/exporting) needs updating.")
    return {"prefix": prefix, "suffix": suffix, "strip": True,
            "unless_contains": TURN_OPENER}


def chat_template_value(chat_template):
    """generate's chat_template values: "auto", True or False."""
    if isinstance(chat_template, bool) or (isinstance(chat_template, str)
                                           and chat_template == "auto"):
        return chat_template
    raise (InvalidArgumentError if isinstance(chat_template, str) else ArgumentTypeError)(
        f"chat_template must be 'auto', True or False, got {chat_template!r}.")


def apply_chat_template(metadata, text, chat_template="auto"):
    """The prompt string an export sends for `text`: `lm.generate`'s rule, from the export's
    metadata. "auto": an instruct model's non-empty text without turn markers becomes one
    user turn; True: always; False: never. Pure Python, the reference for other runtimes."""
    template = metadata.get("chat_template")
    if chat_template == "auto" and template is None:
        chat_template = False  # an export from before exports recorded the template
    if not sends_as_chat(metadata.get("instruct"), chat_template, text):
        return text
    if template is None:
        raise InvalidArgumentError(
            "chat_template=True: this export has no chat template (it was exported before "
            "exports recorded one): export it again.")
    # "strip": exports from before format_chat trimmed the text do not have it.
    body = text.strip() if template.get("strip") else text
    return template["prefix"] + body + template["suffix"]


# TensorFlow's C++ logs (absl's "I0000 00:00:... file.cc:12] ...", TensorFlow's older
# "2025-01-01 12:00:00.0: W tensorflow/...", SentencePiece's "normalizer.cc(51) LOG(INFO)",
# the LiteRT interpreter's "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."):
# the converter alone writes a dozen lines per export. TF_CPP_MIN_LOG_LEVEL does not reach
# absl's logs, nor a TensorFlow imported before it was set, so they are filtered from the
# file descriptor.
_NATIVE_LOG = re.compile(
    r"^(?:[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w./-]+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] \S+:\d+\] "
    r"|[\w./-]+\.cc\(\d+\) LOG\(\w+\) "
    r"|INFO: Created TensorFlow Lite \w+ delegate for )")


@contextlib.contextmanager
def native_logs_hidden():
    """Runs the body with file descriptor 2 captured; afterwards writes back every line that
    is not a native (C++) log line, or everything when the body raised (the logs may explain
    it). Python's own warnings and errors still reach the terminal."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to keep quiet
        yield
        return
    failed = True
    with tempfile.TemporaryFile() as log:
        sys.stderr.flush()
        os.dup2(log.fileno(), 2)
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            lines = log.read().decode("utf-8", "replace").splitlines(keepends=True)
            kept = "".join(line for line in lines
                           if failed or not _NATIVE_LOG.match(line))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()
