"""Writing a Hugging Face Gemma checkpoint: config.json (model_type gemma, gemma2, gemma3_text), safetensors
(one file, or shards with model.safetensors.index.json), generation_config.json (the ids that end
a reply), tokenizer.model, tokenizer_config.json with Gemma's chat template and tokenizer.json,
which transformers' `from_pretrained` / `AutoTokenizer` and our own reader load.

Our kernels are stored [out, in] with the heads flattened, as HF's Linear weights, so every
tensor is written as it is; only the names change (hf_format.block_names, shared with the
reader). Tensors are converted to host memory and written one at a time, under a temporary
directory that replaces the target only when everything is written.
"""

from __future__ import annotations

import json
import pathlib
import struct
from typing import List, Optional, Tuple

import keras
import numpy as np

from gemma_keras.checkpoints import progress
from gemma_keras.checkpoints.atomic import atomic_directory, check_target
from gemma_keras.checkpoints.hf_format import SAFETENSORS_INDEX, block_names
from gemma_keras.checkpoints.weights import numpy_dtype, refuse_quantized, weight_table
from gemma_keras.config import GemmaConfig
from gemma_keras.errors import ConfigError

_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def hf_model_type(config: GemmaConfig) -> str:
    """"gemma3_text", "gemma2", "vaultgemma" or "gemma": the transformers class that computes
    exactly this config."""
    rope_by_kind = config.rope_varies_by_kind
    post_norms = config.use_post_attention_norm and config.use_post_ffw_norm
    if config.use_query_key_norm and post_norms:
        return "gemma3_text"
    gemma2 = (config.use_post_attention_norm, config.use_post_ffw_norm,
              config.use_sliding_window_attention)
    if all(gemma2) and not config.use_query_key_norm and not rope_by_kind:
        return "gemma2"
    if (not config.use_post_attention_norm and not config.use_post_ffw_norm
            and not config.use_query_key_norm and not rope_by_kind
            and (config.use_sliding_window_attention or config.attention_logit_soft_cap
                 or config.final_logit_soft_cap
                 or config.query_scale != config.head_dim ** -0.5)):
        return "vaultgemma"  # Gemma 2 without post-norms
    if not any(gemma2) and config.query_scale == config.head_dim ** -0.5 and not (
            config.attention_logit_soft_cap or config.final_logit_soft_cap
            or config.use_query_key_norm or rope_by_kind):
        return "gemma"
    raise ConfigError(
        f"This config ({config.describe()}) mixes features of Gemma 1, 2 and 3 (post-norms, "
        "sliding window, soft-caps, query scale, QK-norm, RoPE per layer kind) in a way no "
        "transformers class computes, so it cannot be written as a Hugging Face checkpoint. "
        "Save it as a keras-hub preset.")


_ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                  "vaultgemma": "VaultGemmaForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


def _layer_types(config: GemmaConfig):
    return ["sliding_attention" if config.attention_kind(i) == "local" else "full_attention"
            for i in range(config.num_layers)]


def _rope_entry(config: GemmaConfig, kind: str) -> dict:
    theta, factor = config.rope(kind)
    if factor == 1.0:
        return {"rope_type": "default", "rope_theta": theta}
    return {"rope_type": "linear", "factor": factor, "rope_theta": theta}


def hf_config(config: GemmaConfig, dtype_name: str, tokenizer=None,
              instruct: Optional[bool] = None) -> dict:
    """transformers' config.json; `instruct` (None: unknown, not written) is recorded under a
    "gemma_keras" key for `hf_format.read_instruct` (transformers keeps it as an attribute and
    otherwise ignores it), and decides the eos ids (`eos_token_ids`)."""
    model_type = hf_model_type(config)
    out = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocabulary_size,
        "hidden_size": config.hidden_dim,
        "intermediate_size": config.ffn_branch_dim,  # HF counts one GeGLU branch
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_query_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.layer_norm_epsilon,
        "rope_theta": config.rope_max_wavelength,
        "max_position_embeddings": config.max_sequence_length,
        # Gemma uses the tanh-approximate GELU (early HF configs say "gelu", which is wrong).
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_act": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attention_dropout": config.dropout,
        "tie_word_embeddings": True,
        "torch_dtype": dtype_name,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if model_type != "gemma":
        out.update(
            query_pre_attn_scalar=config.query_scale ** -2,
            sliding_window=config.sliding_window_size,
            attn_logit_softcapping=config.attention_logit_soft_cap,
            final_logit_softcapping=config.final_logit_soft_cap,
            layer_types=_layer_types(config),
        )
        scalar = round(out["query_pre_attn_scalar"])
        if abs(scalar - out["query_pre_attn_scalar"]) < 1e-6:
            out["query_pre_attn_scalar"] = scalar  # as Google writes it: 256, 168
    if model_type == "gemma3_text":
        # Both spellings: transformers 5 reads rope_parameters, 4.50-4.57 the flat keys.
        local, full = _rope_entry(config, "local"), _rope_entry(config, "global")
        out.update(
            rope_parameters={"sliding_attention": local, "full_attention": full},
            rope_local_base_freq=local["rope_theta"],
            rope_scaling=None if full["rope_type"] == "default" else {
                "rope_type": "linear", "factor": full["factor"]},
            sliding_window_pattern=config.sliding_window_pattern,
            use_bidirectional_attention=False,
        )
    if tokenizer is not None:
        out.update(hf_generation_config(tokenizer, instruct))
    if instruct is not None:
        out["gemma_keras"] = {"instruct": bool(instruct)}
    return out


