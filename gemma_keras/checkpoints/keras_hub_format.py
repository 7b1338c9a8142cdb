"""keras-hub / keras-nlp preset directories: read and write.

Layout: config.json (a serialised `keras_hub>GemmaBackbone`, or `keras_nlp>` in older uploads,
or `keras_hub>Gemma3Backbone`), model.weights.h5 or model.weights.json + model_NNNNN.weights.h5
shards, tokenizer.json, assets/tokenizer/vocabulary.spm, preprocessor.json, task.json,
metadata.json.

The h5 file is Keras 3's weights format: one group per layer, keyed by the attribute path
keras-hub's objects have, each holding `vars/0`. We read and write it with h5py through one
name table, so neither direction depends on our layers mirroring keras-hub's classes.

Gemma 3. keras-hub's Gemma3Backbone holds the same weights under the same names (its decoder
block groups are `gemma3_decoder_block_N`, by its class), plus the QK-norms. Its config differs:
`intermediate_dim` is one GeGLU branch (ours counts both); RoPE is fixed at 10,000 on local and
1,000,000 on global layers, and layer i is local when i % 6 < 5 (our sliding_window_pattern 6).
What it cannot say (another pattern or RoPE base, a query_pre_attn_scalar that is neither
head_dim nor hidden / heads, max_sequence_length) goes into metadata.json as for Gemma 1 and 2.
A multimodal preset's vision encoder is left unread, with one warning.

Quantized models. keras-hub records each quantized layer's policy in config.json (a Keras
`DTypePolicyMap` keyed by keras-hub's layer paths) and stores the layer's quantized variables
in `vars/0..` in the order of Keras' `save_own_variables`. int8 (per output channel) is the
same quantization in both libraries, so int8 presets are written in keras-hub's layout (the
kernel's axes rearranged as for float kernels, the scale reshaped) and load in keras-hub and
back here exactly; keras-hub's own int8 presets load here too. int4 cannot be written so:
Keras' int4 flattens keras-hub's query/key/value kernels [heads, hidden, head_dim] to
[hidden, heads * head_dim] by a reshape, so its groups and scales do not run along one output
channel's inputs, and no rearrangement of our int4 weights gives them. int4 (and mixed)
presets keep our layers' own variables, say so in metadata.json ("gemma_keras" ->
"quantization"), and keep a float policy in config.json, so that keras-hub refuses the file
(its float layers expect one variable each) instead of misreading it.
"""

from __future__ import annotations

import datetime
import json
import pathlib
from typing import Dict, Optional, Tuple

import h5py
import keras
import ml_dtypes
import numpy as np

from gemma_keras.checkpoints import progress
from gemma_keras.checkpoints.atomic import atomic_directory, check_target
from gemma_keras.checkpoints.quantizing import check_policy_mode, layer_policy_mode
from gemma_keras.checkpoints.reading import (listed_file, read_json, recorded_instruct,
                                             warn_image_tower_unread)
from gemma_keras.checkpoints.weights import (BLOCK_WEIGHTS, QuantizedEntry, Reader, Transformed,
                                             layer_table, quantized_layers, read_chunked)
from gemma_keras.config import GemmaConfig
from gemma_keras.errors import CheckpointError, ConfigError
from gemma_keras.layers.linear import own_variables

WEIGHTS_FILE = "model.weights.h5"
SHARDED_WEIGHTS_INDEX = "model.weights.json"
GEMMA3_BACKBONE = "keras_hub>Gemma3Backbone"
BACKBONE_NAMES = ("keras_hub>GemmaBackbone", "keras_nlp>GemmaBackbone", GEMMA3_BACKBONE)
# keras-hub's Gemma3Backbone arguments that are also GemmaConfig fields gemma_keras records in
# metadata.json for a GemmaBackbone (which cannot take them).
_GEMMA3_TAKES = ("use_query_key_norm", "local_rope_scaling_factor", "global_rope_scaling_factor")
# Its arguments for what gemma_keras does not model: the image side and embedding models.
_GEMMA3_NOT_OURS = ("image_size", "vision_encoder", "is_embedding_model",
                    "use_bidirectional_attention", "pooling_intermediate_dim", "embedding_dim")

