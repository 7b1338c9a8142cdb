"""Gemma 3 configs as the hub holds them, read against the preset cards, and the configs our HF
writer produces read back by transformers' own config class.

The hub's multimodal configs (gemma-3-4b-it, -12b-it, -27b-it) were written by transformers
4.50, which leaves out of "text_config" every value equal to Gemma3TextConfig's defaults: the
4B's says nothing of its heads, head dim or vocabulary. The 1B's (gemma3_text) is complete; the
270M's (transformers 4.56) adds layer_types. Reading them must give the architecture the cards
describe (the cards' numbers are checked against keras-hub's in test_presets.py).
"""

import json

import pytest

from gemma_keras.checkpoints import hf_format, hf_writer
from gemma_keras.presets import get_preset_card

# The text_config / config fields of the hub's files, as transformers 4.50-4.56 wrote them.
HUB_CONFIGS = {
    "gemma3_instruct_4b": {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "boi_token_index": 255999, "eoi_token_index": 256000, "eos_token_id": [1, 106],
        "image_token_index": 262144, "mm_tokens_per_image": 256, "torch_dtype": "bfloat16",
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                        "model_type": "gemma3_text", "num_hidden_layers": 34,
                        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152},
    },
    "gemma3_instruct_27b": {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "torch_dtype": "bfloat16",
        "text_config": {"head_dim": 128, "hidden_size": 5376, "intermediate_size": 21504,
                        "model_type": "gemma3_text", "num_attention_heads": 32,
                        "num_hidden_layers": 62, "num_key_value_heads": 16,
                        "query_pre_attn_scalar": 168,
                        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
    },
    "gemma3_instruct_1b": {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "attention_bias": False, "attention_dropout": 0.0, "attn_logit_softcapping": None,
        "cache_implementation": "hybrid", "final_logit_softcapping": None, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
        "intermediate_size": 6912, "max_position_embeddings": 32768,
        "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512,
        "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "vocab_size": 262144,
    },
    "gemma3_instruct_270m": {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "_sliding_window_pattern": 6, "head_dim": 256, "hidden_size": 640,
        "intermediate_size": 2048, "layer_types": (["sliding_attention"] * 5
                                                   + ["full_attention"]) * 3,
        "max_position_embeddings": 32768, "num_attention_heads": 4,
        "num_hidden_layers": 18, "num_key_value_heads": 1, "query_pre_attn_scalar": 256,
        "rope_local_base_freq": 10000.0, "rope_scaling": None, "rope_theta": 1000000.0,
        "sliding_window": 512, "torch_dtype": "bfloat16", "vocab_size": 262144,
    },
}


@pytest.mark.once("jax")
@pytest.mark.parametrize("preset", list(HUB_CONFIGS))
def test_hub_gemma3_configs_read_as_their_cards(preset, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HUB_CONFIGS[preset]))
    config, dtype = hf_format.read_config(tmp_path)
    card = get_preset_card(preset).gemma_config()
    assert dtype == "bfloat16"
    # The multimodal checkpoints' table has 64 rows more than the SentencePiece vocabulary
    # (262,208: the image soft token and padding); keras-hub's presets keep 262,144.
    if HUB_CONFIGS[preset]["model_type"] == "gemma3":
        assert config.vocabulary_size == 262_208
        config = config.replace(vocabulary_size=card.vocabulary_size)
    assert config == card


@pytest.mark.once("jax")
@pytest.mark.parametrize("preset", ["gemma3_instruct_270m", "gemma3_instruct_4b",
                                    "gemma3_instruct_27b"])
def test_written_gemma3_configs_mean_the_same_to_transformers(preset):
    """transformers' Gemma3TextConfig (5.x) parses what our writer puts in config.json into
    the layer kinds, RoPE per kind and query scale of the card, and our reader agrees."""
    import transformers

    card = get_preset_card(preset).gemma_config()
    written = hf_writer.hf_config(card, "bfloat16")
    theirs = transformers.Gemma3TextConfig(**{k: v for k, v in written.items()
                                              if k not in ("architectures", "model_type")})
    kinds = ["sliding_attention" if card.attention_kind(i) == "local" else "full_attention"
             for i in range(card.num_layers)]
    assert theirs.layer_types == kinds and kinds.count("full_attention") == card.num_layers // 6
    rope = theirs.rope_parameters
    assert rope["sliding_attention"]["rope_theta"] == 10_000.0
    assert rope["full_attention"]["rope_theta"] == 1_000_000.0
    assert rope["full_attention"].get("factor", 1.0) == card.global_rope_scaling_factor
    assert rope["sliding_attention"].get("rope_type", "default") == "default"
    assert theirs.query_pre_attn_scalar ** -0.5 == pytest.approx(card.query_scale)
    assert theirs.sliding_window == card.sliding_window_size


@pytest.mark.once("jax")
@pytest.mark.parametrize("preset, window", [("gemma3_instruct_1b", 512),
                                            ("gemma3_instruct_27b_text", 1024)])
def test_a_full_context_cache_rings_the_local_layers(preset, window):
    """At the model's whole context the local layers keep one window of slots (a ring), the
    global ones a slot per column: for the 1B at 32k, 22 layers of 512 slots and 4 of 32,768,
    not 26 of 32,768 (speculative decoding's lookahead adds its few slots to the ring)."""
    from gemma_keras.layers.kv_cache import cache_slots

    config = get_preset_card(preset).gemma_config()
    context = config.max_sequence_length
    assert cache_slots(config, context) == {"global": context, "local": window}
    assert cache_slots(config, context, lookahead=8) == {"global": context,
                                                         "local": window + 8}
    assert cache_slots(config, context, ring=False) == {"global": context, "local": context}
