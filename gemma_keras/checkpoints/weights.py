"""The one table of a backbone's weights, and how a checkpoint fills them.

Every checkpoint format is a mapping from these canonical names (keras-hub's layer names) to
`Entry` objects that know their shape in keras layout and read themselves, cast to a target
dtype in bounded chunks. Loading sets each layer's initializer to read its entry, so every
variable is *created* from the checkpoint: no zero-filled copy of the model exists first, and
at any moment at most one tensor is in transit.
"""

from __future__ import annotations

from typing import Dict, Iterator, Protocol, Tuple

import keras
import ml_dtypes
import numpy as np

from gemma_keras import backends, keras_internals
from gemma_keras.backbone import GemmaBackbone
from gemma_keras.checkpoints import progress, quantizing
from gemma_keras.errors import CheckpointError, ConfigError, WeightShapeError
from gemma_keras.layers.linear import own_variables

# Sub-weights of a decoder block: canonical suffix -> attribute path from the block; the last
# attribute is the variable, the ones before it lead to the layer that owns it.
BLOCK_WEIGHTS = {
    "pre_attention_norm": ("pre_attention_norm", "scale"),
    "post_attention_norm": ("post_attention_norm", "scale"),
    "query": ("attention", "query", "kernel"),
    "key": ("attention", "key", "kernel"),
    "value": ("attention", "value", "kernel"),
    "attention_output": ("attention", "attention_output", "kernel"),
    "query_norm": ("attention", "query_norm", "scale"),
    "key_norm": ("attention", "key_norm", "scale"),
    "pre_ffw_norm": ("pre_ffw_norm", "scale"),
    "post_ffw_norm": ("post_ffw_norm", "scale"),
    "ffw_gating": ("ffw", "gating", "kernel"),
    "ffw_gating_2": ("ffw", "gating_2", "kernel"),
    "ffw_linear": ("ffw", "linear", "kernel"),
}
# Variable attribute -> the layer attribute holding its initializer (keras' own names).
_INITIALIZER_ATTR = {"kernel": "kernel_initializer", "scale": "scale_initializer",
                     "embeddings": "embeddings_initializer"}
# Elements read per chunk when casting: bounds the transient memory of a dtype conversion.
CHUNK_ELEMENTS = 1 << 24


class Entry(Protocol):
    shape: Tuple[int, ...]  # in keras layout

    def read(self, dtype: np.dtype) -> np.ndarray:
        """The array in keras layout and `dtype`."""


Reader = Dict[str, Entry]


def layer_table(backbone) -> Iterator[Tuple[str, object, str]]:
    """(canonical name, owning layer, variable attribute) for every weight, in a fixed order.
    Usable before the layers are built."""
    yield "token_embedding", backbone.token_embedding, "embeddings"
    for i, block in enumerate(backbone.transformer_layers):
        for suffix, attrs in BLOCK_WEIGHTS.items():
            layer = block
            for attr in attrs[:-1]:
                layer = getattr(layer, attr)
                if layer is None:  # a post-norm this config does not have
                    break
            if layer is not None:
                yield f"decoder_block_{i}/{suffix}", layer, attrs[-1]
    yield "final_normalization", backbone.final_normalization, "scale"


def weight_table(backbone) -> Iterator[Tuple[str, object]]:
    """(canonical name, float value) for every weight of a built backbone, as a float
    checkpoint holds it: LoRA adapters merged into their kernels. Quantized weights are
    refused (dequantizing would save the rounding as the model); the keras-hub writer saves
    them as they are instead (`quantized_layers`)."""
    for name, layer, attr in layer_table(backbone):
        if getattr(layer, "quantization_mode", None) is not None:
            raise ConfigError(
                f"Cannot write '{name}' as a float weight: the model is "
                f"{layer.quantization_mode}-quantized. Save it with format='keras_hub' (which "
                "keeps the quantized weights), or write the float model before quantize() "
                "(from_preset(..., quantize=...) quantizes again while loading).")
        if attr == "kernel" and getattr(layer, "lora_enabled", False):
            yield name, layer.merged_kernel()
        else:
            yield name, getattr(layer, attr).value


def quantized_layers(backbone) -> Dict[str, str]:
    """canonical name -> quantization ("int8", "int4/128", ...) of each quantized layer."""

    found = {}
    for name, layer, _ in layer_table(backbone):
        mode = quantizing.layer_policy_mode(layer)
        if mode is not None:
            found[name] = mode
    return found


def refuse_quantized(backbone, what: str) -> None:
    """ConfigError naming `what` (a format, an export) when any layer is quantized."""
    modes = sorted(set(quantized_layers(backbone).values()))
    if modes:
        raise ConfigError(
            f"{what} holds float weights only and this model is {'/'.join(modes)}-quantized. "
            "Save it with format='keras_hub' (keeps the quantized weights; "
            "GemmaCausalLM.from_preset loads them back), or save the float model before "
            "quantize() and pass from_preset(..., quantize=...) to quantize while loading.")


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype for a keras dtype name; numpy itself has no bfloat16."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


