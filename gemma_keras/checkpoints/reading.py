"""Reading the JSON files of a checkpoint directory. They come from elsewhere (a download, a
user's folder), so a missing, truncated or malformed file is a CheckpointError that names it,
never a bare KeyError or JSONDecodeError from deep inside a loader."""

from __future__ import annotations

import json
import os
import pathlib
import warnings
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
    ../../blobs; `refuse_outside_links` has checked where every link leads.)"""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name
            or name != pathlib.PurePath(name).name):
        raise CheckpointError(
            f"{index} lists {name!r} as a weights file; an index may only name files in its "
            "own directory (refused: it is not read).")
    return directory / name


# A checkpoint directory holds tens of files; a walk past this many entries is not one.
_MAX_ENTRIES = 10_000


def refuse_outside_links(directory: pathlib.Path) -> pathlib.Path:
    """`directory`, after checking that no link in it (a file or a subdirectory, at any depth)
    leads outside it: a downloaded preset with `model.safetensors -> /home/me/.ssh/id_rsa` or
    `assets -> /` would otherwise have a loader read, and an error message quote, what it
    points at. Links are not followed by the walk; each is resolved and must land inside
    `directory`, or, for a snapshot of the Hugging Face cache (`<repo>/snapshots/<revision>`,
    whose every file links to `../../blobs/<hash>`), in that repository's `blobs`.
    Raises CheckpointError naming the first link that leads out (nothing was read)."""
    root = pathlib.Path(directory).resolve()
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    seen = 0
    for where, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            seen += 1
            if seen > _MAX_ENTRIES:
                raise CheckpointError(
                    f"{directory} holds more than {_MAX_ENTRIES} files and folders: it is not a "
                    "checkpoint directory (refused: nothing was read).")
            path = pathlib.Path(where) / name
            if not path.is_symlink():
                continue
            target = path.resolve()
            if not any(target == base or base in target.parents for base in allowed):
                raise CheckpointError(
                    f"{path} links to {target}, outside the checkpoint directory {directory} "
                    "(refused: nothing was read). A checkpoint may only hold its own files; "
                    "copy the file in if you trust it.")
    return directory


def warn_image_tower_unread(directory) -> None:
    """Said once per load of a multimodal Gemma 3 (either format): only its text model is
    read until images are supported."""
    warnings.warn(f"{directory} is a multimodal Gemma 3: its text model is loaded, its image "
                  "tower is not read (gemma_keras does not take images yet).", stacklevel=3)
