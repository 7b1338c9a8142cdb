"""From a handle or directory to a built, loaded backbone: format detection in one place."""

from __future__ import annotations

import pathlib
from typing import Optional, Tuple

from gemma_keras.checkpoints import hf_format, keras_hub_format
from gemma_keras.checkpoints.reading import read_json
from gemma_keras.checkpoints.resolve import resolve_preset
from gemma_keras.config import GemmaConfig
from gemma_keras.errors import CheckpointError, ConfigError

DTYPES = ("float32", "bfloat16", "float16")


def _check_dtype(dtype):
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; choose one of {DTYPES}.")


def read_preset_config(directory: pathlib.Path) -> Tuple[GemmaConfig, Optional[str], str]:
    """(config, saved dtype, format) where format is 'keras_hub' or 'hf'."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{directory} has no config.json: it is not a keras-hub preset or a Hugging Face "
            "checkpoint directory.")
    data = read_json(config_path)
    if "registered_name" in data:
        config, dtype = keras_hub_format.read_config(directory)
        return config, dtype, "keras_hub"
    if "model_type" in data:
        config, dtype = hf_format.read_config(directory)
        return config, dtype, "hf"
    raise ConfigError(f"{config_path} is neither a keras-hub nor a Hugging Face config "
                      "(no 'registered_name' or 'model_type').")


def load_backbone(preset, dtype: Optional[str] = None):
    """Resolves `preset`, builds a GemmaBackbone from its config and fills in its weights.

    dtype: "float32", "bfloat16" or "float16"; None keeps the checkpoint's dtype. Weights are
    cast one tensor at a time as they are read.
    """
    from gemma_keras.backbone import GemmaBackbone

    _check_dtype(dtype)
    directory = resolve_preset(preset)
    config, saved_dtype, fmt = read_preset_config(directory)
    if fmt == "keras_hub":
        reader = keras_hub_format.reader(directory, config)
    else:
        model_type = read_json(directory / "config.json")["model_type"]
        reader = hf_format.reader(directory, model_type)
    chosen = dtype or (saved_dtype if saved_dtype in DTYPES else "float32")
    backbone = GemmaBackbone(config, dtype=chosen, checkpoint=(reader, str(directory)))
    return backbone, directory
