"""PyTorch: steps compiled by `torch.jit.trace` per input shape, zero-copy host arrays, the
float32 CPU product chosen by measurement, one-op cache writes, and a remat that frees."""

from __future__ import annotations

import functools
import time
import warnings
import weakref

import keras
import numpy as np
import torch

from gemma_keras import keras_internals
from gemma_keras.backends import common
from gemma_keras.backends.common import shard_cache  # noqa: F401  (no keras.distribution)

# A trace records one pass through a Python loop: a data-dependent loop is run on the host.
loops_compile = False


def narrow_products_pay():
    """ATen's int8 / int4 products read the narrow weights (`int8_linear`, `int4_linear`):
    on the 152M benchmark model int4 decodes at 2.36x of float32 on this AVX2 CPU."""
    return True


def host_array_to_tensor(array, layout=None):
    """A tensor sharing the array's memory: keras' generic conversion copies every array, and
    widens bfloat16 to float32 first."""
    array = np.ascontiguousarray(array)
    if array.dtype.name == "bfloat16":  # torch cannot read ml_dtypes' bfloat16 directly
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def write_slot(buffer, update, slot):
    """`buffer` [batch, slots, ...] with `update` [batch, 1, ...] written at `slot` on axis 1.

    keras.ops.slice_update builds index grids on torch (an arange per axis, a meshgrid,
    index_put_): ~25 ops per write, 17 writes per decode step of the benchmark model, over
    40% of the traced graph's ops; `index_copy` is one. Inside a step whose cache is donated,
    `compile_step` turns it into the in-place `index_copy_` (see `_write_donated_in_place`)."""
    buffer, update, slot = (keras.ops.convert_to_tensor(t) for t in (buffer, update, slot))
    index = torch.reshape(slot, (1,)).to(torch.int64)
    return torch.index_copy(buffer, 1, index, update.to(buffer.dtype))


def linear(x, kernel, out_dtype=None):
    """x [..., in] times kernel [out, in] transposed: [..., out] (in `out_dtype` if given)."""
    if out_dtype is not None and _torch_dtype(out_dtype) != x.dtype:
        return _wide_linear(x, kernel, _torch_dtype(out_dtype))
    kernel = keras.ops.convert_to_tensor(kernel)
    if (x.device.type == "cpu" and x.dtype == kernel.dtype
            and x.dtype in (torch.float32, torch.bfloat16)
            and not (torch.is_grad_enabled() and (x.requires_grad or kernel.requires_grad))):
        rows = x.numel() // x.shape[-1]
        # bfloat16 through oneDNN's inner product where the CPU has one (AVX512_BF16):
        # F.linear's bfloat16 product for one row decoded the benchmark model at 23 tok/s,
        # oneDNN's at 28.7 (float32: 26.7, same run). Still short of what the bytes allow:
        # oneDNN reads a pre-reordered (blocked) bfloat16 weight twice as fast (2.9 vs 5.6
        # ms for 8 x [4096, 1024]), but that is a second copy of every weight. Without
        # AVX512_BF16 (e.g. AMD Zen 3) oneDNN has no bfloat16 inner product at all, and
        # F.linear's bfloat16 product there costs each row a full pass over the weights
        # (8 x [4096, 1024] on a Zen 3: 4.8 ms for 1 row, 34 for 8, 126 for 32), while
        # widening the kernel for oneDNN's float32 product costs 14 / 30 / 39 ms.
        if x.dtype == torch.float32:
            fast = _one_row_linear() if rows == 1 else _onednn_linear()
        elif _onednn_has_bfloat16():
            fast = _onednn_linear()
        elif rows >= _BF16_WIDEN_ROWS and _onednn_linear() is not None:
            return _onednn_linear()(x.float(), kernel.float()).to(x.dtype)
        else:
            fast = None
        if fast is not None:
            return fast(x, kernel)
    return torch.nn.functional.linear(x, kernel)


_BF16_WIDEN_ROWS = 8


