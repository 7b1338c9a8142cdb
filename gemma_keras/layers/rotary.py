"""Rotary position embedding (RoPE) in the "rotate half" layout the Gemma checkpoints use."""

from keras import ops


def rope_tables(positions, head_dim, max_wavelength=10_000.0, scaling_factor=1.0):
    """(sin, cos), each [batch, seq, 1, head_dim / 2] float32, for [batch, seq] positions.

    scaling_factor > 1 is linear position scaling (Gemma 3's global layers, x8): the
    frequencies are divided by it, as transformers' "linear" RoPE does, which is the same as
    dividing the positions.

    Computed once per forward pass and shared by every layer. Positions and angles are
    float32 whatever the compute dtype: in bfloat16, position 8190 rounds to 8192, which
    corrupts long contexts (a bug seen in public implementations).
    """
    half = head_dim // 2
    # [half] inverse frequencies 1 / wavelength^(2i / head_dim)
    exponents = ops.arange(half, dtype="float32") * (2.0 / head_dim)
    inverse_frequency = 1.0 / ops.power(ops.cast(max_wavelength, "float32"), exponents)
    if scaling_factor != 1.0:
        inverse_frequency = inverse_frequency / scaling_factor
    # [batch, seq, half]
    angles = ops.cast(positions, "float32")[:, :, None] * inverse_frequency[None, None, :]
    # [batch, seq, 1, half]: broadcast over heads
    return ops.sin(angles)[:, :, None, :], ops.cos(angles)[:, :, None, :]


def apply_rotary_embedding(x, rope):
    """Rotates the feature pairs (i, i + head_dim/2) of x [batch, seq, heads, head_dim] by the
    angles of `rope` = rope_tables(...)."""
    sin, cos = rope
    half = x.shape[-1] // 2
    x32 = ops.cast(x, "float32")
    first, second = x32[..., :half], x32[..., half:]
    rotated = ops.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return ops.cast(rotated, x.dtype)