# Canonical block-weight suffix -> group path inside keras-hub's decoder block.
_BLOCK_H5 = {
    "pre_attention_norm": "pre_attention_norm",
    "post_attention_norm": "post_attention_norm",
    "query": "attention/query_dense",
    "key": "attention/key_dense",
    "value": "attention/value_dense",
    "attention_output": "attention/output_dense",
    "query_norm": "attention/query_norm",  # Gemma 3 (keras-hub's Gemma3Backbone)
    "key_norm": "attention/key_norm",
    "pre_ffw_norm": "pre_ffw_norm",
    "post_ffw_norm": "post_ffw_norm",
    "ffw_gating": "gating_ffw",
    "ffw_gating_2": "gating_ffw_2",
    "ffw_linear": "ffw_linear",
}
assert set(_BLOCK_H5) == set(BLOCK_WEIGHTS)


def _kernel_layouts(config: GemmaConfig):
    """keras-hub's kernels are [in, out] with attention heads on their own axis, ours are
    [out, in] with heads flattened (see layers/linear.py): canonical suffix -> (keras-hub
    shape, our shape, to ours, to keras-hub)."""
    n, k, h, d, f = (config.num_query_heads, config.num_key_value_heads, config.head_dim,
                     config.hidden_dim, config.ffn_branch_dim)

    def projection_in(heads):  # [heads, hidden, head_dim] <-> [heads * head_dim, hidden]
        return ((heads, d, h), (heads * h, d),
                lambda a: a.transpose(0, 2, 1).reshape(heads * h, d),
                lambda a: a.reshape(heads, h, d).transpose(0, 2, 1))

    def dense(rows, cols):  # [in, out] <-> [out, in]
        return (rows, cols), (cols, rows), np.transpose, np.transpose
    return {"query": projection_in(n), "key": projection_in(k), "value": projection_in(k),
            # [heads, head_dim, hidden] <-> [hidden, heads * head_dim]
            "attention_output": ((n, h, d), (d, n * h), lambda a: a.reshape(n * h, d).T,
                                 lambda a: a.T.reshape(n, h, d)),
            "ffw_gating": dense(d, f), "ffw_gating_2": dense(d, f), "ffw_linear": dense(f, d)}


def read_config(directory: pathlib.Path) -> Tuple[GemmaConfig, Optional[str]]:
    """The backbone config and the dtype it was saved in (None when not recorded)."""
    path = directory / "config.json"
    data = read_json(path)
    name = data.get("registered_name")
    if name not in BACKBONE_NAMES:
        raise ConfigError(
            f"{path} describes '{name}', not a Gemma backbone ({' or '.join(BACKBONE_NAMES)}). "
            "gemma_keras loads Gemma 1, 1.1, CodeGemma, Gemma 2 and Gemma 3 presets only.")
    values = data.get("config", {})
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: 'config' should hold the backbone's arguments as a JSON "
                          f"object, found {type(values).__name__}.")
    values = dict(values)
    if name == GEMMA3_BACKBONE:
        values = _from_gemma3(values, path)
    dtype = _float_dtype_name(values.pop("dtype", None))
    ours = _read_metadata(directory).get("gemma_keras", {})
    extras = ours.get("config", {}) if isinstance(ours, dict) else None
    if not isinstance(extras, dict):
        raise ConfigError(f"{directory / 'metadata.json'}: 'gemma_keras' should hold a "
                          "'config' object.")
    return GemmaConfig.from_dict({**values, **extras}, source=str(path)), dtype


