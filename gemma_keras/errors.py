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


class InvalidArgumentError(GemmaError, ValueError):
    """An argument whose value cannot be used: `max_new_tokens=0`, an unknown sampler, an
    empty batch, a prompt longer than the context, no training examples."""


class ArgumentTypeError(GemmaError, TypeError):
    """An argument of the wrong type: `generate(None)`, `max_new_tokens="5"`, `seed="abc"`."""


class BackendError(GemmaError, ImportError):
    """The Keras backend asked for (KERAS_BACKEND, --backend) is not installed or is not one
    gemma_keras runs on; the message names the pip extra that installs it."""


class MissingExtraError(GemmaError, ImportError):
    """A feature whose optional dependencies are not installed (the lm-evaluation-harness
    model needs lm-eval); the message names the pip extra that installs them."""


class TargetExistsError(GemmaError, FileExistsError):
    """A save or export target that already exists; nothing is overwritten unless asked
    (`overwrite=True` in Python, `--overwrite` on the command line)."""


# The same mistake is fixed differently from Python and from the shell ("pass overwrite=True"
# vs "add --overwrite"); the command line switches the hints once at start-up, so messages
# built deep inside the library name what the person in front of them can actually type.
_HINTS = {
    "overwrite": ("pass overwrite=True", "add --overwrite"),
    "list_presets": ("gk.list_presets() shows the built-in presets",
                     "`gemma-keras presets` shows the built-in presets"),
}
_interface = {"cli": False}


def use_cli_hints(enabled: bool = True) -> None:
    """Called by `gemma-keras` at start-up: error hints then name command-line flags."""
    _interface["cli"] = enabled


def hint(name: str) -> str:
    """The hint `name` ("overwrite", "list_presets") for the current interface."""
    python, cli = _HINTS[name]
    return cli if _interface["cli"] else python


class SpeculationWarning(UserWarning):
    """Speculative decoding (`generate(draft=...)`) kept too few drafts to pay for them."""