def eos_token_ids(tokenizer, instruct: Optional[bool]):
    """The ids that end a reply, as `generate(stop_token_ids="auto")` chooses them: <eos>, and
    <end_of_turn> unless the model is known to be a base model. Google's instruct checkpoints
    say the same ([<eos>, <end_of_turn>]): without <end_of_turn>, transformers' `generate`
    after `apply_chat_template` runs past the reply into a made-up next turn. One id (an int,
    as Google's base checkpoints write it) when <eos> is all there is."""
    ids = tokenizer.stop_token_ids(instruct)
    return ids if len(ids) > 1 else ids[0]


def hf_generation_config(tokenizer, instruct: Optional[bool]) -> dict:
    """generation_config.json (transformers' `GenerationConfig`, which `generate` reads when
    not told otherwise): the special ids, read from the tokenizer, never assumed."""
    return {"bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": eos_token_ids(tokenizer, instruct)}


def hf_tensor_names(config: GemmaConfig) -> dict:
    """Our canonical weight name -> the HF tensor name."""
    norms, projections = block_names(hf_model_type(config))
    inside = {ours: hf for hf, ours in {**norms, **projections}.items()}
    names = {"token_embedding": "model.embed_tokens.weight",
             "final_normalization": "model.norm.weight"}
    for i in range(config.num_layers):
        for ours, hf in inside.items():
            names[f"decoder_block_{i}/{ours}"] = f"model.layers.{i}.{hf}.weight"
    return names


def write_checkpoint(backbone, tokenizer, directory, max_shard_size: Optional[float] = None,
                     overwrite: bool = False, instruct: Optional[bool] = None):
    """Writes `backbone` (LoRA adapters merged; quantized models refused) as an HF checkpoint
    directory. `max_shard_size` in GB splits the weights into model-0000N-of-0000M files. An
    existing `directory` is refused unless `overwrite` (then replaced atomically). `instruct`:
    see `hf_config`."""
    refuse_quantized(backbone, "format='hf' (a Hugging Face checkpoint)")
    check_target(directory, overwrite, directory=True)  # before any work
    config: GemmaConfig = backbone.config
    dtype_name = backbone.dtype_policy.variable_dtype
    config_json = hf_config(config, dtype_name, tokenizer, instruct)  # refuses hybrids first
    names = hf_tensor_names(config)
    tensors = [(names[name], value) for name, value in weight_table(backbone)]
    shards = _plan_shards(tensors, None if max_shard_size is None
                          else int(max_shard_size * 1024 ** 3))
    with atomic_directory(directory, overwrite,
                          size=sum(_nbytes(v) for _, v in tensors)) as tmp:
        progress.start("writing weights", len(tensors))
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2))
        if tokenizer is not None:
            (tmp / "generation_config.json").write_text(
                json.dumps(hf_generation_config(tokenizer, instruct), indent=2))
        weight_map, total = {}, 0
        for number, shard in enumerate(shards, 1):
            file = ("model.safetensors" if len(shards) == 1
                    else f"model-{number:05d}-of-{len(shards):05d}.safetensors")
            total += _write_safetensors(tmp / file, shard)
            weight_map.update({name: file for name, _ in shard})
        if len(shards) > 1:
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if tokenizer is not None:
            write_hf_tokenizer(tokenizer, tmp)


