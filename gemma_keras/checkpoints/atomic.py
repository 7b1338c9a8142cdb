"""Atomic writes for every save and export.

The one overwrite policy of gemma_keras lives here: every save and export (save_to_preset,
save_lora_weights, export, and the command line's finetune / convert / export) refuses a target
that exists unless asked to replace it (`overwrite=True`, `--overwrite`), and then replaces it
atomically: written under a temporary name in the same directory, then renamed over it.
Callers run `check_target` before any expensive work, and the writers check again at the
rename, so a target that appeared meanwhile is not clobbered either.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile

from gemma_keras import errors
from gemma_keras.errors import CheckpointError, TargetExistsError


def _default_mode(kind: int) -> int:
    """Permissions a plain open()/mkdir() would give (0o666 / 0o777 less the umask):
    mkstemp and mkdtemp make private 0600 / 0700 entries, which would make every saved
    preset unreadable to anyone else sharing it."""
    mask = os.umask(0)
    os.umask(mask)
    return kind & ~mask


def check_target(target, overwrite: bool = False, directory: bool = False) -> pathlib.Path:
    """The absolute target path; raises TargetExistsError when it exists and `overwrite` is
    false, CheckpointError when it exists as the wrong kind (a file where a directory goes,
    or the reverse), which even overwrite=True does not replace."""
    target = pathlib.Path(target).expanduser().absolute()
    if not (target.exists() or target.is_symlink()):
        return target
    if directory and not target.is_dir():
        raise CheckpointError(f"Cannot save to {target}: it exists and is not a directory.")
    if not directory and target.is_dir():
        raise CheckpointError(f"Cannot save to {target}: it is a directory; give a file path.")
    if not overwrite:
        raise TargetExistsError(f"{target} already exists; {errors.hint('overwrite')} to "
                                "replace it (nothing was written).")
    return target


@contextlib.contextmanager
def atomic_file(target, overwrite: bool = False):
    """Yields a temporary path next to `target`; on success it is renamed to `target`, so an
    interrupted write leaves `target` as it was. An existing `target` is refused unless
    `overwrite` (see `check_target`)."""
    target = check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(handle)
    os.chmod(tmp, _default_mode(0o666))
    try:
        yield pathlib.Path(tmp)
        check_target(target, overwrite)  # it may have appeared while we were writing
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_directory(target, overwrite: bool = False):
    """Yields an empty temporary directory next to `target`; on success it replaces `target`.

    A crash or an exception part-way leaves `target` as it was (absent, or the old version),
    never half-written. An existing `target` is refused unless `overwrite` (`check_target`).
    """
    target = check_target(target, overwrite, directory=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, _default_mode(0o777))
    try:
        yield tmp
        check_target(target, overwrite, directory=True)  # it may have appeared meanwhile
        if target.exists():
            # Two renames: the old preset stays whole until the new one is in place.
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
