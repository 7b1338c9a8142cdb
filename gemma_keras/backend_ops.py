"""The one place for backend-specific code. Layers use keras.ops only; what cannot be said in
keras.ops (zero-copy host arrays, the projection product each backend runs fastest) lives
here."""

import contextlib
import functools

import keras
import numpy as np


def host_array_to_tensor(array: np.ndarray, layout=None):
    """A backend tensor for a host array, without the extra copies keras' generic conversion
    makes (on torch it copies every array, and widens bfloat16 to float32 first).

    layout: a JAX sharding (under `keras.distribution`): the array then goes from the host
    straight into its shards, each device receiving only its slice, instead of whole onto
    one device first."""
    if layout is not None:
        import jax

        # Keras hands initializers a sharding over an abstract mesh; the transfer needs the
        # distribution's concrete devices, with the same partition spec.
        mesh = keras.distribution.distribution().device_mesh.backend_mesh
        return jax.device_put(array, jax.sharding.NamedSharding(mesh, layout.spec))
    if keras.backend.backend() == "torch":
        import torch

        array = np.ascontiguousarray(array)
        if array.dtype.name == "bfloat16":  # torch cannot read ml_dtypes' bfloat16 directly
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)
    return array


def linear(x, kernel):
    """x [..., in] times kernel [out, in] transposed: [..., out]."""
    kernel = keras.ops.convert_to_tensor(kernel)
    backend = keras.backend.backend()
    if backend == "torch":
        return _torch_linear(x, kernel)
    if backend == "tensorflow":
        return _tf_linear(x, kernel)
    # XLA on JAX contracts the kernel's minor axis without copying it, any rank.
    return keras.ops.einsum("...d,fd->...f", x, kernel)


def _tf_linear(x, kernel):
    import tensorflow as tf

    if _in_xla_graph() or _EXPORT_FORM[0]:
        # TF's XLA runs a 2-D matmul with a transposed operand 2.6x faster than the same
        # product written as a 3-D einsum or batched matmul (16 vs 43 ms for the benchmark's
        # weights; as a BatchMatMulV2, batch-1 decode fell from 40 to 12 tok/s).
        rows = tf.reshape(x, (-1, tf.shape(x)[-1]))  # [batch * len, in]
        out = tf.matmul(rows, kernel, transpose_b=True)  # [batch * len, out]
        return tf.reshape(out, tf.concat([tf.shape(x)[:-1], tf.shape(kernel)[:1]], 0))
    # Without XLA (Keras trains on TF CPUs without it) oneDNN runs the batched matmul with the
    # kernel adjoint 15-25% faster than that 2-D MatMul for 32+ rows (benchmark FFN weights,
    # 512 rows: 10.6 vs 12.4 ms). [batch, len, in] x [out, in]^T -> [batch, len, out]
    return tf.linalg.matmul(x, kernel, adjoint_b=True)


# Set while tracing an export: the LiteRT converter turns the 2-D MatMul with the kernel
# transposed into a FULLY_CONNECTED that reads our [out, in] kernel as it is (its own weight
# layout), and int8 weight quantization applies to it; a batched matmul would keep a
# transposed copy of the weight or stay in float.
_EXPORT_FORM = [False]


@contextlib.contextmanager
def export_form():
    """Traces projections in the form exported graphs want (see `_EXPORT_FORM`)."""
    previous, _EXPORT_FORM[0] = _EXPORT_FORM[0], True
    try:
        yield
    finally:
        _EXPORT_FORM[0] = previous


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


def remat(fn):
    """`fn` recomputed in the backward pass instead of keeping its activations: keras.remat
    (jax.checkpoint, tf.recompute_grad), but on torch with checkpoint's early stop off.

    Keras' torch remat is torch's non-reentrant checkpoint, whose early stop ends the
    recomputation by raising an exception; the exception's traceback keeps the recomputed
    activations alive until Python's cycle collector runs, and a LoRA fit then grew by ~80 MiB
    per step (1.8 GiB after 20 steps of the benchmark model, vs ~0.3 GiB with it off)."""
    if keras.backend.backend() != "torch":
        return keras.remat(fn)
    from torch.utils import checkpoint

    def wrapped(*args):
        with checkpoint.set_checkpoint_early_stop(False):  # read when the forward runs
            return checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return wrapped


def _torch_linear(x, kernel):
    import torch

    if (x.device.type == "cpu" and x.dtype == kernel.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or kernel.requires_grad))):
        fast = _onednn_linear()
        if fast is not None:
            return fast(x, kernel)
    return torch.nn.functional.linear(x, kernel)


@functools.lru_cache(maxsize=None)
def _onednn_linear():
    """oneDNN's inner product for float32 CPU inference, or None where torch lacks it.

    torch's own `F.linear` reaches MKL's single-threaded gemv for a one-token step; oneDNN's
    uses both cores (the benchmark model's weights read in 21 ms instead of 31-35). The op
    has no autograd formula, hence inference only. Scripted rather than called directly: the
    tracer cannot record its `Scalar?[]` argument, TorchScript can, and traced generation
    steps then run it without Python.
    """
    import torch

    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.jit.CompilationUnit(_ONEDNN_SOURCE).linear
    except Exception:  # a torch without the op: F.linear is exact too
        return None


_ONEDNN_SOURCE = """
def linear(x: Tensor, kernel: Tensor) -> Tensor:
    scalars: List[Optional[Union[int, float, complex]]] = []
    return torch.ops.mkldnn._linear_pointwise(x, kernel, None, "none", scalars, "")
"""
