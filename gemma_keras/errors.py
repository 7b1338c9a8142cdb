"""The errors gemma_keras raises for bad input. Each message names the file or argument and says
what to do; catching `GemmaError` catches them all."""


class GemmaError(Exception):
    """Base class of every user-facing gemma_keras error."""


class ConfigError(GemmaError, ValueError):
    """A configuration that does not describe a valid Gemma model, or of another model family."""


class UnknownPresetError(GemmaError, ValueError):
    """A preset name that is not built in, not a handle and not an existing directory."""


class PresetAccessError(GemmaError, PermissionError):
    """A gated or private checkpoint: the license was not accepted or credentials are missing."""


class CheckpointError(GemmaError, OSError):
    """A checkpoint directory or file that is missing, truncated or corrupt."""


class WeightShapeError(GemmaError, ValueError):
    """A checkpoint weight whose shape does not match the model built from its config."""


class ExportError(GemmaError, RuntimeError):
    """A model that cannot be exported as asked (too large for the format, quantized, no
    tokenizer), or an export that failed part-way (nothing is left at the target)."""