def _from_gemma3(values: dict, path) -> dict:
    """A Gemma3Backbone config as GemmaConfig arguments (metadata.json's may still override
    them: gemma_keras writes there what keras-hub cannot express)."""
    for key in ("is_embedding_model", "use_bidirectional_attention"):
        if values.get(key):
            raise ConfigError(
                f"{path} describes a Gemma 3 embedding model ({key} is true, as in "
                "EmbeddingGemma): gemma_keras loads causal language models only. Use "
                "keras-hub's Gemma3Backbone for embeddings.")
    values = {k: v for k, v in values.items() if k not in _GEMMA3_NOT_OURS}
    branch = values.get("intermediate_dim")
    if isinstance(branch, int) and not isinstance(branch, bool):
        values["intermediate_dim"] = 2 * branch  # keras-hub: one branch (gate_dim_reduction 1)
    scaling = values.get("global_rope_scaling_factor", 1.0)
    stretched = isinstance(scaling, (int, float)) and scaling > 1
    # What keras-hub fixes in its layers, or defaults to where ours differ; the context length
    # it does not record: 128k for the checkpoints whose global RoPE is stretched (4B+), 32k
    # for the others (270M, 1B).
    fixed = dict(sliding_window_pattern=6, local_rope_max_wavelength=10_000.0,
                 rope_max_wavelength=1_000_000.0, use_query_key_norm=True,
                 sliding_window_size=1024,
                 max_sequence_length=131_072 if stretched else 32_768)
    return {**fixed, **values}


def _float_dtype_name(dtype) -> Optional[str]:
    """The float dtype name in a serialised policy: "bfloat16", a DTypePolicy, or a
    DTypePolicyMap (quantized presets: its default policy, else its layers' source dtype)."""
    if isinstance(dtype, str) or dtype is None:
        return dtype
    if not isinstance(dtype, dict):
        return None
    config = dtype.get("config")
    if not isinstance(config, dict):
        return None
    if dtype.get("class_name") == "DTypePolicyMap":
        found = _float_dtype_name(config.get("default_policy"))
        policies = config.get("policy_map")
        for policy in (policies.values() if isinstance(policies, dict) else ()):
            if found is None and isinstance(policy, dict):
                source = (policy.get("config") or {}).get("source_name")
                found = source if isinstance(source, str) else None
        return found
    name = config.get("name")
    return name if isinstance(name, str) else None


def _read_metadata(directory):
    path = directory / "metadata.json"
    return read_json(path) if path.is_file() else {}


def read_instruct(directory: pathlib.Path) -> Optional[bool]:
    """Whether the preset says it is instruction-tuned: metadata.json's "gemma_keras" entry,
    which `write_preset` fills in (keras-hub writes metadata.json and never reads it back).
    None when it does not say, as in keras-hub's own presets."""
    return recorded_instruct(_read_metadata(directory), directory / "metadata.json")


# ---- weights: reading ---------------------------------------------------------------------
def _weight_files(directory: pathlib.Path):
    single = directory / WEIGHTS_FILE
    if single.is_file():
        return [single]
    index = directory / SHARDED_WEIGHTS_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map': it is not a Keras shard index.")
        names = []
        for files in weight_map.values():
            for file in ([files] if isinstance(files, str) or not isinstance(files, list)
                         else files):
                if file not in names:
                    names.append(file)
        shards = [listed_file(directory, n, index) for n in names]
        missing = [str(p) for p in shards if not p.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that are missing: {missing}. "
                                  "Download the preset again.")
        return shards
    raise CheckpointError(
        f"No weights in {directory}: expected {WEIGHTS_FILE} or {SHARDED_WEIGHTS_INDEX} "
        "with its shards.")


def _index_datasets(files) -> Dict[str, "_H5Entry"]:
    """'layers/.../vars/0' -> entry over all shards; '@<layer name>@<group>' -> group path."""
    found = {}
    for file in files:
        try:
            with h5py.File(file, "r") as h5:
                def visit(path, obj):
                    if not isinstance(path, str):  # a corrupt name table (found by fuzzing)
                        raise ValueError(f"an object name that is not text: {path!r}")
                    if isinstance(obj, h5py.Dataset):
                        found[path] = _H5Entry(file, path, obj.shape,
                                               obj.attrs.get("dtype") == "bfloat16")
                    elif path.endswith("/vars") and "name" in obj.attrs:
                        # Also index by keras layer name: robust to attribute-order changes.
                        found["@" + str(obj.attrs["name"]) + "@" + path] = path
                h5.visititems(visit)
        except (OSError, RuntimeError, KeyError, ValueError) as e:  # h5py's parse errors
            raise CheckpointError(f"{file} is not a readable HDF5 weights file ({e}). It is "
                                  "truncated or corrupt: download or save it again.") from e
    return found