def _wide_linear(x, kernel, wide):
    """`linear` with a result in the wider dtype `wide` (float16 operands, float32 result:
    layers/precision.py).

    ATen has no float16 product with a float32 result on CPU (`aten::mm.dtype` is CUDA-only in
    2.13). Widening both operands cost the guarded float16 model 2.3x of its decode speed
    (bench/float16_guard.py, first version: 111 vs 259 tok/s). Instead the float16 product
    stays, and each row of x is divided by the power of two that keeps every partial sum
    within 2**15: |sum_i x_i w_ji| <= max|x| * max_j sum_i |w_ji|, the kernel's largest row L1
    norm, computed once per weight. Rows that fit are divided by 1 (the plain float16
    product); the result is widened and multiplied back."""
    if x.dtype != torch.float16:
        kernel = keras.ops.convert_to_tensor(kernel)
        return linear(x.to(wide), kernel.to(wide))
    if isinstance(kernel, keras.Variable):
        bound = _derived(kernel, "row_l1", _largest_row_l1)
        kernel = keras.ops.convert_to_tensor(kernel)
    else:  # a kernel made in this call (a dequantized one): no cache to keep it in
        kernel = keras.ops.convert_to_tensor(kernel)
        bound = _largest_row_l1(kernel.detach())
    with torch.no_grad():
        peak = x.detach().abs().amax(dim=-1, keepdim=True).float()  # [..., 1]
        scale = torch.exp2(torch.ceil(torch.log2(torch.clamp(peak * bound / 2.0 ** 15,
                                                                  min=1.0))))
    y = torch.nn.functional.linear((x.float() / scale).to(x.dtype), kernel.to(x.dtype))
    return y.to(wide) * scale


def _largest_row_l1(kernel):
    """max over output rows of sum |w| of a [out, in] kernel, float32 scalar."""
    return kernel.float().abs().sum(dim=-1).max()


def _torch_dtype(name):
    """A dtype name ("float32") as torch's dtype; None stays None."""
    return None if name is None else getattr(torch, str(name))


def int8_linear(x, kernel, scale, out_dtype=None):
    """x [..., in] times the int8 kernel [out, in] (dequantized kernel / scale): [..., out].

    For inference on CPU, ATen's weight-only int8 product (`_weight_int8pack_mm`, the one
    gpt-fast uses) with x in bfloat16: it reads the int8 rows and nothing else. Measured on
    8 x [4096, 1024] weights, batch 1: 1.7-2.5 ms, against 6 ms for float32 `F.linear`;
    with float32 x the same op takes 26 ms (no vectorised float32 kernel), hence bfloat16
    (x rounded to 8 significant bits, the product accumulated in float32). Elsewhere
    (gradients, other devices) the kernel is converted in the product."""
    x = keras.ops.convert_to_tensor(x)
    rows = x.numel() // x.shape[-1]
    # Many rows (a prompt's prefill): the ATen kernel does not reuse what it reads across
    # rows (128 rows of a [4096, 1024] weight: 16.6 ms vs 13.9 for float32 F.linear), while
    # converting the kernel once and running the float product costs ~8.5 ms.
    if not _inference_on_cpu(x) or rows > _INT8_KERNEL_MAX_ROWS:
        return common.int8_linear(x, kernel, scale, out_dtype)
    kernel = keras.ops.convert_to_tensor(kernel)
    inverse = _derived(scale, "int8_scale", lambda s: (1.0 / s.reshape(-1)).to(torch.bfloat16))
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # [batch * len, in]
    y = torch.ops.aten._weight_int8pack_mm(rows, kernel, inverse)
    return y.reshape(*x.shape[:-1], -1).to(_torch_dtype(out_dtype) or x.dtype)


_INT8_KERNEL_MAX_ROWS = 32


def int4_linear(x, kernel, scale, zero, out_dtype=None):
    """x [..., in] times the int4 kernel of gemma_keras.quantization: [..., out].

    For inference on CPU, ATen's grouped int4 product (`_weight_int4pack_mm_for_cpu`) on a
    copy of the weights in its own packing, made once per weight (and again if the weight
    changes): 1.3 ms for 8 x [4096, 1024] weights at batch 1 against 6 ms in float32.
    The copy costs the int4 weights once more in memory (half a byte per weight); our own
    layout stays the one that is saved, trained through and read by XLA. x goes in
    bfloat16, as for int8."""
    x = keras.ops.convert_to_tensor(x)
    if not _inference_on_cpu(x):
        return common.int4_linear(x, kernel, scale, zero, out_dtype)
    groups = keras.ops.convert_to_tensor(scale).shape[-1]
    block_size = x.shape[-1] // groups
    if block_size not in (32, 64, 128, 256):  # what the ATen kernel takes
        return common.int4_linear(x, kernel, scale, zero, out_dtype)
    packed = _derived(kernel, "int4_pack", _int4_pack)
    scales_and_zeros = _derived(scale, "int4_scales", lambda s: _int4_scales_and_zeros(s, zero))
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # [batch * len, in]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, block_size, scales_and_zeros)
    return y.reshape(*x.shape[:-1], -1).to(_torch_dtype(out_dtype) or x.dtype)


