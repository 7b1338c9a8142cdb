"""Hugging Face Gemma checkpoints: config.json (model_type gemma, gemma2, gemma3_text, or gemma3
with its text part) and safetensors.

Tensors are read one at a time with plain file reads at the offsets the safetensors header
gives (no mmap, so pages of other tensors never count against the process), checked against
the file size first so a truncated download is named instead of crashing half-way.
"""

from __future__ import annotations

import json
import pathlib
import struct
from typing import Dict, Optional, Tuple

import ml_dtypes
import numpy as np

from gemma_keras.checkpoints.reading import (listed_file, read_json, recorded_instruct,
                                             warn_image_tower_unread)
from gemma_keras.checkpoints.weights import Reader, read_chunked
from gemma_keras.config import GemmaConfig
from gemma_keras.errors import CheckpointError, ConfigError

# "vaultgemma": Gemma 2 without the post-norms (VaultGemma 1B).
SUPPORTED_MODEL_TYPES = ("gemma", "gemma2", "vaultgemma", "gemma3_text", "gemma3")
SAFETENSORS_INDEX = "model.safetensors.index.json"
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "F64": np.float64}
# Both spellings mean Gemma's tanh-approximate GELU for these weights: early Gemma configs say
# "gelu" although the model was trained with the approximation.
_GELU_NAMES = ("gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast")
# transformers' Gemma3TextConfig defaults (4.50 and 5.x agree). The hub's multimodal configs
# (gemma-3-4b-it, ...) write only what differs from them inside "text_config".
_GEMMA3_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
    "head_dim": 256, "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0, "sliding_window_pattern": 6,
}
# Where a multimodal checkpoint keeps its text model's tensors (transformers 4.50 wrote the
# hub's files with the first, 5.x saves with the second), and the towers' tensors, which are
# left unread until images are supported.
GEMMA3_TEXT_PREFIXES = ("language_model.model.", "model.language_model.")
_GEMMA3_OTHER_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                          "model.multi_modal_projector.", "language_model.lm_head.")


