"""Export a GemmaCausalLM to a TensorFlow SavedModel or a LiteRT (TFLite) model.

    gk.export(lm, "out/saved_model")                      # a SavedModel directory
    gk.export(lm, "out/gemma.tflite", quantize="int8")    # LiteRT: the .tflite suffix says so

Exported graphs are always traced under TensorFlow. A model built on JAX or PyTorch is
handed over as a temporary preset to a child Python process running Keras' TensorFlow
backend (a Keras process has one backend), so export works whichever backend built the
model, as long as TensorFlow is installed. LoRA adapters are merged into the exported
weights; the model itself is left as it was.

Exports answer like `GemmaCausalLM.generate`'s defaults: an instruct model's string prompt is
sent as one user turn of Gemma's chat format (the SavedModel's `generate` signature and the
LiteRT runner; `generate_no_chat_template` / `chat_template=False` / `--no-chat-template`
continue the text as written), generation stops at the same stop ids, and the same special
pieces are left out of the text. The template's strings are taken from
`gemma_keras.tokenizer.format_chat` at export time and written into the export's metadata.

What each format holds is in `gemma_keras/exporting/build.py`; the LiteRT reference runner
is `gemma_keras.exporting.runner.LiteRTGenerator`.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import tempfile

from gemma_keras.errors import (ArgumentTypeError, ConfigError, ExportError,
                                MissingExtraError)
# The shared definitions, importable from here as before (tests, the CLI, other runtimes).
from gemma_keras.exporting.spec import (  # noqa: F401
    DEFAULT_MAX_LENGTH, DEFAULT_PREFILL_LENGTH, FLATBUFFER_LIMIT, FORMATS, METADATA_FILE,
    NO_TEMPLATE_SIGNATURE, QUANTIZE, TENSORFLOW_EXTRA, ExportSpec, apply_chat_template,
    chat_template_metadata, chat_template_value, litert_paths)


def export(lm, path, format=None, quantize=None, max_length=None,
           prefill_length=None, allow_large_file=False, overwrite=False):
    """Exports `lm` for serving or on-device generation.

    format: "saved_model" or "litert"; None (default) picks "litert" for a path ending in
        .tflite and "saved_model" otherwise (a SavedModel is a directory: format="saved_model"
        with a .tflite path is refused rather than writing a directory named like a file).
    format="saved_model": a directory loadable by `tf.saved_model.load` with TensorFlow and
        tensorflow-text only (no Keras, no gemma_keras). Signatures `generate` (prompts
        [batch] string, max_new_tokens int32 -> completion, text, token_ids, num_tokens;
        greedy, stops at <eos> and, for instruct models, <end_of_turn>; an instruct model's
        prompts go in Gemma's chat format as with `lm.generate`'s default),
        `generate_no_chat_template` (the same, prompts sent as written, as
        `lm.generate(..., chat_template=False)`) and `logits` (token_ids, padding_mask
        [batch, seq] int32 -> logits [batch, seq, vocab]).
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
    # Here, not at the top: the LiteRT runner imports this package and no Keras.
    from gemma_keras import keras_internals
    from gemma_keras.causal_lm import GemmaCausalLM

    if not isinstance(lm, GemmaCausalLM):
        raise ArgumentTypeError(f"export(lm=...) takes a gk.GemmaCausalLM (e.g. "
                                f"gk.GemmaCausalLM.from_preset(...)), got {type(lm).__name__}.")
    for name, value in (("overwrite", overwrite), ("allow_large_file", allow_large_file)):
        # Not truthiness: overwrite="no" would replace the target.
        if not isinstance(value, bool):
            raise ArgumentTypeError(f"{name} must be True or False, got {value!r}.")
    config = lm.backbone.config
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"path must be a str or pathlib.Path (a directory, or a file "
                                f"ending in .tflite), got {type(path).__name__}.")
    format = resolve_format(path, format)
    if quantize not in QUANTIZE:
        raise ConfigError(f"quantize={quantize!r}: choose one of {QUANTIZE}.")
    if quantize is not None and format != "litert":
        raise ConfigError(f"quantize={quantize!r} applies to format='litert' only; a "
                          "SavedModel keeps the model's own dtype.")
    check_tensorflow(format)
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
    for layer in keras_internals.sublayers(lm.backbone):
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


def resolve_format(path, format=None):
    """The export format for `path`: `format` when given, else "litert" for a path ending in
    .tflite and "saved_model" otherwise. A .tflite path with format="saved_model" is refused:
    a SavedModel is a directory, and one named like a LiteRT file is a mistake waiting to
    happen (a runtime handed it fails far from the cause)."""
    if format is None:
        return "litert" if _is_tflite(path) else "saved_model"
    if format not in FORMATS:
        raise ConfigError(f"format={format!r}: choose one of {FORMATS}, or None to choose by "
                          "the path (.tflite: litert).")
    if format == "saved_model" and _is_tflite(path):
        raise ConfigError(f"{path} ends in .tflite, but format='saved_model' writes a "
                          "directory: export to a path without .tflite, or use "
                          "format='litert'.")
    return format


def _is_tflite(path):
    return isinstance(path, (str, os.PathLike)) and \
        pathlib.Path(path).suffix.lower() == ".tflite"


def check_tensorflow(format):
    """Refuses to start an export that cannot finish: it is traced in TensorFlow, and the
    SavedModel's tokenizer is tensorflow-text's op. Checked with find_spec, without importing
    either (an import takes seconds and prints TensorFlow's C++ logs)."""
    needed = ("tensorflow", "tensorflow_text") if format == "saved_model" else ("tensorflow",)
    missing = [name for name in needed if not _installed(name)]
    if missing:
        raise MissingExtraError(
            f"Export traces the model in TensorFlow; {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed: {TENSORFLOW_EXTRA}.")


def _installed(module):
    if module in sys.modules:  # imported already (find_spec fails on a module set to None)
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_export_target(target, format, tokenizer_proto=None, overwrite=False):
    """Refuses existing export files unless `overwrite` (the policy of checkpoints/atomic.py).
    A LiteRT export is three files; a tokenizer.model already beside it with the same bytes
    (another export of the same model in that directory) is shared, not a conflict."""
    from gemma_keras.checkpoints.atomic import check_target

    if format != "litert":
        return check_target(target, overwrite, directory=True)
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

    # TensorFlow's presence was checked (check_tensorflow) without importing it here: the
    # import alone takes seconds and prints its C++ logs on this process's stderr.
    with tempfile.TemporaryDirectory(prefix="gemma_export_") as tmp:
        preset = pathlib.Path(tmp) / "preset"
        # The preset records lm.instruct, which the child's from_preset reads back.
        write_preset(lm.backbone, lm.tokenizer, preset,
                     sequence_length=lm.backbone.config.max_sequence_length,
                     instruct=lm.instruct)
        env = dict(os.environ, KERAS_BACKEND="tensorflow",
                   GEMMA_KERAS_EXPORT_PARENT=str(os.getpid()))
        # The child's stderr is captured (shown only if it fails); this quiets what it can.
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        command = [sys.executable, "-m", "gemma_keras.exporting.build", str(preset),
                   spec.to_json()]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        raise ExportError(f"Exporting in a TensorFlow process failed (exit "
                          f"{result.returncode}); nothing was written to {spec.path}. Its "
                          f"error:\n{tail}")