# Gemma's turn format as a Jinja chat template for transformers' `apply_chat_template`: the
# behaviour of Google's template for Gemma 3 (google/gemma-3-*-it's tokenizer_config.json), as
# `gemma_keras.tokenizer.format_chat` writes it (tests hold the three equal): turns alternate
# user, model, ... (transformers' "assistant" is the "model" turn), a first system message opens
# the first turn followed by a blank line, each message's text is trimmed. A message's content
# may also be a list of parts, as multimodal chats send it: an image part writes
# <start_of_image> (the processor puts the image's soft tokens after it), a text part its text.
# One template for every Gemma: Gemma 1 and 2's write the same turns and refuse a system turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set state = namespace(first='', turns=messages) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}"
    "{%- set state.first = (system if system is string else system[0]['text']) + '\\n\\n' -%}"
    "{%- set state.turns = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for message in state.turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 is even) -%}"
    "{{ raise_exception(\"Gemma's turns alternate user/assistant/user/assistant/..., after "
    "at most one system message.\") }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (state.first if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
# transformers' names of Gemma 3's image pieces (its Gemma 3 processor reads them).
HF_NAMED_PIECES = {"<start_of_image>": "boi_token", "<end_of_image>": "eoi_token",
                   "<image_soft_token>": "image_token"}


def write_hf_tokenizer(tokenizer, directory: pathlib.Path):
    """tokenizer.model (the SentencePiece model itself), tokenizer_config.json (special
    tokens, <bos> added, the chat template) and, when transformers is installed, tokenizer.json
    (the same tokenizer in the `tokenizers` format, which transformers loads without
    converting). Without transformers the first two are enough: transformers converts
    tokenizer.model when it loads the directory.

    The special tokens are the tokenizer's own (`special_pieces`: turn and image markers,
    <mask>), those its vocabulary has: transformers then never splits them and
    skip_special_tokens drops them, as our detokenize(skip_special=True). mask_token is null
    without a <mask> piece: transformers' Gemma tokenizer would otherwise add one past the
    vocabulary."""
    directory = pathlib.Path(directory)
    pieces = tokenizer.special_pieces
    (directory / "tokenizer.model").write_bytes(tokenizer.proto)
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True,
        "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "padding_side": "left",
        "mask_token": "<mask>" if "<mask>" in pieces else None,
        "additional_special_tokens": [p for p in pieces if p != "<mask>"],
        **{name: piece for piece, name in HF_NAMED_PIECES.items() if piece in pieces},
        "chat_template": CHAT_TEMPLATE}, indent=2))
    try:
        import transformers
    except ImportError:
        return
    try:
        fast = transformers.AutoTokenizer.from_pretrained(str(directory))
        fast.backend_tokenizer.save(str(directory / "tokenizer.json"))
    except Exception as error:  # noqa: BLE001
        # tokenizer.json is a convenience (transformers rebuilds it from tokenizer.model):
        # a converter that fails on this transformers version must not lose the checkpoint.
        import warnings

        warnings.warn(f"tokenizer.json was not written (transformers could not convert "
                      f"tokenizer.model: {error}); transformers still loads tokenizer.model.")


def _nbytes(value) -> int:
    return int(np.prod(value.shape)) * _host_dtype(value).itemsize


def _host_dtype(value) -> np.dtype:
    return numpy_dtype(keras.backend.standardize_dtype(value.dtype))


def _plan_shards(tensors, max_bytes) -> List[List[Tuple[str, object]]]:
    shards, size = [[]], 0
    for name, value in tensors:
        if max_bytes is not None and shards[-1] and size + _nbytes(value) > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, value))
        size += _nbytes(value)
    return shards


def _write_safetensors(path: pathlib.Path, tensors) -> int:
    """The safetensors layout: 8-byte little-endian header length, a JSON header of dtypes,
    shapes and byte offsets, then the raw tensors in order. Returns the data bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, value in tensors:
        dtype = keras.backend.standardize_dtype(value.dtype)
        if dtype not in _CODES:
            raise ConfigError(f"Cannot write '{name}' of dtype {dtype} to safetensors.")
        size = _nbytes(value)
        header[name] = {"dtype": _CODES[dtype], "shape": [int(d) for d in value.shape],
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, value in tensors:  # one tensor in host memory at a time
            progress.step()
            array = np.asarray(keras.ops.convert_to_numpy(value))
            # Keras' torch conversion widens bfloat16 to float32; the header says bfloat16.
            array = np.ascontiguousarray(array.astype(_host_dtype(value), copy=False))
            f.write(memoryview(array.reshape(-1).view(np.uint8)))
    return offset
