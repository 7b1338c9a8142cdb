"""Reading the JSON files of a checkpoint directory. They come from elsewhere (a download, a
user's folder), so a missing, truncated or malformed file is a CheckpointError that names it,
never a bare KeyError or JSONDecodeError from deep inside a loader."""

from __future__ import annotations

import json
import pathlib

from gemma_keras.errors import CheckpointError


def read_json(path) -> dict:
    """The JSON object in `path`; CheckpointError when it is missing, not JSON, or not an
    object."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist.") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the file is truncated or "
                              "corrupt.") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} should hold a JSON object, found {type(value).__name__}.")
    return value