def _block_group(gemma3: bool, i: int) -> str:
    """Keras names a layer's h5 group after its class, numbered from the second on."""
    return f"layers/{'gemma3' if gemma3 else 'gemma'}_decoder_block" + (f"_{i}" if i else "")


def _block_prefixes(index, num_layers, gemma3):
    """The h5 group of each decoder block: found by layer name, else by keras' class order."""
    by_name = {}
    for key in index:
        if key.startswith("@decoder_block_"):
            name, path = key[1:].split("@", 1)
            if path.count("/") == 2:  # layers/<group>/vars: a top-level layer
                by_name[name] = path[: -len("/vars")]
    return [by_name.get(f"decoder_block_{i}", _block_group(gemma3, i))
            for i in range(num_layers)]


class _H5Entry:
    def __init__(self, file, path, shape, is_bfloat16):
        self.file, self.path, self.shape, self.is_bfloat16 = file, path, tuple(shape), is_bfloat16

    def read(self, dtype):
        out = np.empty(self.shape, dtype)
        try:
            with h5py.File(self.file, "r") as h5:
                dataset = h5[self.path]

                def rows(a, b):
                    chunk = dataset[a:b]
                    # Keras stores bfloat16 as a 2-byte opaque type.
                    return chunk.view(ml_dtypes.bfloat16) if self.is_bfloat16 else chunk

                return read_chunked(out, rows, self.shape[0])
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:  # h5py's
            raise CheckpointError(f"Could not read '{self.path}' from {self.file} ({e}): the "
                                  "file is truncated or corrupt.") from e


def _policy_paths(config: GemmaConfig) -> Dict[str, str]:
    """keras-hub layer path (the keys of its DTypePolicyMap) -> our canonical name."""
    paths = {"token_embedding": "token_embedding"}
    for i in range(config.num_layers):
        for suffix in _kernel_layouts(config):
            inner = f"attention/{suffix}" if suffix in _ATTENTION else suffix
            paths[f"decoder_block_{i}/{inner}"] = f"decoder_block_{i}/{suffix}"
    return paths


_ATTENTION = ("query", "key", "value", "attention_output")
# The version of the "gemma_keras" layout (our layers' own quantized variables, as
# save_own_variables writes them). Bump it whenever Linear's or the embedding's quantized
# variables change meaning (e.g. another int4 packing): older files are then refused
# instead of misread, since the shapes alone may not change.
QUANTIZED_LAYOUT_VERSION = 2
# keras-hub's serialised policy classes that can describe int8 / int4 layers.
_POLICY_CLASSES = ("QuantizedDTypePolicy", "Int4DTypePolicy", "QuantizedInt8DTypePolicy")


