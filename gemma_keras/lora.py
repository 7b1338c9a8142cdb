"""LoRA on a built Gemma: enable adapters on chosen projections, save / load them alone, fold
them into the base weights. Built on Keras' own `EinsumDense.enable_lora`; see
`layers/linear.py` for how an adapter is applied."""

from __future__ import annotations

import json
import math
import numbers
import os
import pathlib

import keras

from gemma_keras import keras_internals
from gemma_keras.checkpoints.atomic import atomic_file
from gemma_keras.errors import (ArgumentTypeError, CheckpointError, ConfigError,
                                InvalidArgumentError, WeightShapeError)

# keras-hub's layer names, so `target_names` reads the same as there.
ATTENTION_TARGETS = ("query", "key", "value", "attention_output")
FFW_TARGETS = ("ffw_gating", "ffw_gating_2", "ffw_linear")
ALL_TARGETS = ATTENTION_TARGETS + FFW_TARGETS
DEFAULT_TARGETS = ("query", "value")
FORMAT = "gemma_keras.lora/1"


def projections(backbone):
    """{"decoder_block_0/attention/query": layer, ...} for every projection, in model order."""
    found = {}
    for block in backbone.transformer_layers:
        for owner in (block.attention, block.ffw):
            for layer in keras_internals.sublayers(owner, recursive=False):
                if layer.name in ALL_TARGETS:
                    found[f"{block.name}/{owner.name}/{layer.name}"] = layer
    return found


def _check_targets(target_names):
    if isinstance(target_names, str):
        target_names = (target_names,)
    if not isinstance(target_names, (list, tuple, set, frozenset)):
        raise ArgumentTypeError(f"target_names must be a list of projection names (from "
                                f"{list(ALL_TARGETS)}), got {type(target_names).__name__}.")
    target_names = tuple(target_names)
    unknown = [name for name in target_names if name not in ALL_TARGETS]
    if unknown or not target_names:
        raise ConfigError(f"target_names {list(target_names)}: each must be one of "
                          f"{list(ALL_TARGETS)}.")
    return target_names


def lora_parameter_count(config, rank, target_names=DEFAULT_TARGETS):
    """Trainable parameters LoRA adds: rank * (in + out) per targeted projection."""
    d, n, k, h, f = (config.hidden_dim, config.num_query_heads, config.num_key_value_heads,
                     config.head_dim, config.ffn_branch_dim)
    sizes = {"query": (d, n * h), "key": (d, k * h), "value": (d, k * h),
             "attention_output": (n * h, d), "ffw_gating": (d, f), "ffw_gating_2": (d, f),
             "ffw_linear": (f, d)}
    per_layer = sum(rank * sum(sizes[name]) for name in _check_targets(target_names))
    return per_layer * config.num_layers


def enable_lora(backbone, rank, alpha=None, target_names=DEFAULT_TARGETS):
    """Freezes every weight of `backbone` and adds rank-`rank` adapters (scaled by
    alpha / rank; alpha defaults to rank) to the projections named in `target_names`."""
    target_names = _check_targets(target_names)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ConfigError(f"rank={rank!r}: LoRA rank must be a positive integer.")
    rank = int(rank)
    if alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
            raise ArgumentTypeError(f"alpha={alpha!r}: the LoRA scale numerator must be a "
                                    "number (the adapters are scaled by alpha / rank; None: "
                                    "alpha = rank).")
        if not math.isfinite(alpha) or alpha <= 0:
            raise InvalidArgumentError(f"alpha={alpha!r}: the LoRA scale numerator must be a "
                                       "positive number (None: alpha = rank).")
    state = lora_state(backbone)
    if state is not None:
        raise ConfigError(
            f"LoRA is already enabled (rank {state['rank']}, targets {state['target_names']}). "
            "To start a new adapter, first fold this one in with lm.merge_lora() or drop it "
            "with lm.disable_lora().")
    for layer in keras_internals.sublayers(backbone):
        layer.trainable = False
    for layer in projections(backbone).values():
        if layer.name in target_names:
            layer.trainable = True
            layer.enable_lora(rank, lora_alpha=rank if alpha is None else alpha)


def lora_state(backbone):
    """{"rank", "alpha", "target_names"} of the enabled adapters, or None."""
    layers = [layer for layer in projections(backbone).values() if layer.lora_enabled]
    if not layers:
        return None
    return {"rank": layers[0].lora_rank, "alpha": float(layers[0].lora_alpha),
            "target_names": sorted({layer.name for layer in layers},
                                   key=ALL_TARGETS.index)}


