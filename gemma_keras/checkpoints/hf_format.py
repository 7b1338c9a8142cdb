"""Hugging Face Gemma checkpoints: config.json (model_type gemma / gemma2) and safetensors.

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

from gemma_keras.checkpoints.reading import listed_file, read_json, recorded_instruct
from gemma_keras.checkpoints.weights import Reader, read_chunked
from gemma_keras.config import GemmaConfig
from gemma_keras.errors import CheckpointError, ConfigError

SUPPORTED_MODEL_TYPES = ("gemma", "gemma2")
SAFETENSORS_INDEX = "model.safetensors.index.json"
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "F64": np.float64}
# Both spellings mean Gemma's tanh-approximate GELU for these weights: early Gemma configs say
# "gelu" although the model was trained with the approximation.
_GELU_NAMES = ("gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast")


def read_config(directory: pathlib.Path) -> Tuple[GemmaConfig, str]:
    """GemmaConfig and the checkpoint dtype from a transformers 4.38+ config.json."""
    path = directory / "config.json"
    hf = read_json(path)
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{path} has model_type '{model_type}'; gemma_keras loads only "
            f"{' and '.join(SUPPORTED_MODEL_TYPES)} checkpoints (Gemma 1, 1.1, CodeGemma, "
            "Gemma 2). Use the model's own library for other families.")
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
            # transformers <= 4.x writes rope_theta; 5.x nests it in rope_parameters.
            rope_max_wavelength=float(hf.get("rope_theta") or (
                hf.get("rope_parameters") or {}).get("rope_theta", 10_000.0)),
            max_sequence_length=hf.get("max_position_embeddings", 8192),
            dropout=float(hf.get("attention_dropout", 0.0) or 0.0),
        )
    except KeyError as e:
        raise ConfigError(f"{path} lacks the field {e}, which a Gemma config has.") from None
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as e:  # wrong kinds
        raise ConfigError(f"{path}: a field has a value of the wrong kind ({e}).") from None
    if hf.get("tie_word_embeddings") is False:
        raise ConfigError(f"{path}: tie_word_embeddings is false, but Gemma ties its output "
                          "head to the embedding.")
    if hf.get("use_bidirectional_attention"):
        raise ConfigError(f"{path}: bidirectional attention is not a Gemma causal LM.")
    if model_type == "gemma2":
        try:
            _gemma2_values(hf, values, path)
        except (TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
            raise ConfigError(f"{path}: a field has a value of the wrong kind ({e}).") from None
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    return GemmaConfig.from_dict(values, source=str(path)), str(dtype)


def _gemma2_values(hf, values, path):
    """Adds Gemma 2's fields of config.json `hf` to `values`."""
    head_dim = values["head_dim"]
    scalar = hf.get("query_pre_attn_scalar", head_dim)
    per_head_width = values["hidden_dim"] // values["num_query_heads"]
    if scalar not in (head_dim, per_head_width):
        raise ConfigError(
            f"{path}: query_pre_attn_scalar {scalar} is neither head_dim ({head_dim}) nor "
            f"hidden_size / num_attention_heads ({per_head_width}); no Gemma 2 uses that.")
    window = hf.get("sliding_window") or hf.get("sliding_window_size") or 4096
    values.update(
        query_head_dim_normalize=(scalar == head_dim),
        use_post_attention_norm=True,
        use_post_ffw_norm=True,
        attention_logit_soft_cap=hf.get("attn_logit_softcapping"),
        final_logit_soft_cap=hf.get("final_logit_softcapping"),
        use_sliding_window_attention=True,
        sliding_window_size=window,
    )
    layer_types = hf.get("layer_types")
    if layer_types is not None and (
            not isinstance(layer_types, list) or len(layer_types) != values["num_layers"]
            or any(kind != ("sliding_attention" if i % 2 == 0 else "full_attention")
                   for i, kind in enumerate(layer_types))):
        raise ConfigError(f"{path}: layer_types {layer_types} is not Gemma 2's alternation "
                          "of sliding and full attention starting with sliding.")


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
    # Names are "model.<...>"; the tied lm_head, when present, duplicates the embedding.
    tensors = {k[len("model."):] if k.startswith("model.") else k: v for k, v in tensors.items()}
    tensors.pop("lm_head.weight", None)

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