def read_quantization(directory: pathlib.Path, config: GemmaConfig) -> Tuple[str, Dict[str, str]]:
    """(layout, {canonical name: "int8" / "int4/<block>"}) of a preset's quantized layers.
    layout "keras_hub": keras-hub's own (config.json's DTypePolicyMap); "gemma_keras": our
    layers' own variables (metadata.json says which layers). Empty for a float preset."""
    ours = _read_metadata(directory).get("gemma_keras", {})
    recorded = ours.get("quantization") if isinstance(ours, dict) else None
    source = directory / "metadata.json"
    names = set(_policy_paths(config).values())
    if recorded is not None:
        layers = recorded.get("layers") if isinstance(recorded, dict) else None
        if (not isinstance(layers, dict) or recorded.get("layout") != "gemma_keras"
                or not set(layers) <= names):
            raise CheckpointError(f"{source}: gemma_keras.quantization is not what "
                                  "save_to_preset writes; the file is damaged.")
        if recorded.get("version") != QUANTIZED_LAYOUT_VERSION:
            raise CheckpointError(
                f"{source}: the quantized weights are in version {recorded.get('version')!r} "
                f"of gemma_keras' layout; this gemma_keras reads version "
                f"{QUANTIZED_LAYOUT_VERSION}. Save the preset again from its float original "
                "(from_preset(..., quantize=...)), or use the gemma_keras that wrote it.")
        return "gemma_keras", {name: check_policy_mode(mode, source)
                               for name, mode in layers.items()}
    path = directory / "config.json"
    dtype = read_json(path).get("config", {}).get("dtype")
    if not (isinstance(dtype, dict) and dtype.get("class_name") == "DTypePolicyMap"):
        return "keras_hub", {}
    policies = (dtype.get("config") or {}).get("policy_map")
    if not isinstance(policies, dict):
        raise CheckpointError(f"{path}: the DTypePolicyMap has no policy_map.")
    paths, found = _policy_paths(config), {}
    for key, policy in policies.items():
        if not isinstance(policy, dict) or policy.get("class_name") not in _POLICY_CLASSES:
            kind = policy.get("class_name") if isinstance(policy, dict) else policy
            raise ConfigError(
                f"{path}: layer '{key}' has dtype policy {kind!r}; gemma_keras loads int8 and "
                "int4 quantized presets only. Load a float preset and pass quantize='int8' "
                "or 'int4'.")
        mode = check_policy_mode((policy.get("config") or {}).get("mode"), f"{path} ({key})")
        if key not in paths:
            raise CheckpointError(f"{path}: quantized layer '{key}' is not a layer of this "
                                  "Gemma config.")
        if mode != "int8":
            raise ConfigError(
                f"{path}: layer '{key}' is {mode}-quantized in keras-hub's layout, which "
                "gemma_keras cannot take over exactly (Keras groups the int4 weights of "
                "keras-hub's attention kernels across output channels). Load the float preset "
                "with from_preset(..., quantize='int4'), or an int8 preset.")
        found[paths[key]] = mode
    return "keras_hub", found


class _ReshapedScale:
    """A keras-hub int8 scale ([1, 1, heads, head_dim] / [1, 1, out]): our layer keeps the
    same per-output values with other unit axes."""

    reshape_to_variable = True

    def __init__(self, entry):
        self.entry, self.shape = entry, entry.shape

    def read(self, dtype):
        return self.entry.read(dtype)


def _quantized_entry(name, mode, layout, group, index, layouts, source):
    variables, k = {}, 0
    while f"{group}/vars/{k}" in index:
        variables[str(k)] = index[f"{group}/vars/{k}"]
        k += 1
    if not variables:
        return None
    suffix = name.rsplit("/", 1)[-1]
    if layout == "keras_hub" and suffix in layouts:  # int8 (read_quantization refuses int4)
        if len(variables) != 2:
            raise CheckpointError(f"{source}: int8 layer '{group}' should hold a kernel and "
                                  f"a scale, found {len(variables)} variable(s).")
        theirs, ours, to_ours, _ = layouts[suffix]
        variables = {"0": Transformed(variables["0"], theirs, ours, to_ours),
                     "1": _ReshapedScale(variables["1"])}
    return QuantizedEntry(mode, variables)


def reader(directory: pathlib.Path, config: GemmaConfig) -> Reader:
    backbone = read_json(directory / "config.json")
    gemma3 = backbone.get("registered_name") == GEMMA3_BACKBONE
    arguments = backbone.get("config")
    if gemma3 and isinstance(arguments, dict) and arguments.get("vision_encoder") is not None:
        # Its weights sit under layers/gemma3_vision_encoder, which no name below reaches.
        warn_image_tower_unread(directory)
    index = _index_datasets(_weight_files(directory))
    layout, quantized = read_quantization(directory, config)
    paths = {"token_embedding": "layers/reversible_embedding",
             "final_normalization": "layers/rms_normalization"}
    for i, prefix in enumerate(_block_prefixes(index, config.num_layers, gemma3)):
        for suffix, group in _BLOCK_H5.items():
            paths[f"decoder_block_{i}/{suffix}"] = f"{prefix}/{group}"
    layouts = _kernel_layouts(config)
    out = {}
    for name, group in paths.items():
        if name in quantized:
            entry = _quantized_entry(name, quantized[name], layout, group, index, layouts,
                                     directory)
            if entry is not None:
                out[name] = entry
            continue
        entry = index.get(f"{group}/vars/0")
        if entry is None:
            continue
        suffix = name.rsplit("/", 1)[-1]
        if suffix in layouts:
            theirs, ours, to_ours, _ = layouts[suffix]
            entry = Transformed(entry, theirs, ours, to_ours)
        out[name] = entry
    return out