def text_config(hf: dict, path) -> Tuple[dict, str]:
    """(the text model's config, its model_type): `hf` itself, or the "text_config" of a
    multimodal Gemma 3 config, with transformers' defaults under what the file omits."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{path} has model_type '{model_type}'; gemma_keras loads only "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints (Gemma 1, 1.1, CodeGemma, Gemma 2, "
            "VaultGemma, Gemma 3). Use the model's own library for other families.")
    if model_type == "gemma3":
        inner = hf.get("text_config")
        if not isinstance(inner, dict):
            raise ConfigError(f"{path}: a Gemma 3 (model_type gemma3) config holds its text "
                              "model's settings in 'text_config', which is missing.")
        return {**_GEMMA3_DEFAULTS, **inner}, "gemma3_text"
    if model_type == "gemma3_text":
        return {**_GEMMA3_DEFAULTS, **hf}, model_type
    return hf, model_type


def read_config(directory: pathlib.Path) -> Tuple[GemmaConfig, str]:
    """GemmaConfig and the checkpoint dtype from a transformers 4.38+ config.json."""
    path = directory / "config.json"
    outer = read_json(path)
    hf, model_type = text_config(outer, path)
    try:
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in _GELU_NAMES:
            raise ConfigError(f"{path}: activation '{act}' is not Gemma's GELU.")
        values = dict(
            vocabulary_size=hf["vocab_size"],
            num_layers=hf["num_hidden_layers"],
            num_query_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
            hidden_dim=hf["hidden_size"],
            # HF counts one GeGLU branch; keras-hub and the paper count both.
            intermediate_dim=2 * hf["intermediate_size"],
            head_dim=hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"]),
            layer_norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
            max_sequence_length=hf.get("max_position_embeddings", 8192),
            dropout=float(hf.get("attention_dropout", 0.0) or 0.0),
        )
    except KeyError as e:
        raise ConfigError(f"{path} lacks the field {e}, which a Gemma config has.") from None
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as e:  # wrong kinds
        raise ConfigError(f"{path}: a field has a value of the wrong kind ({e}).") from None
    for where in (outer, hf):
        if where.get("tie_word_embeddings") is False:
            raise ConfigError(f"{path}: tie_word_embeddings is false, but Gemma ties its "
                              "output head to the embedding.")
    if hf.get("use_bidirectional_attention"):
        raise ConfigError(f"{path}: bidirectional attention (EmbeddingGemma) is not a Gemma "
                          "causal LM.")
    try:
        if model_type == "gemma":
            values["rope_max_wavelength"] = _rope(hf, "full_attention", 10_000.0, path)[0]
        else:
            _sliding_values(hf, values, path, model_type)
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
        raise ConfigError(f"{path}: a field has a value of the wrong kind ({e}).") from None
    dtype = (hf.get("torch_dtype") or hf.get("dtype") or outer.get("torch_dtype")
             or outer.get("dtype") or "float32")
    return GemmaConfig.from_dict(values, source=str(path)), str(dtype)


def _rope(hf, kind, default_theta, path):
    """(base, linear scaling factor) of RoPE on `kind`'s layers ("full_attention" or
    "sliding_attention"), from either spelling: transformers <= 4.x writes rope_theta,
    rope_local_base_freq and rope_scaling (global layers only); 5.x writes rope_parameters,
    nested by layer kind for Gemma 3 and flat for Gemma 1 and 2."""
    parameters = hf.get("rope_parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise ConfigError(f"{path}: rope_parameters {parameters!r} is not an object.")
    if isinstance(parameters, dict) and kind in parameters:
        parameters = parameters[kind]
    if isinstance(parameters, dict) and parameters:
        theta = parameters.get("rope_theta", default_theta)
        scaling = parameters
    else:
        local = kind == "sliding_attention" and "rope_local_base_freq" in hf
        theta = hf["rope_local_base_freq"] if local else hf.get("rope_theta", default_theta)
        scaling = (hf.get("rope_scaling") if kind == "full_attention" else None) or {}
    if not isinstance(scaling, dict):
        raise ConfigError(f"{path}: rope_scaling {scaling!r} is not an object.")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta or default_theta), 1.0
    if rope_type == "linear":
        return float(theta or default_theta), float(scaling.get("factor", 1.0))
    raise ConfigError(f"{path}: RoPE type {rope_type!r} on the {kind} layers is not one a Gemma "
                      "was trained with; gemma_keras computes 'default' and 'linear' RoPE.")


def _layer_pattern(hf, num_layers, default, path):
    """The sliding window pattern p (layer i global when (i + 1) % p == 0) of an explicit
    `layer_types` list, else of sliding_window_pattern; None when every layer is global."""
    layer_types = hf.get("layer_types")
    if layer_types is None:
        return hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", default))
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
        raise ConfigError(f"{path}: layer_types should list one kind per layer "
                          f"({num_layers}), found {layer_types!r}.")
    if all(kind == "full_attention" for kind in layer_types):
        return None
    pattern = (layer_types.index("full_attention") + 1 if "full_attention" in layer_types
               else num_layers + 1)
    expected = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                for i in range(num_layers)]
    if layer_types != expected:
        raise ConfigError(
            f"{path}: layer_types {layer_types} is not a repeating run of sliding layers "
            "closed by one full-attention layer, the pattern Gemma 2 and 3 use; gemma_keras "
            "cannot build other layer orders.")
    return pattern


def _sliding_values(hf, values, path, model_type):
    """Adds the fields of Gemma 2 and 3 (sliding window, post-norms, soft-caps, query scale,
    RoPE per layer kind, QK-norm) of config.json `hf` to `values`."""
    gemma3 = model_type == "gemma3_text"
    head_dim = values["head_dim"]
    scalar = hf.get("query_pre_attn_scalar", head_dim)
    per_head_width = values["hidden_dim"] // values["num_query_heads"]
    if scalar == head_dim or scalar == per_head_width:
        values["query_head_dim_normalize"] = scalar == head_dim
    else:  # transformers computes any scalar; the boolean spelling covers released models
        values["query_pre_attn_scalar"] = float(scalar)
    window = hf.get("sliding_window") or hf.get("sliding_window_size") or 4096
    pattern = _layer_pattern(hf, values["num_layers"], 6 if gemma3 else 2, path)
    global_theta, global_factor = _rope(hf, "full_attention",
                                        1_000_000.0 if gemma3 else 10_000.0, path)
    values.update(
        use_post_attention_norm=True,
        use_post_ffw_norm=True,
        attention_logit_soft_cap=hf.get("attn_logit_softcapping"),
        final_logit_soft_cap=hf.get("final_logit_softcapping"),
        use_sliding_window_attention=pattern is not None,
        sliding_window_size=window,
        rope_max_wavelength=global_theta,
        global_rope_scaling_factor=global_factor,
    )
    if pattern is not None and pattern != 2:
        values["sliding_window_pattern"] = pattern
    local_theta, local_factor = _rope(hf, "sliding_attention",
                                      10_000.0 if gemma3 else global_theta, path)
    if local_theta != global_theta:
        values["local_rope_max_wavelength"] = local_theta
    if local_factor != 1.0:
        values["local_rope_scaling_factor"] = local_factor
    if gemma3:
        values["use_query_key_norm"] = True
    if model_type == "vaultgemma":
        values.update(use_post_attention_norm=False, use_post_ffw_norm=False)


def read_instruct(directory: pathlib.Path) -> Optional[bool]:
    """Whether the checkpoint says it is instruction-tuned: config.json's "gemma_keras" entry,
    which our writer fills in (transformers keeps an unknown config key as an attribute and
    writes it back, and does nothing else with it). None when it does not say, as in Google's
    own repositories (their cards say instead)."""
    path = directory / "config.json"
    return recorded_instruct(read_json(path), path)


# ---- safetensors --------------------------------------------------------------------------
def _tensor_index(file: pathlib.Path) -> Dict[str, Tuple[pathlib.Path, str, tuple, int, int]]:
    """name -> (file, dtype, shape, absolute start, end) from one file's header."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{file} is truncated: too short to be a safetensors file.")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise CheckpointError(f"{file} is truncated or corrupt: its header claims "
                                  f"{header_len} bytes but the file has {size}.")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file} has a corrupt safetensors header ({e}).") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} has a corrupt safetensors header: not a JSON object.")
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end, shape = _tensor_extent(file, name, info)
        if base + end > size:
            raise CheckpointError(
                f"{file} is truncated: tensor '{name}' ends at byte {base + end} but the file "
                f"has {size} bytes. Download it again.")
        out[name] = (file, info["dtype"], shape, base + begin, base + end)
    return out


