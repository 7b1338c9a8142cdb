"""Progress bars for long checkpoint reads and writes, shown only when asked (the command
line asks; library calls stay quiet). Readers and writers report one step per tensor."""

from __future__ import annotations

import contextlib

_SHOWN = [False]
_BAR = [None]


@contextlib.contextmanager
def shown():
    """Within this block, checkpoint reads and writes draw a Keras progress bar."""
    previous, _SHOWN[0] = _SHOWN[0], True
    try:
        yield
    finally:
        _SHOWN[0], _BAR[0] = previous, None


def start(label: str, tensors: int) -> None:
    """A new bar of `tensors` steps (when shown)."""
    if not _SHOWN[0]:
        return
    import keras

    print(label, flush=True)
    _BAR[0] = keras.utils.Progbar(tensors, unit_name="tensor")


def step() -> None:
    if _BAR[0] is not None:
        _BAR[0].add(1)