# ---- writing ------------------------------------------------------------------------------
def _policy(dtype_name):
    return {"module": "keras", "class_name": "DTypePolicy", "config": {"name": dtype_name},
            "registered_name": None}


def _serialized(package, module, class_name, config):
    return {"module": f"keras_hub.src.models.{package}.{module}", "class_name": class_name,
            "config": config, "registered_name": f"keras_hub>{class_name}"}


def writes_gemma3(config: GemmaConfig) -> bool:
    """Whether `config` is written as keras-hub's Gemma3Backbone: it has QK-norm or RoPE set
    per attention kind, which GemmaBackbone cannot take. Every Gemma 1 and 2 config is
    written as a GemmaBackbone, as before Gemma 3."""
    return (config.use_query_key_norm or config.sliding_window_pattern != 2
            or config.rope_varies_by_kind)


def _gemma3_backbone_config(config: GemmaConfig) -> dict:
    """Gemma3Backbone's arguments, as its get_config writes them for a text-only model."""
    values = config.to_keras_hub()
    values["intermediate_dim"] = config.ffn_branch_dim  # one GeGLU branch
    values.update({name: getattr(config, name) for name in _GEMMA3_TAKES})
    values.update(image_size=None, vision_encoder=None, use_bidirectional_attention=False,
                  is_embedding_model=False, pooling_intermediate_dim=None, embedding_dim=None)
    return values


def _metadata_config(config: GemmaConfig) -> dict:
    """The fields keras-hub's backbone class for `config` does not take, for read_config."""
    names = [n for n in config.GEMMA_KERAS_ONLY
             if not (writes_gemma3(config) and n in _GEMMA3_TAKES)]
    return {n: getattr(config, n) for n in names}


def _has_vision_pieces(tokenizer) -> bool:
    """Whether keras-hub's Gemma3Tokenizer may look up its image pieces in this vocabulary
    (it raises on a missing one unless told has_vision_tokens=False)."""
    return tokenizer is not None and all(
        tokenizer.token_to_id(p) is not None
        for p in ("<img>", "<start_of_image>", "<end_of_image>"))


def _policy_map(config: GemmaConfig, dtype_name: str, quantized: Dict[str, str]):
    """keras-hub's serialised DTypePolicyMap for int8 layers (what its Backbone.get_config
    writes for a quantized model), with our dtype as the float default and source (keras-hub
    writes null there, and then loads in its global dtype)."""
    names = {ours: path for path, ours in _policy_paths(config).items()}
    policies = {names[name]: {"module": "keras.dtype_policies",
                              "class_name": "QuantizedDTypePolicy",
                              "config": {"mode": mode, "source_name": dtype_name},
                              "registered_name": None}
                for name, mode in quantized.items()}
    return {"module": "keras.dtype_policies", "class_name": "DTypePolicyMap",
            "config": {"default_policy": dtype_name, "policy_map": policies},
            "registered_name": None}