def _int4_pack(kernel):
    """Our packed int8 [out, in/2] -> ATen's CPU int4 packing of the same values."""
    low = torch.bitwise_right_shift(torch.bitwise_left_shift(kernel, 4), 4)  # even inputs
    high = torch.bitwise_right_shift(kernel, 4)  # odd inputs
    unsigned = torch.stack([low, high], dim=-1).reshape(kernel.shape[0], -1)
    unsigned = unsigned.to(torch.int32) + 8  # [out, in] in [0, 15]
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned.contiguous(), 1)


def _int4_scales_and_zeros(scale, zero):
    """ATen dequantizes (u - 8) * scale + offset for u = q + 8 in [0, 15]; ours is
    (q - zero) * scale, so offset = -zero * scale. [groups, out, 2] bfloat16."""
    zero = _real_value(zero).to(torch.float32)
    pairs = torch.stack([scale, -zero * scale], dim=-1)  # [out, groups, 2]
    return pairs.transpose(0, 1).contiguous().to(torch.bfloat16)


def _inference_on_cpu(x):
    return x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)


# Tensors derived from a variable's value (another packing of it), made when first asked
# for and again when the value changes. Inside a traced step they are constants of the
# trace, so `compile_step` drops its traces when one goes stale (`_derived_changed`).
_DERIVED = {}  # (id of the stored tensor, kind) -> (weakref to it, its version, derived)


def _derived(variable, kind, make):
    value = _real_value(variable)
    key = (id(value), kind)
    entry = _DERIVED.get(key)
    if entry is None or entry[0]() is not value or entry[1] != value._version:
        # Made outside any trace in progress (the stored tensor is also the trace's example
        # input, so its packing would be recorded and run at every step).
        tracing = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            with torch.inference_mode(False), torch.no_grad():
                derived = make(value.detach())
        finally:
            torch._C._set_tracing_state(tracing)
        # The entry goes when the variable's tensor does (quantize() or del drops it).
        ref = weakref.ref(value, lambda _, key=key: _DERIVED.pop(key, None))
        entry = _DERIVED[key] = (ref, value._version, derived)
    return entry[2]


def _derived_changed():
    """Whether a derived tensor's source has changed since it was made; if so, all are
    dropped, to be made again by the next call or trace."""
    for ref, version, _ in list(_DERIVED.values()):
        value = ref()
        if value is not None and value._version != version:
            _DERIVED.clear()
            return True
    return False


def _real_value(variable):
    """The stored tensor of a Keras variable, even inside a StatelessScope (a trace maps
    variables to graph inputs; derived tensors are made from what is stored)."""
    if isinstance(variable, keras.Variable):
        return keras_internals.stored_value(variable)
    return keras.ops.convert_to_tensor(variable)


def remat(fn):
    """`fn` recomputed in the backward pass: torch's non-reentrant checkpoint, as keras.remat,
    but with its early stop off.

    The early stop ends the recomputation by raising an exception; the exception's traceback
    keeps the recomputed activations alive until Python's cycle collector runs, and a LoRA fit
    then grew by ~80 MiB per step (1.8 GiB after 20 steps of the benchmark model, vs ~0.3 GiB
    with it off)."""
    from torch.utils import checkpoint

    def wrapped(*args):
        with checkpoint.set_checkpoint_early_stop(False):  # read when the forward runs
            return checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return wrapped


def compile_step(model, fn, donate_argnums=()):
    """fn(*args) run as a graph traced once per input signature (shapes and dtypes), under
    inference mode. The traced graph runs without the Python and Keras dispatch that costs
    about a third of an eager decode step.

    Arguments in `donate_argnums` are given up by the caller (the cache): their one-slot
    writes happen in place. A new 128 KiB-or-larger buffer per write is a fresh mmap whose
    pages fault in on every step."""
    variables = list(model.variables)
    traced = {}  # input signature -> (traced graph, output structure)

    def as_tensor(x):
        return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))

    def run(*args):
        flat = [as_tensor(x) for x in keras.tree.flatten(args)]
        key = tuple((tuple(x.shape), x.dtype) for x in flat)
        values = [v.value for v in variables]
        if _DERIVED and _derived_changed():
            traced.clear()  # their constants are stale packings of changed weights
        with torch.inference_mode():
            if key not in traced:
                structure = {}

                def pure(*inputs):
                    # Weights are inputs, not constants: the graph then sees in-place updates
                    # (fit, assign) and needs no copy of them.
                    mapping = list(zip(variables, inputs[: len(variables)]))
                    with keras.StatelessScope(state_mapping=mapping):
                        out = fn(*keras.tree.pack_sequence_as(args, list(inputs[len(variables):])))
                    structure["out"] = out
                    return tuple(keras.tree.flatten(out))

                # The one-row product is chosen by timing and oneDNN's bfloat16 by a probe:
                # do both before tracing, so neither the tracer's bookkeeping nor the timed
                # ops touch the measurement or the graph.
                _one_row_linear()
                _onednn_has_bfloat16()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # TracerWarnings about static shapes
                    graph = torch.jit.trace(pure, (*values, *flat), check_trace=False)
                _drop_noop_casts(graph.graph)
                donated, position = [], len(variables)  # graph inputs of donated arguments
                for i, arg in enumerate(args):
                    count = len(keras.tree.flatten(arg))
                    if i in donate_argnums:
                        donated.extend(range(position, position + count))
                    position += count
                _write_donated_in_place(graph.graph, donated)
                traced[key] = (graph, structure["out"])
            graph, out_structure = traced[key]
            return keras.tree.pack_sequence_as(out_structure, list(graph(*values, *flat)))
    return run


