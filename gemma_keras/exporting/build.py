"""Writing exports, under Keras' TensorFlow backend (in the user's process when that is the
backend, else in a child process: `python -m gemma_keras.exporting.build PRESET SPEC`).

SavedModel directory:
    saved_model.pb, variables/      signatures `generate`, `generate_no_chat_template`, `logits`
    assets.extra/tokenizer.model    the SentencePiece model (also inside the graph)
    assets.extra/gemma_export.json  what was exported: config, max_length, special ids
LiteRT (path ending in .tflite, or a directory holding model.tflite):
    <name>.tflite                   signatures `prefill` and `decode`
    tokenizer.model, <name>.json    beside it, for the runner (see runner.py)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile

import keras

import gemma_keras
from gemma_keras.causal_lm import GemmaCausalLM
from gemma_keras.checkpoints.atomic import atomic_directory, atomic_file
from gemma_keras.checkpoints.weights import copied_backbone
from gemma_keras.errors import ExportError, GemmaError
from gemma_keras.exporting.spec import (FLATBUFFER_LIMIT, METADATA_FILE, NO_TEMPLATE_SIGNATURE,
                                        ExportSpec, chat_template_metadata, litert_paths,
                                        native_logs_hidden)
from gemma_keras.generation.generate import resolve_stop_ids
from gemma_keras.lora import lora_state


def export_model(lm, spec: ExportSpec):
    stop_ids = sorted(resolve_stop_ids(lm, "auto"))
    # LiteRT runs float32 activations whatever the weights are stored in.
    dtype = "float32" if spec.format == "litert" else None
    lm = _plain_model(lm, dtype)
    metadata = _metadata(lm, spec, stop_ids)
    with native_logs_hidden():
        if spec.format == "saved_model":
            write_saved_model(lm, spec, stop_ids, metadata)
        else:
            write_litert(lm, spec, metadata)


def _plain_model(lm, dtype=None):
    """`lm` itself, or a copy with LoRA merged (and cast to `dtype`): what is exported. The
    user's model keeps its adapters."""
    backbone = lm.backbone
    if lora_state(backbone) is None and dtype in (None, backbone.dtype_policy.name):
        return lm
    return GemmaCausalLM(copied_backbone(backbone, dtype, "the model being exported"),
                         lm.tokenizer, instruct=lm.instruct)


def _metadata(lm, spec, stop_ids):
    from gemma_keras.exporting.signatures import cache_names

    config, tokenizer = lm.backbone.config, lm.tokenizer
    return {
        "format": spec.format,
        "gemma_keras_version": gemma_keras.__version__,
        "keras_version": keras.__version__,
        "max_length": spec.max_length,
        "prefill_length": spec.prefill_length if spec.format == "litert" else None,
        "quantize": spec.quantize,
        "dtype": "float32" if spec.format == "litert" else lm.backbone.dtype_policy.name,
        "vocabulary_size": config.vocabulary_size,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "stop_token_ids": stop_ids,
        "instruct": lm.instruct,
        # What generate does to a string prompt by default (apply_chat_template reads it) and
        # which ids its text leaves out (skip_special_tokens=True), so exports answer alike.
        "chat_template": chat_template_metadata(),
        "skip_token_ids": sorted(tokenizer.special_token_ids),
        "kv_cache": {"names": cache_names(config),
                     "shape": [1, spec.max_length, config.num_key_value_heads, config.head_dim]},
        "tokenizer": "tokenizer.model",
        "config": config.to_dict(),
    }


def write_saved_model(lm, spec, stop_ids, metadata):
    import tensorflow as tf

    from gemma_keras.exporting.signatures import generate_fns, logits_fn

    backbone = lm.backbone
    # Not archive.track(backbone): the endpoints' variables are saved anyway, and tracking
    # the model as well saved every weight twice (Keras 3.15: 33.6 vs 16.8 MB for the demo).
    archive = keras.export.ExportArchive()
    generate, raw, sentencepiece = generate_fns(
        backbone, lm.tokenizer, spec.max_length, stop_ids, metadata["instruct"] is True,
        metadata["chat_template"], metadata["skip_token_ids"])
    archive.track(sentencepiece)
    # `generate` as lm.generate's default (the chat template for an instruct model); the
    # second as chat_template=False. Two signatures rather than an argument: a SavedModel
    # signature has no default values, and callers of `generate` keep working.
    for name, function in (("generate", generate), (NO_TEMPLATE_SIGNATURE, raw)):
        archive.add_endpoint(name, function, input_signature=[
            tf.TensorSpec([None], tf.string, name="prompts"),
            tf.TensorSpec([], tf.int32, name="max_new_tokens")])
    archive.add_endpoint("logits", logits_fn(backbone), input_signature=[
        tf.TensorSpec([None, None], tf.int32, name="token_ids"),
        tf.TensorSpec([None, None], tf.int32, name="padding_mask")])
    with atomic_directory(spec.path, spec.overwrite) as tmp:
        archive.write_out(str(tmp), verbose=False)
        extra = tmp / "assets.extra"
        extra.mkdir(exist_ok=True)
        (extra / "tokenizer.model").write_bytes(lm.tokenizer.proto)
        (extra / METADATA_FILE).write_text(json.dumps(metadata, indent=2))


