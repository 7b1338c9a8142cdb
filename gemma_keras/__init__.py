"""gemma_keras: Google's Gemma models (Gemma 1, 1.1, CodeGemma, Gemma 2) for Keras 3 on JAX,
TensorFlow and PyTorch. Everything public is importable from here."""

from gemma_keras.backbone import GemmaBackbone
from gemma_keras.causal_lm import GemmaCausalLM
from gemma_keras.config import GemmaConfig
from gemma_keras.errors import (CheckpointError, ConfigError, GemmaError, PresetAccessError,
                                UnknownPresetError, WeightShapeError)
from gemma_keras.presets import get_preset_card, list_presets
from gemma_keras.tokenizer import GemmaTokenizer

__version__ = "0.1.0"

__all__ = [
    "GemmaBackbone", "GemmaCausalLM", "GemmaConfig", "GemmaTokenizer", "list_presets",
    "get_preset_card", "GemmaError", "ConfigError", "CheckpointError", "PresetAccessError",
    "UnknownPresetError", "WeightShapeError",
]
