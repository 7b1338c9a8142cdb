"""Gemma's building blocks, written with keras.ops only so they run on every backend."""

from gemma_keras.layers.attention import GemmaAttention
from gemma_keras.layers.decoder_block import GemmaDecoderBlock
from gemma_keras.layers.feedforward import GemmaFeedForward
from gemma_keras.layers.rms_norm import GemmaRMSNorm
from gemma_keras.layers.rotary import apply_rotary_embedding, rope_tables

__all__ = ["GemmaAttention", "GemmaDecoderBlock", "GemmaFeedForward", "GemmaRMSNorm",
           "apply_rotary_embedding", "rope_tables"]
