"""Turn what a user passes to `from_preset` into a local checkpoint directory.

Accepted: an existing directory, a built-in preset name, `kaggle://owner/model/framework/
variation[/version]` and `hf://org/repo[@revision]`. Hub failures become gemma_keras errors that
say what to do: a refused download (Gemma is gated) explains the license and credentials, any
other failure points at loading from a local directory instead.
"""

from __future__ import annotations

import difflib
import os
import pathlib
import re
from typing import Optional, Union

from gemma_keras import errors
from gemma_keras.checkpoints import reading
from gemma_keras.errors import CheckpointError, PresetAccessError, UnknownPresetError
from gemma_keras.presets import (DEMO_PRESET, HF_SCHEME, KAGGLE_SCHEME, card_for_handle,
                                 did_you_mean, get_preset_card, list_presets, loose)

# What the Hugging Face reader needs; skips the large duplicate formats some repos also hold
# (*.gguf, original PyTorch *.bin, Flax weights).
HF_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]

_KAGGLE_CREDENTIALS = "set KAGGLE_USERNAME and KAGGLE_KEY, or put them in ~/.kaggle/kaggle.json"
_HF_CREDENTIALS = "set HF_TOKEN, or run `huggingface-cli login`"
_HF_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
# `generate(draft=...)`'s strings that name no checkpoint (generation/drafting.py: the prompt
# lookup drafter, and the model's own weights quantized); any other string is a preset.
DRAFT_KINDS = ("prompt_lookup", "int4", "int8")


def demo_preset_directory() -> pathlib.Path:
    """The installed directory of the bundled `gemma_demo` preset."""
    from importlib import resources

    directory = pathlib.Path(str(resources.files("gemma_keras.preset_cards") / DEMO_PRESET))
    if not (directory / "config.json").is_file():
        raise CheckpointError(
            f"The bundled demo preset is missing from {directory}: reinstall gemma_keras, or "
            f"rebuild it with `python scripts/train_demo_preset.py`.")
    return directory


def resolve_preset(handle: Union[str, os.PathLike]) -> pathlib.Path:
    """Return the local directory holding the checkpoint `handle` names, downloading if needed.
    A directory with a link leading outside it is refused (`reading.refuse_outside_links`)."""
    kind, value = _locate(handle)
    if kind == "local":
        directory = value
    elif kind == "demo":
        directory = demo_preset_directory()
    elif kind == "kaggle":
        directory = _download_kaggle(value)
    else:
        directory = _download_hf(value)
    return reading.refuse_outside_links(directory)


def is_local(handle: Union[str, os.PathLike]) -> bool:
    """Whether `resolve_preset` takes `handle` as a local directory (a path, or a name that
    an existing directory has), not as a preset name or a hub handle."""
    return _locate(handle)[0] == "local"


def check_preset(handle: Union[str, os.PathLike]) -> None:
    """Raises what `resolve_preset` would for a mistyped name, a malformed handle or a missing
    directory, without downloading or importing Keras: the command line calls it before
    loading a backend, so a typo costs milliseconds, not seconds."""
    _locate(handle)


def _locate(handle):
    """("local", directory), ("demo", None), ("kaggle", owner/model/framework/variation[/v])
    or ("hf", org/repo[@revision]); raises for anything else."""
    if not isinstance(handle, str):
        return "local", _local_directory(os.fspath(handle))
    if handle.startswith(KAGGLE_SCHEME):
        return "kaggle", _check_kaggle_handle(handle[len(KAGGLE_SCHEME):])
    if handle.startswith(HF_SCHEME):
        return "hf", _check_hf_handle(handle[len(HF_SCHEME):])
    if os.path.isdir(os.path.expanduser(handle)) or _looks_like_path(handle):
        return "local", _local_directory(handle)
    if handle == DEMO_PRESET:
        return "demo", None
    if handle in list_presets():
        return "kaggle", get_preset_card(handle).kaggle_handle[len(KAGGLE_SCHEME):]
    raise UnknownPresetError(
        f"{handle!r} is not a built-in preset, a kaggle:// or hf:// handle, or an existing "
        f"directory.{did_you_mean(handle)} {_where_presets_are()}")


def _where_presets_are() -> str:
    return f"{errors.hint('list_presets')}; {DEMO_PRESET!r} is the bundled demo."


def check_draft(draft: str) -> None:
    """Raises for a `generate(draft=...)` string that is neither a drafter kind (DRAFT_KINDS)
    nor a checkpoint `resolve_preset` takes, naming the kinds and what it was nearest to.
    Imports no Keras (as `check_preset`)."""
    if draft in DRAFT_KINDS:
        return
    try:
        _locate(draft)
    except UnknownPresetError:
        if draft.startswith((KAGGLE_SCHEME, HF_SCHEME)):
            raise  # a malformed handle: its own message says how handles are written
        kinds = {loose(kind): kind for kind in DRAFT_KINDS}
        close = difflib.get_close_matches(loose(draft), list(kinds), n=1)
        hint = f" Did you mean draft={kinds[close[0]]!r}?" if close else did_you_mean(draft)
        raise UnknownPresetError(
            f"draft={draft!r} is not a drafter: draft takes 'prompt_lookup' (drafts copied "
            f"from the prompt), 'int4' or 'int8' (the model's own weights, quantized), or a "
            f"smaller model with the same tokenizer (a built-in preset, a kaggle:// or hf:// "
            f"handle, a directory, or a GemmaCausalLM).{hint} {_where_presets_are()}"
        ) from None


