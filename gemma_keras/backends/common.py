"""The keras.ops versions of the backend functions (see gemma_keras/backends/__init__.py):
what a backend module uses where it has nothing faster."""

from __future__ import annotations

import keras

loops_compile = False  # compile_step below does not compile at all


def host_array_to_tensor(array, layout=None):
    return array


def linear(x, kernel):
    """x [..., in] times kernel [out, in] transposed: [..., out]."""
    return keras.ops.einsum("...d,fd->...f", x, keras.ops.convert_to_tensor(kernel))


def write_slot(buffer, update, slot):
    """`buffer` [batch, slots, ...] with `update` [batch, 1, ...] written at `slot` (a scalar
    int tensor) on axis 1: a new tensor. On JAX and TensorFlow slice_update is exactly this,
    one dynamic-update-slice."""
    index = [0, slot] + [0] * (len(buffer.shape) - 2)
    return keras.ops.slice_update(buffer, index, keras.ops.cast(update, buffer.dtype))


def compile_step(model, fn, donate_argnums=()):
    return fn


def remat(fn):
    return keras.remat(fn)


def shard_cache(cache):
    return cache