def write_litert(lm, spec, metadata):
    import tensorflow as tf

    from gemma_keras.exporting.signatures import litert_signature, litert_step

    backbone, config = lm.backbone, lm.backbone.config
    archive = keras.export.ExportArchive()
    archive.add_endpoint("prefill", litert_step(backbone, spec.max_length, with_logits=False),
                         input_signature=litert_signature(config, spec.prefill_length,
                                                          spec.max_length))
    archive.add_endpoint("decode", litert_step(backbone, spec.max_length, with_logits=True),
                         input_signature=litert_signature(config, 1, spec.max_length))
    with tempfile.TemporaryDirectory(prefix="gemma_litert_") as tmp:
        archive.write_out(tmp, verbose=False)
        del archive
        converter = tf.lite.TFLiteConverter.from_saved_model(
            tmp, signature_keys=["prefill", "decode"])
        # The cache update is one dynamic-update-slice per layer; without this flag the
        # converter would fall back to a TF op that the LiteRT runtime lacks.
        converter._experimental_enable_dynamic_update_slice = True
        # Otherwise the final soft-cap's division is folded into the head: a second,
        # pre-divided copy of the embedding table (the lookup keeps the original).
        converter._experimental_disable_fuse_mul_and_fc = True
        if spec.quantize == "int8":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]  # int8 weights, per channel
        elif spec.quantize == "float16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        if spec.allow_large_file:
            converter._experimental_use_buffer_offset = True
        try:
            flatbuffer = converter.convert()
        except Exception as e:
            raise ExportError(f"The LiteRT converter failed: {str(e).strip()[:2000]}") from e
    if len(flatbuffer) > FLATBUFFER_LIMIT and not spec.allow_large_file:
        raise ExportError(f"The converted model is {len(flatbuffer) / 1024 ** 3:.2f} GiB, over "
                          "the 2 GiB FlatBuffer limit; export with quantize='int8' or "
                          "allow_large_file=True.")
    model_path, tokenizer_path, metadata_path = litert_paths(spec.path)
    # Three files, each replaced atomically but not together: a crash between them leaves a
    # new model beside the old metadata. The metadata, written last, records the other two
    # files' hashes, and the runner refuses files that do not match it.
    metadata = dict(metadata, tokenizer=tokenizer_path.name, file_bytes=len(flatbuffer),
                    model_sha256=hashlib.sha256(flatbuffer).hexdigest(),
                    tokenizer_sha256=hashlib.sha256(lm.tokenizer.proto).hexdigest())
    for target, data in ((model_path, flatbuffer), (tokenizer_path, lm.tokenizer.proto),
                         (metadata_path, json.dumps(metadata, indent=2).encode())):
        # The tokenizer may be shared with another export in the directory (checked equal).
        with atomic_file(target, spec.overwrite or target == tokenizer_path) as tmp:
            tmp.write_bytes(data)


def _die_with_parent():
    """The export dies with the process that asked for it. A parent stopped by an exception
    or Ctrl-C kills this child itself (subprocess.run does); a parent killed outright
    (SIGKILL, the OOM killer) cannot, and this export would go on and, minutes later,
    replace the target after the user had moved on (even over a newer export of theirs).
    Linux only (prctl PR_SET_PDEATHSIG); elsewhere the child finishes on its own."""
    import ctypes
    import signal

    parent = os.environ.get("GEMMA_KERAS_EXPORT_PARENT")
    if not sys.platform.startswith("linux") or not (parent or "").isdigit():
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        os._exit(1)


def _main(argv):
    """The child process: argv = [preset directory, spec JSON]."""
    preset, spec = argv
    spec = ExportSpec(**json.loads(spec))
    try:
        lm = GemmaCausalLM.from_preset(preset, dtype="float32" if spec.format == "litert"
                                       else None)
        export_model(lm, spec)
    except GemmaError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    _die_with_parent()
    sys.exit(_main(sys.argv[1:]))
