"""TensorFlow: steps compiled by XLA (`tf.function(jit_compile=True)`), and the projection
written in the form each kind of TensorFlow graph runs fastest."""

from __future__ import annotations

import contextlib

import tensorflow as tf

from gemma_keras.backends.common import (host_array_to_tensor, int4_linear,  # noqa: F401
                                         int8_linear, remat,
                                         shard_cache, write_slot)

# A data-dependent loop inside an XLA-compiled tf.function stays a while loop.
loops_compile = True


def narrow_products_pay():
    """As on JAX: XLA on CPU widens int8 / int4 weights before each dot (int4 decodes at
    0.67x of float32 on the 152M benchmark model). GPUs are not measured; assumed to pay."""
    return bool(tf.config.list_physical_devices("GPU"))


def compile_step(model, fn, donate_argnums=()):
    # Static shapes (no reduce_retracing): XLA compiles per shape bucket anyway.
    return tf.function(fn, jit_compile=True)


def linear(x, kernel, out_dtype=None):
    """x [..., in] times kernel [out, in] transposed: [..., out] (in `out_dtype` if given)."""
    kernel = tf.convert_to_tensor(kernel)
    if out_dtype is not None and tf.as_dtype(out_dtype) != x.dtype:
        # A float16 product with a float32 result (layers/precision.py). XLA compiles
        # BatchMatMulV3 with its own result type (operands read as they are); TensorFlow's
        # own kernels have no float16 -> float32 matmul, so outside XLA the operands widen.
        wide = tf.as_dtype(out_dtype)
        if not _in_xla_graph():
            return linear(tf.cast(x, wide), tf.cast(kernel, wide))
        rows = tf.reshape(x, (-1, tf.shape(x)[-1]))  # [batch * len, in]
        out = tf.raw_ops.BatchMatMulV3(x=rows, y=kernel, Tout=wide, adj_y=True)
        return tf.reshape(out, tf.concat([tf.shape(x)[:-1], tf.shape(kernel)[:1]], 0))
    if _in_xla_graph() or _exporting[-1]:
        # TF's XLA runs a 2-D matmul with a transposed operand 2.6x faster than the same
        # product written as a 3-D einsum or batched matmul (16 vs 43 ms for the benchmark's
        # weights; as a BatchMatMulV2, batch-1 decode fell from 40 to 12 tok/s). The LiteRT
        # converter turns it into a FULLY_CONNECTED that reads our [out, in] kernel as it is
        # (its own weight layout), and int8 weight quantization applies to it; a batched
        # matmul would keep a transposed copy of the weight or stay in float.
        rows = tf.reshape(x, (-1, tf.shape(x)[-1]))  # [batch * len, in]
        out = tf.matmul(rows, kernel, transpose_b=True)  # [batch * len, out]
        return tf.reshape(out, tf.concat([tf.shape(x)[:-1], tf.shape(kernel)[:1]], 0))
    # Without XLA (Keras trains on TF CPUs without it) oneDNN runs the batched matmul with the
    # kernel adjoint 15-25% faster than that 2-D MatMul for 32+ rows (benchmark FFN weights,
    # 512 rows: 10.6 vs 12.4 ms). [batch, len, in] x [out, in]^T -> [batch, len, out]
    return tf.linalg.matmul(x, kernel, adjoint_b=True)


# Whether the graph being traced is an export (see `exporting`). A trace-time property of the
# graph, like TensorFlow's own name scopes: only `exporting()` below changes it and only
# `linear` above reads it, rather than an argument threaded through every layer's call.
_exporting = [False]


@contextlib.contextmanager
def exporting():
    """Within this block, projections are traced in the form exported graphs want (the 2-D
    MatMul with the kernel transposed, as under XLA)."""
    _exporting.append(True)
    try:
        yield
    finally:
        _exporting.pop()


def _in_xla_graph() -> bool:
    """Whether the op being built will be compiled by XLA (tf.function(jit_compile=True), our
    generation steps, or a fit compiled with jit_compile=True). The check is TF's internal
    one; if it ever moves, assume XLA, whose form is never wrong, only slower eagerly."""
    try:
        from tensorflow.python.framework import ops as tf_ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:
        return True
    return control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph())
