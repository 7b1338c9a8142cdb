"""Export a GemmaCausalLM to a TensorFlow SavedModel or a LiteRT (TFLite) model.

    gk.export(lm, "out/saved_model", format="saved_model")
    gk.export(lm, "out/gemma.tflite", format="litert", quantize="int8")

Exported graphs are always traced under TensorFlow. A model built on JAX or PyTorch is
handed over as a temporary preset to a child Python process running Keras' TensorFlow
backend (a Keras process has one backend), so export works whichever backend built the
model, as long as TensorFlow is installed. LoRA adapters are merged into the exported
weights; the model itself is left as it was.

What each format holds is in `gemma_keras/exporting/build.py`; the LiteRT reference runner
is `gemma_keras.exporting.runner.LiteRTGenerator`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Optional

from gemma_keras.errors import ConfigError, ExportError

FORMATS = ("saved_model", "litert")
QUANTIZE = (None, "int8", "float16")
# A FlatBuffer addresses its contents with 32-bit offsets.
FLATBUFFER_LIMIT = 2 ** 31
DEFAULT_MAX_LENGTH = 1024
DEFAULT_PREFILL_LENGTH = 128
METADATA_FILE = "gemma_export.json"


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


def export(lm, path, format="saved_model", quantize=None, max_length=None,
           prefill_length=None, allow_large_file=False, overwrite=False):
    """Exports `lm` for serving or on-device generation.

    format="saved_model": a directory loadable by `tf.saved_model.load` with TensorFlow and
        tensorflow-text only (no Keras, no gemma_keras). Signatures `generate` (prompts
        [batch] string, max_new_tokens int32 -> completion, text, token_ids, num_tokens;
        greedy, stops at <eos> and, for instruct models, <end_of_turn>) and `logits`
        (token_ids, padding_mask [batch, seq] int32 -> logits [batch, seq, vocab]).
    format="litert": a .tflite file (or a directory, which then holds model.tflite) with
        `prefill` and `decode` signatures and the KV cache as explicit inputs/outputs, plus
        the SentencePiece model (tokenizer.model) and a JSON description beside it.
        quantize: None (float32), "float16" or "int8" (weights only; activations stay
        float32). prefill_length: tokens per prefill call (longer prompts go in chunks).
        allow_large_file: past the 2 GiB FlatBuffer limit, store the weights after the
        FlatBuffer (needs a LiteRT runtime that reads such files, e.g. ai-edge-litert).
    max_length: the longest sequence (prompt + generated tokens) the export serves; it sizes
        the KV cache. Defaults to min(1024, the model's context).

    The export is written under a temporary name and renamed, so an interrupted export leaves
    nothing half-written at `path`. An existing target (the directory; for LiteRT the .tflite
    file or its .json, or a tokenizer.model beside it that differs) is refused before any work
    (TargetExistsError) unless `overwrite=True`.
    """
    spec = _spec(lm, path, format, quantize, max_length, prefill_length, allow_large_file,
                 overwrite)
    import keras

    if keras.backend.backend() == "tensorflow":
        from gemma_keras.exporting import build

        build.export_model(lm, spec)
    else:
        _export_in_tensorflow_process(lm, spec)
    return pathlib.Path(spec.path)


def _spec(lm, path, format, quantize, max_length, prefill_length, allow_large_file,
          overwrite=False):
    config = lm.backbone.config
    if format not in FORMATS:
        raise ConfigError(f"format={format!r}: choose one of {FORMATS}.")
    if quantize not in QUANTIZE:
        raise ConfigError(f"quantize={quantize!r}: choose one of {QUANTIZE}.")
    if quantize is not None and format != "litert":
        raise ConfigError(f"quantize={quantize!r} applies to format='litert' only; a "
                          "SavedModel keeps the model's own dtype.")
    if lm.tokenizer is None:
        raise ExportError("This model has no tokenizer; an export ships one (the SavedModel "
                          "tokenizes inside the graph, LiteRT puts tokenizer.model beside). "
                          "Build the GemmaCausalLM with a GemmaTokenizer.")
    context = config.max_sequence_length
    max_length = min(DEFAULT_MAX_LENGTH, context) if max_length is None else max_length
    if not isinstance(max_length, int) or not 2 <= max_length <= context:
        raise ConfigError(f"max_length={max_length!r} must be an integer in [2, {context}] "
                          "(the model's context).")
    prefill_length = (min(DEFAULT_PREFILL_LENGTH, max_length) if prefill_length is None
                      else prefill_length)
    if not isinstance(prefill_length, int) or not 1 <= prefill_length <= max_length:
        raise ConfigError(f"prefill_length={prefill_length!r} must be an integer in "
                          f"[1, max_length={max_length}].")
    for layer in lm.backbone._flatten_layers(include_self=False):
        mode = getattr(layer, "quantization_mode", None)
        if mode is not None:
            raise ExportError(
                f"Layer '{layer.path}' is {mode}-quantized: export writes float weights and "
                "quantizes them itself. Export the float model (before quantize(), or "
                "merge_lora() into a float base) and pass quantize='int8' for LiteRT.")
    if format == "litert":
        check_flatbuffer_size(config, quantize, allow_large_file)
    target = pathlib.Path(path).expanduser().absolute()
    if target.exists() and target.is_dir() and format == "litert" and any(target.iterdir()) \
            and not (target / "model.tflite").exists():
        raise ExportError(f"{target} is a directory with other files in it; export LiteRT "
                          "to a new directory or to a path ending in .tflite.")
    check_export_target(target, format, lm.tokenizer.proto, overwrite)
    return ExportSpec(str(target), format, quantize, max_length, prefill_length,
                      bool(allow_large_file), bool(overwrite))


def check_export_target(target, format, tokenizer_proto=None, overwrite=False):
    """Refuses existing export files unless `overwrite` (the policy of checkpoints/atomic.py).
    A LiteRT export is three files; a tokenizer.model already beside it with the same bytes
    (another export of the same model in that directory) is shared, not a conflict."""
    from gemma_keras.checkpoints.atomic import check_target

    if format != "litert":
        return check_target(target, overwrite, directory=True)
    from gemma_keras.exporting.build import litert_paths

    model_path, tokenizer_path, metadata_path = litert_paths(target)
    check_target(model_path, overwrite)
    check_target(metadata_path, overwrite)
    if (tokenizer_path.is_file() and tokenizer_proto is not None
            and tokenizer_path.read_bytes() != tokenizer_proto):
        check_target(tokenizer_path, overwrite)
    return target


def litert_size_estimate(config, quantize) -> int:
    """Bytes of weights a LiteRT file holds: one copy of each weight (the tied table serves
    the lookup and the head), int8 adding a float scale per output row."""
    per = {None: 4, "float16": 2, "int8": 1}[quantize]
    total = config.parameter_count() * per
    if quantize == "int8":
        d = config.hidden_dim
        rows = config.vocabulary_size + config.num_layers * (
            (config.num_query_heads + 2 * config.num_key_value_heads) * config.head_dim
            + d + 2 * config.ffn_branch_dim + d)
        total += 4 * rows
    return total


def check_flatbuffer_size(config, quantize, allow_large_file=False):
    size = litert_size_estimate(config, quantize)
    if size <= FLATBUFFER_LIMIT or allow_large_file:
        return
    gib = 1024 ** 3
    options = [f"quantize={q!r} (about {litert_size_estimate(config, q) / gib:.2f} GiB)"
               for q in ("float16", "int8")
               if QUANTIZE.index(q) > QUANTIZE.index(quantize)
               and litert_size_estimate(config, q) <= FLATBUFFER_LIMIT]
    options.append("allow_large_file=True (weights stored after the FlatBuffer; needs a "
                   "LiteRT runtime that reads such files)")
    raise ExportError(
        f"A LiteRT export of this model with quantize={quantize!r} holds about "
        f"{size / gib:.2f} GiB of weights, over the FlatBuffer limit of 2 GiB. "
        f"Use {' or '.join(options)}.")


def _export_in_tensorflow_process(lm, spec):
    """Writes `lm` (LoRA merged) as a preset and exports it from a TensorFlow process."""
    from gemma_keras.checkpoints.keras_hub_format import write_preset

    try:
        import tensorflow  # noqa: F401  (only to fail early and clearly)
    except ImportError:
        raise ExportError("Export traces the model in TensorFlow, which is not installed: "
                          "pip install \"gemma-keras[tensorflow]\" (and \"gemma-keras[litert]\" "
                          "to run a .tflite with gemma_keras.exporting.runner).") from None
    with tempfile.TemporaryDirectory(prefix="gemma_export_") as tmp:
        preset = pathlib.Path(tmp) / "preset"
        # The preset records lm.instruct, which the child's from_preset reads back.
        write_preset(lm.backbone, lm.tokenizer, preset,
                     sequence_length=lm.backbone.config.max_sequence_length,
                     instruct=lm.instruct)
        env = dict(os.environ, KERAS_BACKEND="tensorflow",
                   GEMMA_KERAS_EXPORT_PARENT=str(os.getpid()))
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        command = [sys.executable, "-m", "gemma_keras.exporting.build", str(preset),
                   spec.to_json()]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        raise ExportError(f"Exporting in a TensorFlow process failed (exit "
                          f"{result.returncode}); nothing was written to {spec.path}. Its "
                          f"error:\n{tail}")

