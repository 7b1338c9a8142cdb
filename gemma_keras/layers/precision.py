"""What keeps a float16 model finite: the one place that decides which activations leave the
compute dtype.

float16 tops out at 65,504, and Gemma's activations pass that in later layers of the real
checkpoints: the residual stream grows layer by layer, and a few feed-forward channels spike
("massive activations"), so a plain float16 forward turns into inf, then NaN, and generates
nothing (HF advises bfloat16 for Gemma 2; keras-hub PR #2519 fixed the same blank output for
Gemma 3). Under a float16 compute dtype, therefore:

- the residual stream, the scaled embedding and the post-norms' outputs are float32;
- the products whose outputs can spike (the FFN's three, attention's output projection) take
  float16 operands but give float32 results (`backends.linear(..., out_dtype=)`: XLA's dot with
  a float32 result type, on GPUs the same cuBLAS float16 kernel writing float32);
- the FFN's intermediate gelu(gate) * up is formed in float32 and brought into float16's range
  per token by a power of two (exact: only the exponent changes), undone on the float32 result;
- RMSNorm, the soft-caps and softmax already run in float32 for every dtype.

Unguarded: the query/key/value projections (their input is normalised, and the KV cache keeps
float16 anyway) and the attention logits' product (the queries are scaled before it).

Every other compute dtype keeps its activations in that dtype: bfloat16 has float32's range,
and the bfloat16 checkpoints were trained with a bfloat16 residual, which is what exactness
against the references means there.
"""

import keras
from keras import ops

# The largest magnitude an operand is scaled into: half of float16's maximum, so that the
# rounding of the scaled value cannot reach infinity.
_OPERAND_LIMIT = 2.0 ** 15


def guarded(compute_dtype) -> bool:
    """compute_dtype: a name or any backend's dtype object."""
    return keras.backend.standardize_dtype(compute_dtype) == "float16"


def residual_dtype(compute_dtype) -> str:
    """The residual stream's dtype for a model computing in `compute_dtype`."""
    if guarded(compute_dtype):
        return "float32"
    return keras.backend.standardize_dtype(compute_dtype)


def product_dtype(compute_dtype) -> str:
    """What a product that may spike returns under `compute_dtype` (see the module doc)."""
    return residual_dtype(compute_dtype)


def scaled_product(linear, h, compute_dtype):
    """`linear(h)` for an activation `h` [..., in] that may exceed float16's range.

    Under float16, h is divided per row by the power of two that brings its largest entry
    within 2**15, cast to float16, multiplied (float32 result) and multiplied back. Rows within
    range are divided by 1: the same float16 operand as without the guard. Other dtypes:
    `linear(h)` in the compute dtype.
    """
    if not guarded(compute_dtype):
        return linear(ops.cast(h, compute_dtype))
    h = ops.cast(h, "float32")
    peak = ops.max(ops.abs(h), axis=-1, keepdims=True)  # [..., 1]
    exponent = ops.ceil(ops.log2(ops.maximum(peak, 1e-30) / _OPERAND_LIMIT))
    # A constant for the gradient: dividing and multiplying back by it is the identity.
    scale = ops.stop_gradient(ops.power(2.0, ops.maximum(exponent, 0.0)))
    return linear(ops.cast(h / scale, compute_dtype), out_dtype="float32") * scale
