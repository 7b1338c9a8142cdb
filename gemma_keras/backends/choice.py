"""Which Keras backend to run on, settled before Keras is imported, and kept.

Keras reads its backend once, at import: `KERAS_BACKEND`, else the `backend` of
`$KERAS_HOME/keras.json` (default `~/.keras/keras.json`), else TensorFlow. On its first import
Keras writes that file itself, with TensorFlow in it whatever backend the process used. So a
user who installed only `gemma-keras[torch]` would get `No module named 'tensorflow'` from deep
inside Keras, and one who later installed TensorFlow (to export) would silently move to it:
the file names a backend nobody chose. The rules here:

- A backend chosen explicitly (`KERAS_BACKEND`, or `--backend` on the command line, which sets
  it) wins. It must be installed and one gemma_keras runs on; otherwise one `BackendError`
  line names the pip extra to install (at the first use of a name that needs Keras).
- Otherwise keras.json's backend (Keras' default, tensorflow, when it names none) is used
  when it is installed.
- When there is no keras.json yet, nobody has chosen: the first installed of jax, torch,
  tensorflow is used and recorded in a new keras.json, the file Keras itself reads, before
  Keras writes TensorFlow there. A plain `import keras`, and every later run (after another
  backend is installed too), keep it. That is said once on stderr, on the run that records it.
  A run on an explicit choice with no keras.json yet records that choice, silently (as Keras
  writes the file silently), for the same reason.
- A keras.json that exists is never rewritten, even when it names a backend that is not
  installed: it is the user's one file for every Python environment, and one where that
  backend is installed runs on it. The process falls back as above for this run only (by
  KERAS_BACKEND) and says so on each run, with how to choose for good.

`install_import_hook()` (called by `import gemma_keras`) makes these rules apply to the user's
own `import keras` too: it settles the backend the moment Keras is first looked up, not
earlier, so `import gemma_keras` itself stays cheap, writes nothing, raises nothing, and the
CLI's `--backend` (parsed after `import gemma_keras`) is still an explicit choice. When Keras
was imported before gemma_keras, Keras alone settled its backend; nothing can change it.

Nothing here imports Keras or a backend: installation is checked with `find_spec`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from typing import Optional

from gemma_keras.errors import BackendError

SUPPORTED = ("jax", "torch", "tensorflow")  # also the order of preference for a fallback
# The import names that make a backend usable (jax needs its compiled half, jaxlib).
_MODULES = {"jax": ("jax", "jaxlib"), "torch": ("torch",), "tensorflow": ("tensorflow",)}
# What Keras itself writes into a new keras.json, in its order (keras/src/backend/config.py):
# the file we write must read the same to Keras, which validates these.
_KERAS_JSON_DEFAULTS = {"floatx": "float32", "epsilon": 1e-07, "backend": None,
                        "image_data_format": "channels_last"}
_KERAS_DEFAULT = "tensorflow"  # Keras' own when neither KERAS_BACKEND nor keras.json names one
_settled = {"backend": None}


def is_installed(backend: str) -> bool:
    try:
        return all(importlib.util.find_spec(name) is not None for name in _MODULES[backend])
    except (ImportError, ValueError):  # a broken or half-removed install
        return False


def installed_backends() -> list:
    return [name for name in SUPPORTED if is_installed(name)]


def _extra(backend: str) -> str:
    return f'pip install "gemma-keras[{backend}]"'


def keras_json_path() -> str:
    """Where Keras reads keras.json (its own rule: $KERAS_HOME, else ~/.keras, or /tmp/.keras
    when the home directory is not writable)."""
    if "KERAS_HOME" in os.environ:
        directory = os.environ["KERAS_HOME"]
    else:
        base = os.path.expanduser("~")
        if not os.access(base, os.W_OK):
            base = "/tmp"
        directory = os.path.join(base, ".keras")
    return os.path.expanduser(os.path.join(directory, "keras.json"))


def _read_keras_json(path: str):
    """keras.json as a dict ({} when unreadable, which Keras too reads as {}), or None when
    there is no file."""
    if not os.path.exists(path):  # Keras' own test (a KERAS_HOME that is a file: none)
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _record(path: str, backend: str) -> bool:
    """Writes a new keras.json naming `backend`, with the other keys Keras writes, before Keras
    writes its own. Atomic (written beside it, then renamed), so Keras in another process never
    reads half a file. False when it cannot be written (a read-only home), silently: the
    caller then sets KERAS_BACKEND for this process only."""
    content = {**_KERAS_JSON_DEFAULTS, "backend": backend}
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        # os.open's mode goes through the umask, as Keras' own open(path, "w") does.
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(content, indent=4))
        os.replace(temporary, path)
    except OSError:
        try:
            os.remove(temporary)
        except OSError:
            pass
        return False
    return True


def _check_explicit(backend: str, source: str) -> str:
    installed = installed_backends()
    if backend not in SUPPORTED:
        have = (f"installed here: {', '.join(installed)}" if installed
                else f"none is installed: {_extra('jax')}")
        raise BackendError(f"{source}={backend!r} is not a backend gemma_keras runs on; choose "
                           f"jax, torch or tensorflow ({have}).")
    if not is_installed(backend):
        others = (f", or choose an installed one ({', '.join(installed)})" if installed else "")
        raise BackendError(f"{source}={backend!r} but {backend} is not installed: "
                           f"{_extra(backend)}{others}.")
    return backend


def _keep_explicit(backend: str) -> None:
    """An explicit choice that can run, recorded when there is no keras.json yet, so that
    Keras does not write TensorFlow there for a process that ran on `backend`."""
    path = keras_json_path()
    if _read_keras_json(path) is None:
        _record(path, backend)


def _settle(strict: bool) -> Optional[str]:
    """The backend of this process, settled (once) before Keras is imported.

    strict: raise BackendError when the choice cannot run (the first use of a gemma_keras
    name); otherwise (Keras being imported by someone else) leave it to Keras, and None."""
    if _settled["backend"] is not None:
        return _settled["backend"]
    chosen = os.environ.get("KERAS_BACKEND")
    if chosen:  # Keras ignores an empty KERAS_BACKEND, and so do we
        try:
            backend = _check_explicit(chosen, "KERAS_BACKEND")
        except BackendError:
            if strict:
                raise
            return None
        _keep_explicit(backend)
        _settled["backend"] = backend
        return backend
    path = keras_json_path()
    config = _read_keras_json(path)
    configured = (config or {}).get("backend") or _KERAS_DEFAULT
    if config is not None and configured in SUPPORTED and is_installed(configured):
        _settled["backend"] = configured
        return configured
    installed = installed_backends()
    if not installed:
        if strict:
            raise BackendError(f"No Keras backend is installed: {_extra('jax')} (or [torch], "
                               "[tensorflow]).")
        return None
    backend = installed[0]
    _settled["backend"] = backend
    how = "KERAS_BACKEND=jax|torch|tensorflow or `gemma-keras --backend ...`"
    if config is None and _record(path, backend):
        print(f"gemma_keras: using the {backend} backend, the first installed of jax, torch, "
              f"tensorflow (no backend was chosen), and keeping it: recorded in {path}. "
              f"Choose another with {how} for a run, or for good by editing that file.",
              file=sys.stderr)
        return backend
    # Not recorded (the user's keras.json, or a home that cannot be written): this run only.
    os.environ["KERAS_BACKEND"] = backend
    keep = "or for good by editing that file"
    if config is None:
        why = f"no backend was chosen, and {path} cannot be written"
        keep = "or for good by pointing KERAS_HOME at a folder that can be written"
    elif not config.get("backend"):
        why = f"{path} names none, and Keras' default, {configured}, is not installed here"
    elif configured in SUPPORTED:
        why = f"{path} names {configured!r}, which is not installed here"
    else:
        why = f"{path} names {configured!r}, which gemma_keras does not run on"
    print(f"gemma_keras: using the {backend} backend ({why}); choose one with {how}, {keep}.",
          file=sys.stderr)
    return backend


def ensure_backend(explicit: Optional[str] = None, source: str = "--backend") -> str:
    """Settles the backend before Keras is imported and returns its name.

    explicit: a backend the caller chose (the CLI's --backend), which wins over everything;
    otherwise KERAS_BACKEND or keras.json decide as described above. Raises BackendError for
    a choice that cannot run.
    """
    if explicit:
        backend = _check_explicit(explicit, source)
        os.environ["KERAS_BACKEND"] = backend
        if "keras" not in sys.modules:
            _keep_explicit(backend)
        _settled["backend"] = backend
        return backend
    if "keras" in sys.modules:
        # Keras is imported already (the user imported it first): its backend is settled, and
        # it imported, so it is installed.
        return _settled["backend"] or os.environ.get("KERAS_BACKEND") or "keras"
    return _settle(strict=True)


class _SettleBeforeKeras:
    """A sys.meta_path entry that settles the backend when Keras is first looked up (by the
    user's `import keras`, or a library's), and finds nothing itself. It stays in place after
    that: removing it from the list the import system is iterating would skip the next
    finder, and once Keras is in sys.modules it is never asked about "keras" again."""

    def find_spec(self, name, path=None, target=None):
        if name == "keras" and "keras" not in sys.modules:
            try:
                _settle(strict=False)
            except Exception:  # noqa: BLE001 - never break the user's import over this
                pass
        return None


_HOOK = _SettleBeforeKeras()


def install_import_hook() -> None:
    """Called by `import gemma_keras`: the rules above then apply to a later `import keras` in
    the same process. Nothing to do when Keras is imported already. Cheap: no file is read
    until Keras is looked up."""
    if "keras" not in sys.modules and not any(f is _HOOK for f in sys.meta_path):
        sys.meta_path.insert(0, _HOOK)
