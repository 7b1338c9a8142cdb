"""Every use gemma_keras makes of Keras' private names and undocumented behaviour, in one
place, each where Keras offers no public way to do the same.

Keras is pinned to the minor versions the suite has run on (`TESTED_KERAS`, pyproject's
`keras` requirement); tests/test_keras_internals.py probes each name and behaviour here
against the installed Keras and fails naming the one that changed, so a new Keras release
is caught by the suite before a user meets it.

Besides the functions below, `layers.linear.Linear` subclasses `keras.layers.EinsumDense`
and overrides or reads its private members (`OVERRIDDEN_EINSUM_DENSE`): our int4 layout
lives in Keras' own quantized variables, which is what keeps `save_own_variables`,
`load_own_variables` and LoRA working on it.
"""

from __future__ import annotations

import contextlib

import keras
# Keras' rule for `quantize(filters=...)` (regex, list or callable); not exported publicly.
from keras.src.quantizers.quantization_config import get_block_size_for_layer
from keras.src.quantizers.utils import should_quantize_layer

# The Keras minor versions the whole suite has passed on; pyproject pins `keras` to them.
TESTED_KERAS = ("3.15",)

# EinsumDense members `Linear` overrides or reads, and why (see layers/linear.py).
OVERRIDDEN_EINSUM_DENSE = {
    "_int4_build": "builds int4 variables in gemma_keras's [out, in/2] grouped layout",
    "_get_kernel_with_merged_lora": "what save_own_variables writes for that layout",
    "_set_quantization_info": "called by our _int4_build as Keras' own does",
    "quantized_build": "re-building a layer quantized (Keras' quantize does the same)",
    "_kernel": "the kernel variable behind the `kernel` property",
}


def quantize_filter(layer, filters) -> bool:
    """Whether Keras' `quantize(filters=...)` selects `layer`."""
    return should_quantize_layer(layer, filters)


def int4_block_size(layer, config):
    """The int4 group size Keras would use for `layer` under `config` (None: per channel)."""
    return get_block_size_for_layer(layer, config)


def check_quantize_args(layer, mode) -> None:
    """Keras' own errors for quantizing `layer` to `mode` (raised before anything changes)."""
    layer._check_quantize_args(mode, layer.compute_dtype)


def after_quantize(model, mode) -> None:
    """What Keras' `Model.quantize` does after its loop changed a layer: drop the compiled
    fit/predict functions and retrack torch's parameter lists."""
    model._post_quantize(mode)


@contextlib.contextmanager
def variables_unlocked(layer):
    """Lets a built layer's variables be replaced, as Keras' quantize wrapper does."""
    layer._tracker.unlock()
    try:
        yield
    finally:
        layer._tracker.lock()


# The attribute holding a ReversibleEmbedding's float table (`embeddings` is a property).
EMBEDDINGS_ATTR = "_embeddings"


def embedding_table(layer):
    """A (Reversible)Embedding's table variable: the float table, or the integer one of a
    quantized layer (whose public `embeddings` property would dequantize it)."""
    return getattr(layer, EMBEDDINGS_ATTR)


def untrack_variable(layer, variable) -> None:
    """Removes `variable` from `layer`'s tracked variables (Keras' `__delattr__` does this,
    then a full gc.collect(): see layers/linear.drop_variable)."""
    layer._untrack_variable(variable)


def retrack_variables(layer) -> None:
    """Keras' torch layers keep a ParameterDict of their variables, made when built: after a
    variable was replaced it must be made again (Keras' Model.quantize does the same), or
    the dropped one stays referenced. Nothing to do on the other backends."""
    track = getattr(layer, "_track_variables", None)
    if track is not None:
        track()


def stored_value(variable):
    """The tensor a Keras variable stores, even inside a StatelessScope (where `.value`
    gives the scope's stand-in)."""
    return variable._value


def sublayers(model, recursive=True):
    """Every layer inside `model` (not itself), depth first; only direct children without
    `recursive`. (`Model.layers` lists direct children only.)"""
    return model._flatten_layers(include_self=False, recursive=recursive)


def keep_input_dtypes(layer) -> None:
    """Keras casts every float argument of `call` to the compute dtype (the float32 RoPE
    tables included) and walks nested structures (the cache) on every call; this layer's
    inputs arrive in the right dtypes."""
    layer._convert_input_args = False


def after_build(layer, action) -> None:
    """Runs `action(layer)` once, right after `layer` is built (before its parents finish
    building). Keras wraps each layer's `build` in an instance attribute when the layer is
    made; this wraps that wrapper and puts it back after the first call."""
    original = layer.build

    def build(*args, **kwargs):
        original(*args, **kwargs)
        layer.build = original
        action(layer)
        retrack_variables(layer)

    build.gemma_keras_original = original
    layer.build = build


def undo_after_build(layer) -> None:
    """Removes a hook `after_build` left (when the layer was never built)."""
    original = getattr(layer.build, "gemma_keras_original", None)
    if original is not None:
        layer.build = original


def check_quantize_arguments_first(model, check) -> None:
    """Keras wraps `quantize` on each model instance when it is made, and that wrapper
    resolves `config` from `mode` before the method runs (so "int4" would be block 128
    whatever block_size said, and a bad mode a bare ValueError). This puts `check` in front
    of Keras' wrapper: check(mode, config, filters, block_size, kwargs) -> (mode, config),
    then Keras' wrapper runs with the resolved config. The method's docstring is kept."""
    keras_quantize = model.quantize

    def quantize(mode=None, config=None, filters=None, block_size=128, **kwargs):
        mode, config = check(mode, config, filters, block_size, kwargs)
        return keras_quantize(mode, config=config, filters=filters, **kwargs)

    quantize.__doc__ = type(model).quantize.__doc__
    model.quantize = quantize


def keras_version_tested() -> bool:
    """Whether the installed Keras is a minor version the suite has run on."""
    return ".".join(keras.__version__.split(".")[:2]) in TESTED_KERAS