def _configs(config: GemmaConfig, dtype_name: str, sequence_length: int, dtype_policy=None,
             tokenizer=None):
    """config.json, tokenizer.json, preprocessor.json and task.json, as keras-hub's
    Gemma (or Gemma3, text-only) CausalLM.save_to_preset writes them."""
    gemma3 = writes_gemma3(config)
    kind, title = ("gemma3", "Gemma3") if gemma3 else ("gemma", "Gemma")  # module, class
    arguments = _gemma3_backbone_config(config) if gemma3 else config.to_keras_hub()
    backbone = _serialized(kind, f"{kind}_backbone", f"{title}Backbone", {
        "name": f"{kind}_backbone", "trainable": True,
        "dtype": dtype_policy or _policy(dtype_name), **arguments})
    tokenizer_config = {
        "name": f"{kind}_tokenizer", "trainable": True, "dtype": _policy("int32"),
        "config_file": "tokenizer.json", "proto": None, "sequence_length": None,
        "add_bos": False, "add_eos": False}
    if gemma3:
        tokenizer_config["has_vision_tokens"] = _has_vision_pieces(tokenizer)
    tokenizer_json = _serialized(kind, f"{kind}_tokenizer", f"{title}Tokenizer", tokenizer_config)
    preprocessor_config = {
        "name": f"{kind}_causal_lm_preprocessor", "trainable": True,
        "dtype": _policy("float32"), "tokenizer": tokenizer_json,
        "config_file": "preprocessor.json", "sequence_length": sequence_length,
        "add_start_token": True, "add_end_token": True}
    if gemma3:  # keras-hub's defaults, which it writes for a text-only model too
        preprocessor_config.update(num_vision_tokens_per_image=256, max_images_per_prompt=2)
    preprocessor = _serialized(kind, f"{kind}_causal_lm_preprocessor",
                               f"{title}CausalLMPreprocessor", preprocessor_config)
    task = _serialized(kind, f"{kind}_causal_lm", f"{title}CausalLM", {
        "backbone": backbone, "preprocessor": preprocessor, "name": f"{kind}_causal_lm"})
    return backbone, tokenizer_json, preprocessor, task


def _h5_groups(config: GemmaConfig):
    """canonical name -> (h5 group, keras layer name), keras-hub's naming. keras-hub names
    each layer inside a decoder block with its canonical suffix ("query", "ffw_gating", ...)."""
    groups = {"token_embedding": ("layers/reversible_embedding", "token_embedding"),
              "final_normalization": ("layers/rms_normalization", "final_normalization")}
    for i in range(config.num_layers):
        prefix = _block_group(writes_gemma3(config), i)
        for suffix, group in _BLOCK_H5.items():
            groups[f"decoder_block_{i}/{suffix}"] = (f"{prefix}/{group}", suffix)
        groups[f"@block{i}"] = (prefix, f"decoder_block_{i}")
    return groups


def _layer_arrays(name, layer, attr, layout, layouts):
    """The datasets `vars/0..` of one layer, in the preset's layout."""
    suffix = name.rsplit("/", 1)[-1]
    if layer_policy_mode(layer) is None:
        if attr == "kernel" and getattr(layer, "lora_enabled", False):
            value = layer.merged_kernel()
        else:
            value = getattr(layer, attr).value
        array = np.asarray(keras.ops.convert_to_numpy(value))
        if suffix in layouts:
            array = np.ascontiguousarray(layouts[suffix][3](array))
        return [array]
    store = own_variables(layer)  # Keras' order; LoRA merged as Keras saves it
    arrays = [np.asarray(keras.ops.convert_to_numpy(store[str(k)])) for k in range(len(store))]
    if layout == "keras_hub" and suffix in layouts:  # int8: kernel [out, in] and its scale
        theirs = layouts[suffix][0]
        out_axes = {"query": theirs[::2], "key": theirs[::2], "value": theirs[::2]}.get(
            suffix, theirs[-1:])
        arrays = [np.ascontiguousarray(layouts[suffix][3](arrays[0])),
                  arrays[1].reshape((1, 1) + tuple(out_axes))]
    return arrays