def _whole_numbers(value, count=None) -> bool:
    return (isinstance(value, list) and (count is None or len(value) == count)
            and all(type(v) is int and v >= 0 for v in value))


def _tensor_extent(file, name, info):
    """(begin, end, shape) of one header entry, checked: a tensor is read only when its dtype
    is known and its byte range holds exactly its shape (so no header can make a loader
    allocate more than the file holds)."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{file}: the header entry of tensor '{name}' is not an object.")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise CheckpointError(f"{file}: tensor '{name}' has unsupported dtype {dtype!r}.")
    if not _whole_numbers(shape) or not _whole_numbers(offsets, 2) or offsets[0] > offsets[1]:
        raise CheckpointError(f"{file}: tensor '{name}' has a corrupt shape {shape!r} or "
                              f"data_offsets {offsets!r}.")
    begin, end = offsets
    if int(np.prod(shape, dtype=object)) * np.dtype(_DTYPES[dtype]).itemsize != end - begin:
        raise CheckpointError(f"{file}: tensor '{name}' of shape {shape} and dtype {dtype} "
                              f"does not fill its {end - begin} bytes: the file is corrupt.")
    return begin, end, tuple(shape)


def _safetensors_files(directory: pathlib.Path):
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'.")
        files = list(dict.fromkeys(listed_file(directory, name, index)
                                   for name in weight_map.values()))
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that are missing: {missing}.")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"No weights in {directory}: expected model.safetensors or {SAFETENSORS_INDEX} "
            "with its shards (PyTorch .bin checkpoints are not read: they need unpickling).")
    return files


class _SafetensorsEntry:
    """One tensor of a safetensors file, read as stored: HF Linear weights [out, in] are our
    kernels' layout too (layers/linear.py)."""

    def __init__(self, file, raw_dtype, raw_shape, start, end):
        self.file, self.raw_dtype, self.raw_shape = file, np.dtype(_DTYPES[raw_dtype]), raw_shape
        self.start, self.end = start, end
        self.shape = tuple(raw_shape)

    def read(self, dtype):
        raw = np.empty(self.raw_shape, dtype)
        with open(self.file, "rb") as f:
            f.seek(self.start)
            if self.raw_dtype == raw.dtype:  # straight into the final buffer, no copy
                got = f.readinto(memoryview(raw.reshape(-1).view(np.uint8)))
                if got != self.end - self.start:
                    raise CheckpointError(f"{self.file} is truncated while reading a tensor.")
            else:
                row_bytes = int(np.prod(self.raw_shape[1:])) * self.raw_dtype.itemsize

                def rows(a, b):
                    data = f.read((b - a) * row_bytes)
                    if len(data) != (b - a) * row_bytes:
                        raise CheckpointError(f"{self.file} is truncated while reading a tensor.")
                    flat = np.frombuffer(data, self.raw_dtype)
                    return flat.reshape((b - a,) + self.raw_shape[1:])

                read_chunked(raw, rows, self.raw_shape[0])
        return raw


