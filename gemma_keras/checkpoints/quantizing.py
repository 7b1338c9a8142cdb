"""Weight quantization as gemma_keras exposes it: the arguments of `quantize()` and
`from_preset(quantize=...)` checked in one place, and quantizing while loading.

The storage is Keras' own quantized variables (and whatever layout our `Linear` gives them):
this module never builds the integers itself. Quantizing while loading calls each layer's own
`quantize()` the moment the layer has been built from its checkpoint tensor, so the result is
the same computation as `lm.quantize(...)` after a float load (bit for bit), while only one
float tensor exists at a time instead of the whole float model.
"""

from __future__ import annotations

import numbers
import re
from typing import Optional, Tuple

import keras
import numpy as np

from gemma_keras import keras_internals
from gemma_keras.errors import ArgumentTypeError, ConfigError
from gemma_keras.layers.linear import DropsVariablesQuietly, drop_variable, own_variables

MODES = ("int8", "int4")
DEFAULT_BLOCK_SIZE = 128
# A layer's quantization as written in a dtype policy ("int8", "int4/128", "int4/-1").
_POLICY_MODE = re.compile(r"^(int8|int4/(-1|[1-9][0-9]*))$")


def check_block_size(block_size) -> Optional[int]:
    """The int4 group size: a positive int, or None for per-output-channel scales (-1 too)."""
    if block_size is None or (not isinstance(block_size, bool) and block_size == -1):
        return None
    if (isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral)
            or block_size <= 0):
        raise ConfigError(
            f"block_size={block_size!r} is not a group size: pass a positive integer (32, 64, "
            "128, ...) to quantize int4 weights in groups of that many inputs, or None (or -1) "
            "for one scale per output channel.")
    return int(block_size)


def resolve(mode, block_size=DEFAULT_BLOCK_SIZE, config=None, argument="mode"):
    """(mode, Keras QuantizationConfig or None) for `quantize(mode, block_size, config)`.

    A `config` (Keras' own `keras.quantizers.*QuantizationConfig`) is passed through as Keras
    takes it. Otherwise `mode` must be "int8" (per output channel) or "int4" (in groups of
    `block_size` along the input axis; None / -1: per output channel)."""
    if config is not None:
        if isinstance(config, str):  # Keras' shortcut: quantize(config="int8")
            return resolve(config, block_size, None, argument)
        if not isinstance(config, keras.quantizers.QuantizationConfig):
            raise ConfigError(f"config={config!r} is not a keras.quantizers."
                              "QuantizationConfig; pass one, or a mode ('int8', 'int4').")
        if mode is not None and mode != config.mode:
            raise ConfigError(f"{argument}={mode!r} contradicts config (a "
                              f"{type(config).__name__} for mode {config.mode!r}).")
        return config.mode, config
    if mode not in MODES:
        raise ConfigError(f"{argument}={mode!r} is not a quantization mode gemma_keras "
                          f"supports; choose one of {MODES} (int8: per output channel; int4: "
                          f"in groups of block_size inputs, default {DEFAULT_BLOCK_SIZE}).")
    # Checked for int8 too (where it does not apply): a bad value is a mistake either way.
    block_size = check_block_size(block_size)
    if mode == "int8":
        return mode, None
    return mode, keras.quantizers.Int4QuantizationConfig(block_size=block_size)


def check_filters(filters, kwargs=None):
    """`quantize(filters=...)` as Keras takes it (a regex, a list of regexes, a callable or
    None) and no other keyword than Keras' `type_check`."""
    unknown = sorted(set(kwargs or {}) - {"type_check"})
    if unknown:
        raise ArgumentTypeError(f"quantize() got an unknown keyword argument {unknown[0]!r}; "
                                "it takes mode, config, filters and block_size.")
    if filters is None or callable(filters) or isinstance(filters, str):
        return
    if isinstance(filters, (list, tuple)) and all(isinstance(f, str) for f in filters):
        return
    raise ArgumentTypeError(f"filters={filters!r:.60} must be a regex matched against layer "
                            "names, a list of them, a function layer -> bool, or None.")


def has_quantize(layer) -> bool:
    """Whether `layer`'s class implements `quantize()`. Keras' `Model.quantize` asks every
    leaf layer and warns for each that has none (Gemma's norms, dropout): asked of only
    the layers that have one, it quantizes the same layers without the warnings."""
    return type(layer).quantize is not keras.layers.Layer.quantize


def policy_mode(mode, config) -> str:
    """What a layer's dtype policy name says before "_from_": "int8", "int4/128", "int4/-1"."""
    if mode == "int4":
        block = getattr(config, "block_size", DEFAULT_BLOCK_SIZE)
        return f"int4/{-1 if block is None else block}"
    return mode


def config_for(policy: str):
    """(mode, Keras config) that `quantize()` uses for a policy mode ("int8", "int4/128").
    A layer built from a quantized policy must get the same config: without one, Keras gives
    an int4 embedding an int8 quantizer for the head's inputs, which `quantize()` does not."""
    if policy == "int8":
        return "int8", keras.quantizers.Int8QuantizationConfig()
    block = int(policy.split("/", 1)[1])
    return "int4", keras.quantizers.Int4QuantizationConfig(block_size=None if block == -1
                                                           else block)


