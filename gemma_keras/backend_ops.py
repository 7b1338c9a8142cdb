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


def write_slot(buffer, update, slot):
    """`buffer` [batch, slots, ...] with `update` [batch, 1, ...] written at `slot` (a scalar
    int tensor) on axis 1: a new tensor (the buffer itself under `cache_writes_in_place`).

    keras.ops.slice_update is exactly this on JAX and TensorFlow (one dynamic-update-slice).
    On torch it builds index grids (an arange per axis, a meshgrid, index_put_): ~25 ops per
    write, 17 writes per decode step of the benchmark model, over 40% of the traced graph's
    ops; `index_copy` is one."""
    if keras.backend.backend() == "torch":
        import torch

        buffer, update, slot = (keras.ops.convert_to_tensor(t) for t in (buffer, update, slot))
        index = torch.reshape(slot, (1,)).to(torch.int64)
        if _IN_PLACE_CACHE.on:
            return buffer.index_copy_(1, index, update.to(buffer.dtype))
        return torch.index_copy(buffer, 1, index, update.to(buffer.dtype))
    index = [0, slot] + [0] * (len(buffer.shape) - 2)
    return keras.ops.slice_update(buffer, index, keras.ops.cast(update, buffer.dtype))


def _tf_linear(x, kernel):
    import tensorflow as tf

    if _in_xla_graph() or _EXPORT_FORM.on:
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


class _Flag:
    """A trace-time switch, set for the duration of a `with flag.set():` block."""

    def __init__(self):
        self.on = False

    @contextlib.contextmanager
    def set(self):
        previous, self.on = self.on, True
        try:
            yield
        finally:
            self.on = previous


# Set while tracing an export: the LiteRT converter turns the 2-D MatMul with the kernel
# transposed into a FULLY_CONNECTED that reads our [out, in] kernel as it is (its own weight
# layout), and int8 weight quantization applies to it; a batched matmul would keep a
# transposed copy of the weight or stay in float.
_EXPORT_FORM = _Flag()
export_form = _EXPORT_FORM.set  # traces projections in the form exported graphs want

# Set while torch traces a compiled generation step that owns its cache (the cache argument
# is donated, as on JAX accelerators: the caller never reads the old one again). One-slot
# cache writes then update the buffer in place: a new 128 KiB-or-larger buffer per write is
# a fresh mmap whose pages fault in on every step.
_IN_PLACE_CACHE = _Flag()
cache_writes_in_place = _IN_PLACE_CACHE.set


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
        rows = x.numel() // x.shape[-1]
        fast = _one_row_linear() if rows == 1 else _onednn_linear()
        if fast is not None:
            return fast(x, kernel)
    return torch.nn.functional.linear(x, kernel)


def choose_torch_products():
    """Makes the per-process choice of `_one_row_linear` now (it is cached)."""
    _one_row_linear()


@functools.lru_cache(maxsize=None)
def _one_row_linear():
    """The faster float32 CPU product for one row (a batch-1 decode step), measured once per
    process: torch's `F.linear` (MKL's gemv) or oneDNN's inner product.

    Which wins depends on the CPU: on one host of this project's 2-core machines MKL's gemv
    ran on one core (the benchmark model's weights in 31-35 ms vs oneDNN's 21); on another it
    used both and beat oneDNN by ~10%. Timed on 128 MiB of weights (more than any cache), each
    candidate the best of 5 interleaved passes: ~0.15 s, once."""
    import time

    import torch

    fast = _onednn_linear()
    if fast is None:
        return None
    weights = [torch.ones(4096, 1024) for _ in range(8)]
    x = torch.ones(1, 1024)
    best = {product: float("inf") for product in (torch.nn.functional.linear, fast)}
    with torch.inference_mode():
        for _ in range(5):
            for candidate in best:
                begin = time.perf_counter()
                for w in weights:
                    candidate(x, w)
                best[candidate] = min(best[candidate], time.perf_counter() - begin)
    return min(best, key=best.get)


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