def merge_lora(backbone):
    """Folds every adapter into its kernel (same logits, fewer weights) and unfreezes the
    model. Quantized kernels are re-quantized with the adapter folded in. With no adapters
    enabled it raises: merging nothing silently would hide a forgotten enable_lora or
    load_lora_weights."""
    if lora_state(backbone) is None:
        raise ConfigError("merge_lora(): this model has no LoRA adapters to merge; call "
                          "enable_lora(rank) and train, or load_lora_weights(path), first.")
    for layer in projections(backbone).values():
        layer.merge_lora()
    _unfreeze(backbone)


def disable_lora(backbone):
    """Drops every adapter unmerged and unfreezes the model."""
    for layer in projections(backbone).values():
        layer.disable_lora()
    _unfreeze(backbone)


def _unfreeze(backbone):
    for layer in keras_internals.sublayers(backbone):
        layer.trainable = True


def save_lora_weights(backbone, path, overwrite=False):
    """Writes only the adapters (and the config and rank they belong to) to an .h5 file,
    through a temporary name, so a crash never leaves half a file at `path`. An existing
    file is refused unless `overwrite`."""
    import h5py

    path = _path("path", path)
    _flag("overwrite", overwrite)
    if not path.name.endswith(".h5"):
        raise ConfigError(f"path must end in .h5: LoRA weights go to an .h5 file (e.g. "
                          f"'adapter.lora.h5'), got {path}.")
    state = lora_state(backbone)
    if state is None:
        raise ConfigError("No LoRA adapters to save: call backbone.enable_lora(rank) first.")
    with atomic_file(path, overwrite) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["state"] = json.dumps(state)
        f.attrs["config"] = json.dumps(backbone.config.to_dict(), sort_keys=True)
        for name, layer in projections(backbone).items():
            if layer.lora_enabled:
                for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
                    f[f"{name}/{variable.name}"] = keras.ops.convert_to_numpy(variable)


def load_lora_weights(backbone, path):
    """Loads adapters written by `save_lora_weights`. Enables LoRA with the file's rank and
    targets when the model has none; refuses a file made for another config, rank, alpha or
    set of targets."""
    import h5py

    path = _path("path", path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.h5"))
        hint = (f" It holds {', '.join(found[:3])}{', ...' if len(found) > 3 else ''}: pass "
                f"one of those, e.g. {path / found[0]}." if found else
                " Pass the .h5 file that save_lora_weights wrote (e.g. 'adapter.lora.h5').")
        raise CheckpointError(f"path {path} is a directory; load_lora_weights reads one "
                              f"LoRA weights file.{hint}")
    if not path.is_file():
        raise CheckpointError(f"path: the LoRA weights file {path} does not exist; pass the "
                              ".h5 file save_lora_weights wrote.")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CheckpointError(f"{path} is not a readable HDF5 file ({e}): it is truncated or "
                              "corrupt, or not a LoRA weights file.") from e
    with f:
        if f.attrs.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a gemma_keras LoRA weights file (no "
                                  f"'{FORMAT}' format mark).")
        state = json.loads(f.attrs["state"])
        _check_same_config(json.loads(f.attrs["config"]), backbone.config.to_dict(), path)
        current = lora_state(backbone)
        if current is None:
            enable_lora(backbone, state["rank"], state["alpha"], state["target_names"])
        elif current != state:
            raise ConfigError(
                f"{path} holds adapters with rank {state['rank']}, alpha {state['alpha']} on "
                f"{state['target_names']}, but the model's are rank {current['rank']}, alpha "
                f"{current['alpha']} on {current['target_names']}. Load it into a model "
                "without LoRA (it is enabled to match) or enable the same settings.")
        values = {}
        for name, layer in projections(backbone).items():
            if not layer.lora_enabled:
                continue
            for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
                key = f"{name}/{variable.name}"
                if key not in f:
                    raise CheckpointError(f"{path} has no '{key}': the file is incomplete.")
                value = f[key][()]
                if tuple(value.shape) != tuple(variable.shape):
                    raise WeightShapeError(f"{path}: '{key}' has shape {value.shape}, the "
                                           f"model expects {tuple(variable.shape)}.")
                values[key] = (variable, value)
    for variable, value in values.values():  # all checked before any is assigned
        variable.assign(value)


def _check_same_config(saved, current, path):
    # Dropout does not change a weight; everything else in the config does.
    different = sorted(key for key in set(saved) | set(current)
                       if key != "dropout" and saved.get(key) != current.get(key))
    if different:
        details = ", ".join(f"{key}: file {saved.get(key)!r} vs model {current.get(key)!r}"
                            for key in different)
        raise ConfigError(f"{path} was saved from a model with another config ({details}); "
                          "adapters only load into the architecture they were trained on.")


def _path(name, value):
    if not isinstance(value, (str, os.PathLike)):
        raise ArgumentTypeError(f"{name} must be a file path (str or pathlib.Path), got "
                                f"{type(value).__name__}, e.g. 'adapter.lora.h5'.")
    return pathlib.Path(value).expanduser()


def _flag(name, value):
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, got {value!r}.")