def layer_policy_mode(layer) -> Optional[str]:
    """`policy_mode` of a built layer: None when it is not quantized."""
    if getattr(layer, "quantization_mode", None) is None:
        return None
    return layer.dtype_policy.name.split("_from_")[0]


def check_policy_mode(value, source) -> str:
    """A policy mode read from a checkpoint ("int8", "int4/128"): validated, never evaluated."""
    if not isinstance(value, str) or not _POLICY_MODE.match(value):
        raise ConfigError(
            f"{source}: quantization {value!r} is not one gemma_keras loads (int8, or int4 "
            "with a block size). Load a float preset and pass quantize='int8' or 'int4'.")
    return value


QUANTIZABLE = ("kernel", "embeddings")  # the variable attributes whose layers quantize


def quantizer(mode, config):
    """The `after_build` action that quantizes a layer as `Model.quantize` would."""
    def quantize(layer):
        layer.quantize(mode, config=config)
    return quantize


# Elements of the embedding table quantized at a time while loading (64 MiB in float32).
TABLE_CHUNK_ELEMENTS = 1 << 24


class _Chunk(DropsVariablesQuietly, keras.layers.ReversibleEmbedding):
    """Keras' ReversibleEmbedding, but its quantize() drops the float chunk without a
    gc.collect() (one per chunk: ~30 for a 256k-row table, ~0.5-1 s each)."""


def quantize_table(table, float_policy, mode, config, expected):
    """The variables Keras' `quantize(mode, config)` gives a tied ReversibleEmbedding whose
    table is `table` (NumPy [vocab, hidden]), as the "0", "1", ... of `save_own_variables`,
    computed on chunks of rows.

    Why: Keras quantizes the whole table at once with several float32 temporaries of its
    size; for Gemma's 256k-row table that was 6.7 GB at the peak of a 2B load (measured), far
    more than the model. Each row is quantized on its own (per-row scales, or groups along
    the hidden axis), so running Keras' own code (a temporary layer per chunk, in the same
    dtype policy) on row chunks gives the same integers and scales, bit for bit."""
    rows, hidden = table.shape
    step = max(1, TABLE_CHUNK_ELEMENTS // max(1, hidden))
    pieces = {}
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        chunk = _Chunk(stop - start, hidden, tie_weights=True, dtype=float_policy)
        chunk.build()
        chunk.embeddings.assign(table[start:stop])
        chunk.quantize(mode, config=config, type_check=False)  # Keras' own, unchanged
        store = {}
        chunk.save_own_variables(store)
        for key, value in store.items():
            pieces.setdefault(key, []).append(np.asarray(keras.ops.convert_to_numpy(value)))
        del chunk, store
    out = {}
    for key, parts in pieces.items():
        rows_axis = len(expected[key].shape) >= 1 and expected[key].shape[0] == rows
        if rows_axis and all(p.shape[0] == n for p, n in zip(
                parts, [min(step, rows - s) for s in range(0, rows, step)])):
            out[key] = np.concatenate(parts, axis=0)
        else:  # the same for every chunk (g_idx: the group of each hidden unit)
            out[key] = parts[0]
    return out


def quantize_built_table(layer, mode, config) -> None:
    """`layer.quantize(mode, config=config)` for a built, float, tied ReversibleEmbedding,
    with the values from `quantize_table` (row chunks) instead of Keras' one-shot quantize.

    Why: `lm.quantize()` on a loaded model otherwise runs Keras' quantizer on the whole table,
    several float32 copies of it at once (see `quantize_table`): one float copy of the
    table and one chunk's temporaries instead. The steps are Keras' own
    (`ReversibleEmbedding.quantize`: check, drop the float variable, `quantized_build`, the
    policy "<mode>_from_<float policy>"), with the same integers and scales, bit for bit."""
    keras_internals.check_quantize_args(layer, mode)  # Keras' own errors, first
    float_policy = layer.dtype_policy
    # [vocab, hidden]
    table = np.asarray(keras.ops.convert_to_numpy(keras_internals.embedding_table(layer)))
    layer.quantization_config = config
    with keras_internals.variables_unlocked(layer):  # as Keras' quantize wrapper
        drop_variable(layer, keras_internals.EMBEDDINGS_ATTR)
        layer.quantized_build((layer.input_dim, layer.output_dim), mode, config)
    layer.dtype_policy = keras.dtype_policies.get(
        f"{policy_mode(mode, config)}_from_{float_policy.name}")
    # (The policy first: it decides which variables the layer saves and loads.)
    values = quantize_table(table, float_policy, mode, config, own_variables(layer))
    del table
    layer.load_own_variables(values)
    keras_internals.retrack_variables(layer)


def requested(quantize, block_size) -> Optional[Tuple[str, object]]:
    """`from_preset(quantize=, block_size=)` -> (mode, config) or None."""
    if quantize is None:
        return None
    return resolve(quantize, block_size, argument="quantize")
