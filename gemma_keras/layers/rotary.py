"""Rotary position embedding (RoPE) in the "rotate half" layout the Gemma checkpoints use."""

from keras import ops


def apply_rotary_embedding(x, positions, max_wavelength=10_000.0):
    """Rotates the feature pairs (i, i + head_dim/2) of `x` by position-dependent angles.

    x: [batch, seq, heads, head_dim]; positions: [batch, seq] integer positions.
    Positions and angles are float32 whatever x's dtype: in bfloat16, position 8190 rounds to
    8192, which corrupts long contexts (a bug seen in public implementations).
    """
    head_dim = x.shape[-1]
    half = head_dim // 2
    # [half] inverse frequencies 1 / wavelength^(2i / head_dim)
    exponents = ops.arange(half, dtype="float32") * (2.0 / head_dim)
    inverse_frequency = 1.0 / ops.power(ops.cast(max_wavelength, "float32"), exponents)
    # [batch, seq, half]
    angles = ops.cast(positions, "float32")[:, :, None] * inverse_frequency[None, None, :]
    # [batch, seq, 1, half]: broadcast over heads
    sin = ops.sin(angles)[:, :, None, :]
    cos = ops.cos(angles)[:, :, None, :]
    x32 = ops.cast(x, "float32")
    first, second = x32[..., :half], x32[..., half:]
    rotated = ops.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return ops.cast(rotated, x.dtype)