def _write_weights(backbone, directory: pathlib.Path, max_shard_bytes: Optional[int],
                   layout: str = "keras_hub"):
    groups = _h5_groups(backbone.config)
    layouts = _kernel_layouts(backbone.config)
    shards, weight_map, size = [], {}, 0
    h5 = None

    def new_shard():
        nonlocal h5, size
        if h5 is not None:
            h5.close()
        name = (WEIGHTS_FILE if max_shard_bytes is None
                else f"model_{len(shards):05d}.weights.h5")
        shards.append(name)
        h5, size = h5py.File(directory / name, "w"), 0
        h5.create_group("vars").attrs["name"] = ("gemma3_backbone"
                                                 if writes_gemma3(backbone.config)
                                                 else "gemma_backbone")

    new_shard()
    table = list(layer_table(backbone))
    progress.start("writing weights", len(table))
    try:
        for name, layer, attr in table:
            progress.step()
            arrays = _layer_arrays(name, layer, attr, layout, layouts)
            nbytes = sum(a.nbytes for a in arrays)
            if max_shard_bytes is not None and size and size + nbytes > max_shard_bytes:
                new_shard()
            group_path, layer_name = groups[name]
            vars_group = h5.require_group(f"{group_path}/vars")
            vars_group.attrs["name"] = layer_name
            for k, array in enumerate(arrays):
                dataset = vars_group.create_dataset(str(k), data=array)
                if array.dtype == ml_dtypes.bfloat16:
                    dataset.attrs["dtype"] = "bfloat16"
            weight_map[f"/{group_path}/vars"] = shards[-1]
            size += nbytes
            # Parent groups carry their layer name as Keras writes it.
            block = name.split("/")[0]
            if block.startswith("decoder_block_"):
                prefix, block_name = groups["@block" + block[len("decoder_block_"):]]
                h5.require_group(f"{prefix}/vars").attrs["name"] = block_name
    finally:
        h5.close()
    if max_shard_bytes is not None:
        total = sum((directory / s).stat().st_size for s in shards)
        (directory / SHARDED_WEIGHTS_INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=4))


def _itemsize(variable) -> int:
    dtype = keras.backend.standardize_dtype(variable.dtype)
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


def write_preset(backbone, tokenizer, directory, sequence_length: int = 8192,
                 max_shard_size: Optional[float] = None, overwrite: bool = False,
                 instruct: Optional[bool] = None):
    """Writes a keras-hub GemmaCausalLM preset (Gemma3CausalLM for a Gemma 3 config, see
    `writes_gemma3`). `max_shard_size` in GB, as keras-hub. An existing `directory` is refused
    unless `overwrite` (then replaced atomically). `instruct` (True / False; None: unknown, not
    written) goes into metadata.json for `read_instruct`."""
    check_target(directory, overwrite, directory=True)  # before any work
    config: GemmaConfig = backbone.config
    dtype_name = backbone.dtype_policy.name
    shard_bytes = None if max_shard_size is None else int(max_shard_size * 1024 ** 3)
    quantized = quantized_layers(backbone)
    # int8 alone: keras-hub's layout and policy map; any int4: our layers' own variables
    # (see the module docstring), described in metadata.json only.
    layout = ("keras_hub" if all(mode == "int8" for mode in quantized.values())
              else "gemma_keras")
    policy = (_policy_map(config, dtype_name, quantized)
              if quantized and layout == "keras_hub" else None)
    backbone_json, tokenizer_json, preprocessor_json, task_json = _configs(
        config, dtype_name, sequence_length, policy, tokenizer)
    ours = {"config": _metadata_config(config)}
    if instruct is not None:
        ours["instruct"] = bool(instruct)
    if layout == "gemma_keras":
        ours["quantization"] = {"layout": layout, "version": QUANTIZED_LAYOUT_VERSION,
                                "layers": quantized}
    metadata = {
        "keras_version": keras.__version__,
        "parameter_count": config.parameter_count(),
        "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
        "tasks": ["CausalLM"],
        "gemma_keras": ours,
    }
    # The weights' bytes (LoRA adapters are merged, not written): room for them is checked
    # before anything is written (see atomic._check_space).
    size = sum(int(np.prod(v.shape)) * _itemsize(v) for v in backbone.weights
               if "lora" not in v.path)
    with atomic_directory(directory, overwrite, size=size) as tmp:
        for name, content in (("config.json", backbone_json), ("tokenizer.json", tokenizer_json),
                              ("preprocessor.json", preprocessor_json), ("task.json", task_json),
                              ("metadata.json", metadata)):
            (tmp / name).write_text(json.dumps(content, indent=4))
        if tokenizer is not None:
            tokenizer.save_assets(tmp / "assets" / "tokenizer")
        _write_weights(backbone, tmp, shard_bytes, layout)
