"""The weight formats of quantized projections: how int4 weights are laid out in memory, and
the conversions to and from Keras' own layout. NumPy only; the products that read these
weights are the backends' (`backends.get().int8_linear / int4_linear`).

int8 is Keras' per-output-channel format unchanged: kernel int8 [out, in], `kernel_scale`
with dequantized = kernel / scale.

int4 is grouped along the input axis with a zero point, numerically Keras' grouped int4
(`Int4QuantizationConfig(block_size=G)`: q = round(w / scale) + zero in [-8, 7], dequantized
(q - zero) * scale, scale = (max - min) / 15 per group), stored for a matrix-vector product:

    kernel  int8 [out, in / 2]  byte [o, j] = q[o, 2j] in the low nibble, q[o, 2j + 1] in
                                the high one (two's complement nibbles; Keras' pack_int4
                                along the input axis)
    kernel_scale  float32 [out, in / G]
    kernel_zero   int8    [out, in / G]

That is exactly how Keras stores a grouped int4 Embedding table ([vocab, hidden / 2], scale
and zero [vocab, groups]), so the tied output head reads Keras' own table with the same
product. Keras' EinsumDense stores [in, out / 2] instead (neighbouring *outputs* share a
byte); XLA fuses the unpacking and scaling into the product only when each output's inputs
are read contiguously and both nibbles of a byte meet the same output. Measured on 8 x
[4096, 1024] weights, batch-1 product under jax.jit: Keras' EinsumDense layout 72-120 ms
(the float kernel is materialised every call), this one 5.3-5.9 ms (float32 weights: 6-8 ms):
the even and the odd inputs are each one fused dot. Needs in % G == 0 and G even
(`int4_group` picks the group a projection uses).
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_BLOCK_SIZE = 128


def int4_layout_fits(in_features: int, block_size) -> bool:
    """Whether a [*, in_features] table can take this layout with groups of block_size."""
    return (block_size is not None and block_size > 0 and block_size % 2 == 0
            and in_features % block_size == 0)


def int4_group(in_features: int, block_size):
    """The group size a projection with `in_features` inputs uses for `block_size` (None or
    -1: one group per output channel): block_size where it divides the width, else the
    largest group that does (gcd), so every projection takes this layout; None only for an
    odd width or group (then Keras' own int4). Keras' own int4 is not a fallback worth
    having for our [out, in] kernels: its EinsumDense flattens the kernel to [in, out] by a
    reshape, not a transpose, so its scales would mix different outputs' weights."""
    if block_size is None or block_size <= 0 or block_size >= in_features:
        group = in_features
    else:
        group = math.gcd(in_features, block_size)
    return group if group % 2 == 0 else None


def quantize_int4(kernel, block_size):
    """kernel float [out, in] -> (packed int8 [out, in/2], scale float32 [out, groups],
    zero int8 [out, groups]); the same integers, scales and zeros as Keras' grouped int4 of
    the [in, out] kernel (Keras' own quantizer does the rounding)."""
    from keras import ops, quantizers

    kernel = np.asarray(kernel, dtype=np.float32)
    q, scale, zero = quantizers.abs_max_quantize_grouped_with_zero_point(
        kernel.T, block_size=block_size, to_numpy=True)  # [in, out], [groups, out] x 2
    q = np.asarray(ops.convert_to_numpy(q), np.int8).T  # [out, in]
    return (pack_int4(q), np.ascontiguousarray(np.asarray(ops.convert_to_numpy(scale)).T,
                                               np.float32),
            np.ascontiguousarray(np.asarray(ops.convert_to_numpy(zero), np.int8).T))


def pack_int4(q):
    """int8 values in [-8, 7], [out, in] -> packed int8 [out, in/2] (layout above)."""
    q = np.asarray(q, np.int8)
    low = q[..., 0::2].view(np.uint8) & 0x0F
    high = q[..., 1::2].view(np.uint8) << 4
    return (low | high).view(np.int8)


def unpack_int4(packed):
    """packed int8 [out, in/2] -> int8 values [out, in]."""
    packed = np.asarray(packed, np.int8)
    low = np.left_shift(packed, 4) >> 4  # arithmetic shifts keep the sign
    high = packed >> 4
    return np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], -1)


def dequantize_int4(packed, scale, zero):
    """The float32 kernel [out, in] the int4 weights stand for."""
    q = unpack_int4(packed).astype(np.float32)
    out, groups = np.shape(scale)
    q = q.reshape(out, groups, -1)
    return ((q - np.asarray(zero, np.float32)[..., None])
            * np.asarray(scale, np.float32)[..., None]).reshape(out, -1)


def to_keras_int4(packed, scale, zero):
    """Our int4 arrays -> Keras EinsumDense's grouped int4 arrays for the same kernel taken
    as [in, out]: (kernel int8 [in, ceil(out/2)] packed along out, scale [groups, out],
    zero int8 [groups, out])."""
    from keras import quantizers

    q = unpack_int4(packed).T  # [in, out]
    keras_packed, _, _ = quantizers.pack_int4(q, axis=-1)
    return (np.asarray(keras_packed, np.int8), np.ascontiguousarray(np.asarray(scale).T),
            np.ascontiguousarray(np.asarray(zero, np.int8).T))


def from_keras_int4(keras_kernel, scale, zero, out_features):
    """The inverse of `to_keras_int4`."""
    from keras import ops, quantizers

    q = quantizers.unpack_int4(keras_kernel, out_features, axis=-1, dtype="int8")
    q = np.asarray(ops.convert_to_numpy(q), np.int8).T  # [out, in]
    return (pack_int4(q), np.ascontiguousarray(np.asarray(scale, np.float32).T),
            np.ascontiguousarray(np.asarray(zero, np.int8).T))
