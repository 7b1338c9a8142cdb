"""The keras.ops versions of the backend functions (see gemma_keras/backends/__init__.py):
what a backend module uses where it has nothing faster."""

from __future__ import annotations

import keras

loops_compile = False  # compile_step below does not compile at all


def narrow_products_pay():
    """Whether int8 / int4 weights make a batch-1 product faster than float32 ones here
    (speculative self-drafting from them pays only then). keras.ops' products below widen
    the weights to x's dtype first."""
    return False


def host_array_to_tensor(array, layout=None):
    return array


def linear(x, kernel, out_dtype=None):
    """x [..., in] times kernel [out, in] transposed: [..., out], in x's dtype or `out_dtype`
    (a wider result for narrow operands: layers/precision.py). Here by widening the operands,
    which costs a copy of the kernel; the backends that can, run the narrow product with a
    wide result instead."""
    kernel = keras.ops.convert_to_tensor(kernel)
    if out_dtype is not None and out_dtype != x.dtype:
        x, kernel = keras.ops.cast(x, out_dtype), keras.ops.cast(kernel, out_dtype)
    return keras.ops.einsum("...d,fd->...f", x, kernel)


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


def int8_linear(x, kernel, scale, out_dtype=None):
    """x [..., in] times the int8 kernel [out, in] (per output channel, dequantized
    kernel / scale) transposed: [..., out] in x's dtype (or `out_dtype`, as `linear`).
    Weight-only: x stays in its dtype.

    The integer kernel is converted inside the product, which XLA fuses into the dot's
    operand read: the weights are read as int8 and no float copy is written (measured on 8 x
    [4096, 1024] weights under jax.jit, batch 1: 1.6-2.9 ms vs float32's 6-8 ms). Keras'
    own int8 forward quantizes x per token and runs an int8 x int8 -> int32 product, which
    XLA's CPU backend runs slower than the float one (bench model decode 16 vs 34 tok/s)."""
    from gemma_keras import backends

    scale = keras.ops.reshape(keras.ops.convert_to_tensor(scale), (-1,))  # [out]
    kernel = keras.ops.cast(keras.ops.convert_to_tensor(kernel), x.dtype)
    y = backends.get().linear(x, kernel, out_dtype)
    return y / keras.ops.cast(scale, y.dtype)


def int4_linear(x, kernel, scale, zero, out_dtype=None):
    """x [..., in] times the int4 kernel of gemma_keras.quantization (packed [out, in/2],
    scale and zero [out, groups]) transposed: [..., out] in x's dtype (or `out_dtype`, as
    `linear`).

    Written so that XLA fuses unpacking, zero and scale into each half's dot (see
    gemma_keras/quantization.py for the layout and the measurement)."""
    from gemma_keras import backends

    ops = keras.ops
    kernel, scale, zero = (ops.convert_to_tensor(t) for t in (kernel, scale, zero))
    out, half = kernel.shape
    groups = scale.shape[-1]
    low, high = int4_nibbles(kernel)  # int8 [out, in/2] each: even and odd inputs
    scale = ops.cast(scale, x.dtype)[..., None]  # [out, groups, 1]
    zero = ops.cast(zero, x.dtype)[..., None]
    linear = backends.get().linear
    y = None
    for parity, q in enumerate((low, high)):
        q = ops.reshape(ops.cast(q, x.dtype), (out, groups, -1))  # [out, groups, G/2]
        w = ops.reshape((q - zero) * scale, (out, half))  # [out, in/2]
        term = linear(x[..., parity::2], w, out_dtype)
        y = term if y is None else y + term
    return y


def int4_nibbles(packed):
    """Packed int4 (gemma_keras.quantization's layout, [..., n/2] int8) -> (values of the
    even columns, values of the odd columns), int8 [..., n/2] each; arithmetic shifts keep
    the sign."""
    ops = keras.ops
    return ops.right_shift(ops.left_shift(packed, 4), 4), ops.right_shift(packed, 4)
