"""Reading the JSON files of a checkpoint directory. They come from elsewhere (a download, a
user's folder), so a missing, truncated or malformed file is a CheckpointError that names it,
never a bare KeyError or JSONDecodeError from deep inside a loader."""

from __future__ import annotations

import json
import pathlib
from typing import Optional

from gemma_keras.errors import CheckpointError


def read_json(path) -> dict:
    """The JSON object in `path`; CheckpointError when it is missing, not JSON, or not an
    object."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist.") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text ({e}): the file is corrupt.") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the file is truncated or "
                              "corrupt.") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} should hold a JSON object, found {type(value).__name__}.")
    return value


def recorded_instruct(data: dict, path) -> Optional[bool]:
    """`data["gemma_keras"]["instruct"]`: whether the checkpoint whose JSON file `path` holds
    `data` is instruction-tuned, as gemma_keras's writers record it (keras-hub presets in
    metadata.json, Hugging Face checkpoints in config.json). None when it does not say."""
    ours = data.get("gemma_keras", {})
    if not isinstance(ours, dict):
        raise CheckpointError(f"{path}: 'gemma_keras' should hold a JSON object, found "
                              f"{ours!r}.")
    value = ours.get("instruct")
    if value is not None and not isinstance(value, bool):
        raise CheckpointError(f"{path}: gemma_keras.instruct is {value!r}; it must be true, "
                              "false or absent.")
    return value


def listed_file(directory: pathlib.Path, name, index: pathlib.Path) -> pathlib.Path:
    """The file an index (`index`, in `directory`) names: a bare file name of that directory.
    A path ('../x', 'sub/x', an absolute path) is refused, so an index never makes a loader
    read outside the checkpoint's directory, also not through a linked subdirectory. (A
    listed file may itself be a link: the Hugging Face cache links every snapshot file to
    ../../blobs.)"""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name
            or name != pathlib.PurePath(name).name):
        raise CheckpointError(
            f"{index} lists {name!r} as a weights file; an index may only name files in its "
            "own directory (refused: it is not read).")
    return directory / name
