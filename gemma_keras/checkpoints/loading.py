"""From a handle or directory to a built, loaded backbone: format detection in one place."""

from __future__ import annotations

import pathlib
from typing import Optional, Tuple

from gemma_keras.checkpoints import hf_format, keras_hub_format, quantizing
from gemma_keras.checkpoints.quantizing import DEFAULT_BLOCK_SIZE
from gemma_keras.checkpoints.reading import read_json
from gemma_keras.checkpoints.resolve import is_local, resolve_preset
from gemma_keras.checkpoints.weights import QuantizedEntry, backbone_from_checkpoint
from gemma_keras.config import GemmaConfig
from gemma_keras.errors import CheckpointError, ConfigError
from gemma_keras.presets import card_for_handle

DTYPES = ("float32", "bfloat16", "float16")


def _check_dtype(dtype):
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; choose one of {DTYPES}.")


def checkpoint_format(directory: pathlib.Path) -> str:
    """'keras_hub' or 'hf', from what config.json holds."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{directory} has no config.json: it is not a keras-hub preset or a Hugging Face "
            "checkpoint directory.")
    data = read_json(config_path)
    if "registered_name" in data:
        return "keras_hub"
    if "model_type" in data:
        return "hf"
    raise ConfigError(f"{config_path} is neither a keras-hub nor a Hugging Face config "
                      "(no 'registered_name' or 'model_type').")


def read_preset_config(directory: pathlib.Path) -> Tuple[GemmaConfig, Optional[str], str]:
    """(config, saved dtype, format) where format is 'keras_hub' or 'hf'."""
    fmt = checkpoint_format(directory)
    module = keras_hub_format if fmt == "keras_hub" else hf_format
    config, dtype = module.read_config(directory)
    return config, dtype, fmt


def read_instruct(preset, directory: pathlib.Path) -> Optional[bool]:
    """Whether `preset` (resolved to `directory`) is instruction-tuned: the card says for an
    official preset (a built-in name, or the kaggle:// or hf:// handle of one); otherwise the
    checkpoint says what `save_to_preset` recorded in it (the bundled demo too). None when
    nothing says."""
    card = None if is_local(preset) else card_for_handle(preset)
    if card is not None:
        return card.instruct
    module = keras_hub_format if checkpoint_format(directory) == "keras_hub" else hf_format
    return module.read_instruct(directory)


def load_backbone(preset, dtype: Optional[str] = None, quantize: Optional[str] = None,
                  block_size=DEFAULT_BLOCK_SIZE):
    """Resolves `preset`, builds a GemmaBackbone from its config and fills in its weights.

    dtype: "float32", "bfloat16" or "float16"; None keeps the checkpoint's dtype. Weights are
    cast one tensor at a time as they are read. quantize: None, "int8" or "int4" (groups of
    `block_size` inputs; None / -1 per channel): each projection and the embedding is
    quantized as soon as it is read, so the float model never exists whole. A preset saved
    quantized loads quantized (quantize may then name the same quantization, or be None).
    """
    _check_dtype(dtype)
    wanted = quantizing.requested(quantize, block_size)  # bad arguments fail before any I/O
    directory = resolve_preset(preset)
    config, saved_dtype, fmt = read_preset_config(directory)
    if fmt == "keras_hub":
        reader = keras_hub_format.reader(directory, config)
    else:
        model_type = read_json(directory / "config.json")["model_type"]
        reader = hf_format.reader(directory, model_type)
    saved = sorted({entry.mode for entry in reader.values()
                    if isinstance(entry, QuantizedEntry)})
    if saved and wanted is not None:
        if saved != [quantizing.policy_mode(*wanted)]:
            raise ConfigError(
                f"{directory} holds {'/'.join(saved)}-quantized weights; quantize={quantize!r} "
                f"(block_size={block_size!r}) asks for {quantizing.policy_mode(*wanted)}. "
                "Load it without quantize=, or quantize its float original instead.")
        wanted = None  # already as asked
    chosen = dtype or (saved_dtype if saved_dtype in DTYPES else "float32")
    backbone = backbone_from_checkpoint(config, chosen, reader, str(directory), wanted)
    return backbone, directory