class _FromCheckpoint(keras.initializers.Initializer):
    """Initializer that reads one checkpoint entry, after checking its shape."""

    def __init__(self, name, entry, source):
        self.name, self.entry, self.source = name, entry, source

    # `layout`: Keras passes the variable's sharding under a JAX distribution to
    # initializers that take one (and only then). Without the argument Keras would run a
    # large weight's initializer under jax.jit to shard it, embedding the tensor read from
    # the file in the compiled program as a constant.
    def __call__(self, shape, dtype=None, layout=None):
        # Shapes are reported in the file's own layout, which is what its owner knows.
        found = tuple(getattr(self.entry, "file_shape", self.entry.shape))
        wanted = tuple(getattr(self.entry, "expected_file_shape", shape))
        if tuple(self.entry.shape) != tuple(shape) or found != wanted:
            raise WeightShapeError(
                f"{self.source}: weight '{self.name}' has shape {found} in the checkpoint but "
                f"the config calls for {wanted}. The config and the weights do not match.")
        array = self.entry.read(numpy_dtype(keras.backend.standardize_dtype(dtype)))
        progress.step()
        return backends.get().host_array_to_tensor(array, layout)


class QuantizedEntry:
    """A quantized layer in a checkpoint: its quantization ("int8", "int4/128") and its
    variables in the order Keras' `save_own_variables` writes them ("0", "1", ...), each an
    Entry already in our layout. An entry whose `reshape_to_variable` is true (a scale kept
    with other unit axes) is reshaped to the variable's shape when the sizes agree."""

    def __init__(self, mode, variables):
        self.mode, self.variables = mode, variables


class _Store:
    """The mapping Keras' `load_own_variables` reads, filled one tensor at a time."""

    def __init__(self, name, entry, expected, source):
        self.name, self.entry, self.expected, self.source = name, entry, expected, source

    def keys(self):
        return self.entry.variables.keys()

    def __len__(self):
        return len(self.entry.variables)

    def __getitem__(self, key):
        item, want = self.entry.variables[key], self.expected[key]
        shape, dtype = tuple(want.shape), keras.backend.standardize_dtype(want.dtype)
        found = tuple(getattr(item, "file_shape", item.shape))
        ok = tuple(item.shape) == shape or (
            getattr(item, "reshape_to_variable", False)
            and int(np.prod(item.shape)) == int(np.prod(shape)))
        if not ok:
            raise WeightShapeError(
                f"{self.source}: variable {key} of quantized weight '{self.name}' has shape "
                f"{found} in the checkpoint but the config and its quantization "
                f"({self.entry.mode}) call for {shape}. The config and the weights do not "
                "match.")
        return np.reshape(item.read(numpy_dtype(dtype)), shape)


def _load_quantized(name, entry, source):
    def load(layer):
        expected = own_variables(layer)  # the freshly built variables, Keras' order
        if set(expected) != set(entry.variables):
            raise CheckpointError(
                f"{source}: quantized weight '{name}' ({entry.mode}) has "
                f"{len(entry.variables)} variable(s) in the checkpoint, the layer "
                f"{len(expected)}. The file was written in another layout or is damaged.")
        layer.load_own_variables(_Store(name, entry, expected, source))
        progress.step()
    return load


def _quantize_table(name, entry, source, float_policy, quantize):
    def load(layer):
        shape = (layer.input_dim, layer.output_dim)
        if tuple(entry.shape) != shape:
            raise WeightShapeError(
                f"{source}: weight '{name}' has shape {tuple(entry.shape)} in the checkpoint "
                f"but the config calls for {shape}. The config and the weights do not match.")
        table = entry.read(numpy_dtype(float_policy.variable_dtype))
        expected = own_variables(layer)
        values = quantizing.quantize_table(table, float_policy, *quantize, expected)
        del table
        layer.load_own_variables(values)
        progress.step()
    return load


def backbone_from_checkpoint(config, dtype, reader: Reader, source: str, quantize=None):
    """A GemmaBackbone for `config` whose variables are created directly from `reader`'s
    tensors (never random, never a zero copy overwritten later), which keeps a load's peak
    memory near one model: the layers are made, their initializers pointed at the
    checkpoint, then built. quantize: as `install_checkpoint`."""
    backbone = GemmaBackbone(config, dtype=dtype, build_now=False)
    install_checkpoint(backbone, reader, source, quantize)
    backbone.build_weights()
    release_checkpoint(backbone)
    return backbone


def copied_backbone(backbone, dtype=None, source="the model", quantize=None):
    """A new GemmaBackbone with `backbone`'s weights (LoRA adapters merged, as
    `weight_table` gives them) in `dtype` (default: its own), built one tensor at a time;
    quantize: as `install_checkpoint`'s (a quantized self-draft)."""
    reader = {name: _LoadedTensor(value) for name, value in weight_table(backbone)}
    return backbone_from_checkpoint(backbone.config, dtype or backbone.dtype_policy.name,
                                    reader, source, quantize)


