"""Which Keras backend to run on, settled before Keras is imported.

Keras reads its backend once, at import: `KERAS_BACKEND`, else the `backend` of
`$KERAS_HOME/keras.json` (default `~/.keras/keras.json`), else TensorFlow. Keras writes that
file itself on first import, with TensorFlow in it whatever backend was used, so a user who
installed only `gemma-keras[jax]` would otherwise get `No module named 'tensorflow'` from deep
inside Keras. The rules here:

- A backend the user chose explicitly (`KERAS_BACKEND`, or `--backend` on the command line,
  which sets it) must be installed and one gemma_keras runs on; otherwise one `BackendError`
  line names the pip extra to install.
- Otherwise keras.json's backend (Keras' default, tensorflow, when there is none) is used when
  installed. When it is not, keras.json is taken as Keras' default rather than a choice (Keras
  wrote it), and the first installed of jax, torch, tensorflow is used, said once on stderr.

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
_KERAS_DEFAULT = "tensorflow"
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


def _keras_json_backend() -> Optional[str]:
    try:
        with open(keras_json_path(), encoding="utf-8") as f:
            value = json.load(f).get("backend")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


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


def ensure_backend(explicit: Optional[str] = None, source: str = "--backend") -> str:
    """Settles the backend before Keras is imported and returns its name.

    explicit: a backend the caller chose (the CLI's --backend); otherwise KERAS_BACKEND or
    keras.json decide as described above. Raises BackendError for an explicit choice that
    cannot run. Sets KERAS_BACKEND when falling back, so Keras (and child processes) agree.
    """
    if explicit:
        backend = _check_explicit(explicit, source)
        os.environ["KERAS_BACKEND"] = backend
        return backend
    if "keras" in sys.modules:
        # Keras is imported already (the user imported it first): its backend is settled, and
        # it imported, so it is installed.
        return _settled["backend"] or os.environ.get("KERAS_BACKEND") or "keras"
    if _settled["backend"] is not None:
        return _settled["backend"]
    chosen = os.environ.get("KERAS_BACKEND")
    if chosen:  # Keras ignores an empty KERAS_BACKEND, and so do we
        _settled["backend"] = _check_explicit(chosen, "KERAS_BACKEND")
        return _settled["backend"]
    written = _keras_json_backend()
    configured = written or _KERAS_DEFAULT
    if configured in SUPPORTED and is_installed(configured):
        _settled["backend"] = configured
        return configured
    installed = installed_backends()
    if not installed:
        raise BackendError(f"No Keras backend is installed: {_extra('jax')} (or [torch], "
                           "[tensorflow]).")
    backend = installed[0]
    os.environ["KERAS_BACKEND"] = backend
    _settled["backend"] = backend
    why = (f"{keras_json_path()} names {configured!r}, which is" if written
           else f"Keras' default, {configured!r}, is")
    print(f"gemma_keras: using the {backend} backend ({why} not installed); choose one with "
          f"KERAS_BACKEND=jax|torch|tensorflow or `gemma-keras --backend ...`.", file=sys.stderr)
    return backend