def _write_donated_in_place(graph, donated):
    """Turns each `aten::index_copy` (a `write_slot`) of a donated graph input into the
    in-place `aten::index_copy_`, where that write is the only use of the input's contents
    (nothing else reads the old buffer, so writing into it changes no result)."""
    inputs = list(graph.inputs())
    donated = {inputs[i].unique() for i in donated}
    for node in list(graph.nodes()):
        if node.kind() != "aten::index_copy":
            continue
        buffer = node.inputsAt(0)
        # Reading the buffer's shape (the tracer records `.shape` as aten::size) is not
        # reading its contents.
        readers = [use for use in buffer.uses() if use.user.kind() not in _SHAPE_OPS]
        if buffer.unique() not in donated or len(readers) != 1:
            continue
        in_place = graph.create("aten::index_copy_", list(node.inputs()))
        in_place.insertBefore(node)
        in_place.output().setType(node.output().type())
        node.output().replaceAllUsesWith(in_place.output())
        node.destroy()


_SHAPE_OPS = ("aten::size", "aten::dim", "aten::numel", "prim::shape")


def _drop_noop_casts(graph):
    """Removes `aten::to` nodes that return their input (same dtype and device, no copy) from a
    traced graph. Keras' convert_to_tensor records two per variable read and one per cast: 537
    in the benchmark model's decode step, each a dispatch the interpreter pays per call."""
    for node in list(graph.nodes()):
        if node.kind() != "aten::to":
            continue
        source, result = node.inputsAt(0), node.output()
        a, b = source.type(), result.type()
        if not (isinstance(a, torch._C.TensorType) and isinstance(b, torch._C.TensorType)):
            continue
        if a.scalarType() is None or a.scalarType() != b.scalarType() or a.device() != b.device():
            continue
        # Every aten::to overload has these two arguments.
        if node.namedInput("copy").toIValue() is not False:
            continue
        if node.namedInput("memory_format").toIValue() is not None:
            continue
        result.replaceAllUsesWith(source)
        node.destroy()
    torch._C._jit_pass_dce(graph)


@functools.lru_cache(maxsize=None)
def _one_row_linear():
    """The faster float32 CPU product for one row (a batch-1 decode step), measured once per
    process: torch's `F.linear` (MKL's gemv) or oneDNN's inner product.

    Which wins depends on the CPU: on one host of this project's 2-core machines MKL's gemv
    ran on one core (the benchmark model's weights in 31-35 ms vs oneDNN's 21); on another it
    used both and beat oneDNN by ~10%. Timed on 128 MiB of weights (more than any cache), each
    candidate the best of 5 interleaved passes: ~0.15 s, once."""
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
def _onednn_has_bfloat16():
    """Whether oneDNN runs a bfloat16 inner product on this CPU. Where it does not (no
    AVX512_BF16 / AMX, e.g. AMD Zen 3) it raises "could not create a primitive descriptor"
    rather than falling back, so it is asked once, on a 1 x 16 product."""
    fast = _onednn_linear()
    if fast is None:
        return False
    try:
        with torch.inference_mode():
            fast(torch.ones(1, 16, dtype=torch.bfloat16), torch.ones(16, 16, dtype=torch.bfloat16))
    except RuntimeError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _onednn_linear():
    """oneDNN's inner product for float32 CPU inference, or None where torch lacks it.

    torch's own `F.linear` reaches MKL's single-threaded gemv for a one-token step; oneDNN's
    uses both cores (the benchmark model's weights read in 21 ms instead of 31-35). The op
    has no autograd formula, hence inference only. Scripted rather than called directly: the
    tracer cannot record its `Scalar?[]` argument, TorchScript can, and traced generation
    steps then run it without Python.
    """
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