class _LoadedTensor:
    """A weight of a loaded model as a checkpoint entry, converted when it is read."""

    def __init__(self, value):
        self.value, self.shape = value, tuple(value.shape)

    def read(self, dtype):
        return np.asarray(keras.ops.convert_to_numpy(self.value)).astype(dtype, copy=False)


def install_checkpoint(backbone, reader: Reader, source: str, quantize=None) -> None:
    """Points every layer's initializer at its checkpoint entry; call before building.

    Quantized entries (`QuantizedEntry`) set their layer's dtype policy so that it builds its
    quantized variables, which are then loaded right after the layer is built. `quantize`
    ((mode, Keras config) from `quantizing.resolve`) quantizes each float projection and the
    embedding right after it is built from its float tensor, as `Model.quantize` would."""
    table = list(layer_table(backbone))
    expected = {name for name, _, _ in table}
    missing = sorted(expected - set(reader))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(
            f"{source} lacks {len(missing)} weight(s) the config calls for: {shown}. "
            "The weights do not belong to this config, or the file is incomplete.")
    extra = sorted(set(reader) - expected)
    if extra:
        raise CheckpointError(
            f"{source} has weights the config does not call for: {', '.join(extra[:5])}. "
            "Check num_layers and the post-norm flags in config.json.")
    for name, layer, attr in table:
        entry = reader[name]
        if isinstance(entry, QuantizedEntry):
            if attr not in quantizing.QUANTIZABLE:
                raise CheckpointError(f"{source}: '{name}' is stored quantized; only "
                                      "projections and the embedding can be.")
            layer.dtype_policy = keras.dtype_policies.get(
                f"{entry.mode}_from_{layer.dtype_policy.name}")
            layer.quantization_config = quantizing.config_for(entry.mode)[1]
            keras_internals.after_build(layer, _load_quantized(name, entry, source))
            continue
        if quantize is not None and attr == "embeddings":
            # Built quantized, its values quantized from the float table in row chunks
            # (`quantizing.quantize_table`: Keras' one-shot quantize of a 256k-row table
            # costs several float32 copies of it).
            float_policy = layer.dtype_policy
            layer.dtype_policy = keras.dtype_policies.get(
                f"{quantizing.policy_mode(*quantize)}_from_{float_policy.name}")
            layer.quantization_config = quantize[1] or quantizing.config_for("int8")[1]
            keras_internals.after_build(layer, _quantize_table(name, entry, source, float_policy,
                                                          quantize))
            continue
        setattr(layer, _INITIALIZER_ATTR[attr], _FromCheckpoint(name, entry, source))
        if quantize is not None and attr in quantizing.QUANTIZABLE:
            keras_internals.after_build(layer, quantizing.quantizer(*quantize))
    progress.start(f"reading {source}", len(table))


def release_checkpoint(backbone) -> None:
    """Drops the checkpoint initializers (and the readers they hold) after building.

    No gc.collect() here: the readers hold no reference cycles (each read opens and closes
    its file), so dropping them frees them, while a full collection cost ~1 s per load in a
    process with the three backends imported (44% of the parity tests' time)."""
    for _, layer, attr in layer_table(backbone):
        setattr(layer, _INITIALIZER_ATTR[attr], keras.initializers.Zeros())
        keras_internals.undo_after_build(layer)


def read_chunked(out: np.ndarray, read_rows, rows: int) -> np.ndarray:
    """Fills `out` (first axis `rows` long) from `read_rows(start, stop)` chunk by chunk, so a
    dtype conversion never holds a second full-size copy."""
    per_row = max(1, int(np.prod(out.shape[1:])))
    step = max(1, CHUNK_ELEMENTS // per_row)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        out[start:stop] = read_rows(start, stop)
    return out


class Transformed:
    """An entry seen through a layout change (`to_ours`), for formats whose kernels are laid
    out differently. `shape` is ours; the file's actual and expected shapes are kept apart
    so that a mismatch is reported (in the file's layout) instead of scrambled by a reshape."""

    def __init__(self, entry, raw_shape, shape, to_ours):
        self.entry, self.to_ours, self.shape = entry, to_ours, tuple(shape)
        self.file_shape, self.expected_file_shape = tuple(entry.shape), tuple(raw_shape)

    def read(self, dtype):
        if self.file_shape != self.expected_file_shape:  # loading reports it before reading
            where = getattr(self.entry, "file", "the checkpoint")
            raise CheckpointError(f"{where}: a weight of shape {self.file_shape} where the "
                                  f"config makes it {self.expected_file_shape}.")
        return np.ascontiguousarray(self.to_ours(self.entry.read(dtype)))