def _hub_hint(path: str) -> str:
    """For a missing `owner/name` directory, which is also how a Hugging Face repo is named:
    the hf:// handle that downloads it (and the built-in preset of the same model)."""
    if not isinstance(path, str) or path.startswith((".", "~", "/")) or not (
            _HF_REPO_ID.fullmatch(path)):
        return ""
    preset = card_for_handle(HF_SCHEME + path)
    same = f", or the built-in preset {preset.name}" if preset is not None else ""
    return f" For the Hugging Face repo {path}, pass {HF_SCHEME}{path}{same}."


def _looks_like_path(handle: str) -> bool:
    separators = [sep for sep in (os.sep, os.altsep) if sep]
    return handle.startswith((".", "~", "/")) or any(sep in handle for sep in separators)


def _local_directory(path: str) -> pathlib.Path:
    directory = pathlib.Path(path).expanduser()
    if not directory.exists():
        from gemma_keras.checkpoints.atomic import interrupted_save

        old = interrupted_save(directory)
        if old is not None:  # a save killed between its two renames (see atomic.py)
            raise CheckpointError(
                f"{path}: no such directory; an interrupted save left its previous version "
                f"at {old}. Rename that back to {path} (saving to {path} again also puts it "
                "back first).")
        raise CheckpointError(f"{path}: no such directory.{_hub_hint(path)}")
    if not directory.is_dir():
        raise CheckpointError(f"{path}: is a file; from_preset takes a checkpoint directory.")
    return directory


# ---- Kaggle ------------------------------------------------------------------------------------
def _check_kaggle_handle(handle: str) -> str:
    parts = handle.split("/")
    versioned = len(parts) == 5
    if len(parts) not in (4, 5) or not all(parts) or (versioned and not parts[4].isdigit()):
        raise UnknownPresetError(
            f"{KAGGLE_SCHEME}{handle} is not a Kaggle model handle; expected "
            f"{KAGGLE_SCHEME}owner/model/framework/variation[/version], e.g. "
            f"{get_preset_card('gemma_2b_en').kaggle_handle}.")
    return handle


def _download_kaggle(handle: str) -> pathlib.Path:
    """`handle` is `owner/model/framework/variation[/version]`, without the scheme."""
    parts = _check_kaggle_handle(handle).split("/")
    # Imported here, and the function looked up on the module at call time, so that importing
    # gemma_keras stays light and tests can replace kagglehub.model_download.
    import kagglehub
    from kagglehub.exceptions import CredentialError, UnauthenticatedError

    model_page = f"https://www.kaggle.com/models/{parts[0]}/{parts[1]}"
    try:
        return pathlib.Path(kagglehub.model_download(handle))
    except (UnauthenticatedError, CredentialError) as error:
        raise _access_error(KAGGLE_SCHEME + handle, model_page, _KAGGLE_CREDENTIALS) from error
    except OSError as error:  # requests' errors, KaggleApiHTTPError among them, are OSErrors.
        raise _download_error(error, KAGGLE_SCHEME + handle, model_page,
                              _KAGGLE_CREDENTIALS) from error


# ---- Hugging Face ------------------------------------------------------------------------------
def _check_hf_handle(handle: str) -> str:
    repo_id = handle.partition("@")[0]
    if not _HF_REPO_ID.fullmatch(repo_id) or handle.endswith("@"):
        raise UnknownPresetError(
            f"{HF_SCHEME}{handle} is not a Hugging Face handle; expected "
            f"{HF_SCHEME}org/repo[@revision], e.g. {HF_SCHEME}google/gemma-2-2b.")
    return handle


def _download_hf(handle: str) -> pathlib.Path:
    """`handle` is `org/repo[@revision]`, without the scheme."""
    repo_id, _, revision = _check_hf_handle(handle).partition("@")
    try:
        import huggingface_hub
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError as error:
        raise ImportError(
            f'Loading {HF_SCHEME}{handle} needs huggingface_hub: pip install "gemma-keras[hf]"'
        ) from error

    # huggingface_hub's HTTP errors derive from its HTTP client's base error (httpx's in 1.x,
    # which is not an OSError; requests' in 0.x, which is): catching it covers dropped
    # connections and timeouts in the middle of a download too.
    client_error = HfHubHTTPError.__bases__[0]
    model_page = f"https://huggingface.co/{repo_id}"
    try:
        path = huggingface_hub.snapshot_download(
            repo_id=repo_id, revision=revision or None, allow_patterns=HF_ALLOW_PATTERNS)
    except (OSError, client_error) as error:
        raise _download_error(error, HF_SCHEME + handle, model_page, _HF_CREDENTIALS) from error
    return pathlib.Path(path)


# ---- errors ------------------------------------------------------------------------------------
def _http_status(error: BaseException) -> Optional[int]:
    """The HTTP status of a requests or httpx error, None for errors without a response."""
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _access_error(handle: str, model_page: str, credentials: str) -> PresetAccessError:
    return PresetAccessError(
        f"Access to {handle} was refused. Gemma checkpoints are gated: accept the license on "
        f"the model page, {model_page}, with your account, and {credentials}.")


def _download_error(error: BaseException, handle: str, model_page: str,
                    credentials: str) -> Exception:
    status = _http_status(error)
    # The Hugging Face Hub answers 401 both for gated repos and for repos that do not exist,
    # so a 401 is reported as an access problem.
    if status in (401, 403):
        return _access_error(handle, model_page, credentials)
    if status == 404:
        return CheckpointError(f"{handle} was not found (HTTP 404); check the name and version.")
    return CheckpointError(
        f"Downloading {handle} failed ({type(error).__name__}: {error}). from_preset also "
        "takes a local directory holding a downloaded checkpoint.")