def block_names(model_type: str):
    """(HF norm name -> ours, HF projection name -> ours) inside a decoder layer. Gemma 1's
    "post_attention_layernorm" is the pre-FFN norm; Gemma 2 has a true one."""
    if model_type == "gemma":
        norms = {"input_layernorm": "pre_attention_norm",
                 "post_attention_layernorm": "pre_ffw_norm"}
    elif model_type == "vaultgemma":  # Gemma 2's pre-norms only
        norms = {"input_layernorm": "pre_attention_norm",
                 "pre_feedforward_layernorm": "pre_ffw_norm"}
    elif model_type in ("gemma3_text", "gemma3"):  # Gemma 2's, and the QK-norms
        norms = {"input_layernorm": "pre_attention_norm",
                 "post_attention_layernorm": "post_attention_norm",
                 "pre_feedforward_layernorm": "pre_ffw_norm",
                 "post_feedforward_layernorm": "post_ffw_norm",
                 "self_attn.q_norm": "query_norm", "self_attn.k_norm": "key_norm"}
    else:
        norms = {"input_layernorm": "pre_attention_norm",
                 "post_attention_layernorm": "post_attention_norm",
                 "pre_feedforward_layernorm": "pre_ffw_norm",
                 "post_feedforward_layernorm": "post_ffw_norm"}
    projections = {"self_attn.q_proj": "query", "self_attn.k_proj": "key",
                   "self_attn.v_proj": "value", "self_attn.o_proj": "attention_output",
                   "mlp.gate_proj": "ffw_gating", "mlp.up_proj": "ffw_gating_2",
                   "mlp.down_proj": "ffw_linear"}
    return norms, projections


def reader(directory: pathlib.Path, model_type: str) -> Reader:
    """Canonical names -> entries that read keras-layout arrays."""
    tensors = {}
    for file in _safetensors_files(directory):
        tensors.update(_tensor_index(file))
    # Names are "model.<...>" ("language_model.model.<...>" or "model.language_model.<...>"
    # for a multimodal Gemma 3, whose image tower and projector are not read); the tied
    # lm_head, when present, duplicates the embedding.
    tensors.pop("lm_head.weight", None)
    if model_type == "gemma3":
        text = {k: v for k, v in tensors.items() if not k.startswith(_GEMMA3_OTHER_PREFIXES)}
        if len(text) < len(tensors):
            warn_image_tower_unread(directory)
        tensors, prefixes = text, GEMMA3_TEXT_PREFIXES
    else:
        prefixes = ("model.",)
    renamed = {}
    for name, info in tensors.items():
        for prefix in prefixes:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        renamed[name] = info
    tensors = renamed

    # HF Linear weights are [out, in] with the attention heads flattened as ours: every
    # projection is read as it is.
    norms, projections = block_names(model_type)
    out = {}
    for name, info in tensors.items():
        if name == "embed_tokens.weight":
            key = "token_embedding"
        elif name == "norm.weight":
            key = "final_normalization"
        elif name.startswith("layers.") and name.endswith(".weight"):
            _, index, rest = name[: -len(".weight")].split(".", 2)
            if rest in norms:
                key = f"decoder_block_{index}/{norms[rest]}"
            elif rest in projections:
                key = f"decoder_block_{index}/{projections[rest]}"
            else:
                key = f"unmapped:{name}"
        else:
            # Surfaces as an "extra weight" error naming the tensor.
            key = f"unmapped:{name}"
        out[key] = _SafetensorsEntry(*info)
    return out

