"""gemma_keras: Google's Gemma models (Gemma 1, 1.1, CodeGemma, Gemma 2, Gemma 3) for Keras 3
on JAX, TensorFlow and PyTorch. Everything public is importable from here.

Names are resolved on first use, so `import gemma_keras` (and the command line) does not
import Keras, and with it a backend, before the user has had a chance to choose one. The
backend is settled (gemma_keras/backends/choice.py) at the first use of a name that needs
Keras, or at the first `import keras` after `import gemma_keras`, whichever comes first; a
Keras imported before gemma_keras keeps the backend Keras chose alone.
"""

import importlib

from gemma_keras.backends import choice as _choice

__version__ = "0.1.0"

# Only a sys.meta_path entry: no file read, no backend imported, nothing raised until Keras is
# looked up, so the user's own `import keras` (which would otherwise meet Keras' default,
# TensorFlow) gets the backend gemma_keras would choose, and keeps it on later runs.
_choice.install_import_hook()

_EXPORTS = {
    "GemmaBackbone": "gemma_keras.backbone",
    "GemmaCausalLM": "gemma_keras.causal_lm",
    "GemmaConfig": "gemma_keras.config",
    "GemmaTokenizer": "gemma_keras.tokenizer",
    "GemmaCausalLMPreprocessor": "gemma_keras.preprocessor",
    "list_presets": "gemma_keras.presets",
    "get_preset_card": "gemma_keras.presets",
    "GemmaError": "gemma_keras.errors",
    "ConfigError": "gemma_keras.errors",
    "CheckpointError": "gemma_keras.errors",
    "PresetAccessError": "gemma_keras.errors",
    "UnknownPresetError": "gemma_keras.errors",
    "WeightShapeError": "gemma_keras.errors",
    "model_parallel": "gemma_keras.distribution",
    "data_parallel": "gemma_keras.distribution",
    "ExportError": "gemma_keras.errors",
    "InvalidArgumentError": "gemma_keras.errors",
    "ArgumentTypeError": "gemma_keras.errors",
    "BackendError": "gemma_keras.errors",
    "TargetExistsError": "gemma_keras.errors",
    "MissingExtraError": "gemma_keras.errors",
    "SpeculationWarning": "gemma_keras.errors",
    "GenerateOptions": "gemma_keras.generation.options",
    "export": "gemma_keras.exporting",  # the function; the package is gemma_keras.exporting
}
# Modules that import no Keras: names from them resolve without settling a backend, so that
# `gk.GemmaError` or `gk.list_presets()` work whatever KERAS_BACKEND says.
_KERAS_FREE = {"gemma_keras.errors", "gemma_keras.presets", "gemma_keras.config"}
# Public submodules: gk.samplers.TopPSampler(...).
_MODULES = {"samplers": "gemma_keras.generation.samplers", "lora": "gemma_keras.lora"}
__all__ = sorted([*_EXPORTS, *_MODULES])


def _settle_backend(module):
    if module not in _KERAS_FREE:
        # Before Keras is imported: a missing backend is one clear line (BackendError), and
        # with none chosen an installed one is picked (gemma_keras/backends/choice.py).
        _choice.ensure_backend()


def __getattr__(name):
    if name in _MODULES or name in _EXPORTS:
        _settle_backend(_MODULES.get(name) or _EXPORTS[name])
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name])
        globals()[name] = value
        return value
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # resolve once
        return value
    raise AttributeError(f"module 'gemma_keras' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
