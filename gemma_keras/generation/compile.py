"""Compiling the model step, per backend: the one place generation touches backend APIs.

`compile_step(model, fn)` returns a callable with fn's signature whose body runs compiled:
JAX through `jax.jit` over the variables' values (a pure function, cache buffers donated on
accelerators), TensorFlow through `tf.function(jit_compile=True)` (XLA), PyTorch through
`torch.jit.trace` per shape (the traced graph runs without the Python and Keras dispatch that
costs about a third of an eager decode step), all under inference mode. Arguments must keep
their shapes and dtypes between calls (scalars as int32 arrays) or the function is traced
again; generation buckets its shapes for exactly that reason.

`donate_argnums` names arguments the caller gives up: JAX may reuse their buffers, and a
torch step writes one-slot cache updates into them in place. Never read a donated argument
after the call; use what the call returned.
"""

from __future__ import annotations

import contextlib

import keras

from gemma_keras import backend_ops


def loops_compile() -> bool:
    """Whether a data-dependent loop inside a compiled function stays a loop (an XLA while
    loop on JAX and TensorFlow). A torch trace would unroll it, so torch loops on the host."""
    return keras.backend.backend() in ("jax", "tensorflow")



def compile_step(model, fn, donate_argnums=()):
    backend = keras.backend.backend()
    if backend == "jax":
        return _jax(model, fn, donate_argnums)
    if backend == "tensorflow":
        import tensorflow as tf

        # Static shapes (no reduce_retracing): XLA compiles per shape bucket anyway.
        return tf.function(fn, jit_compile=True)
    if backend == "torch":
        return _torch(model, fn, in_place=bool(donate_argnums))
    return fn


def _jax(model, fn, donate_argnums):
    import jax

    variables = list(model.variables)

    def pure(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return fn(*args)

    # Donating the cache lets XLA update it in place; the CPU backend cannot use donated
    # buffers and would only warn.
    on_cpu = jax.devices()[0].platform == "cpu"
    donate = () if on_cpu else tuple(i + 1 for i in donate_argnums)
    jitted = jax.jit(pure, donate_argnums=donate)

    def run(*args):
        return jitted([v.value for v in variables], *args)
    return run


def _torch(model, fn, in_place):
    import warnings

    import numpy as np
    import torch

    variables = list(model.variables)
    traced = {}  # input signature -> (traced graph, output structure)

    def as_tensor(x):
        return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))

    def run(*args):
        flat = [as_tensor(x) for x in keras.tree.flatten(args)]
        key = tuple((tuple(x.shape), x.dtype) for x in flat)
        values = [v.value for v in variables]
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

                # The one-row product is chosen by timing: do that before tracing, so neither
                # the tracer's bookkeeping nor the timed ops touch the measurement or the graph.
                backend_ops.choose_torch_products()
                writes = backend_ops.cache_writes_in_place() if in_place else contextlib.nullcontext()
                with warnings.catch_warnings(), writes:
                    warnings.simplefilter("ignore")  # TracerWarnings about static shapes
                    graph = torch.jit.trace(pure, (*values, *flat), check_trace=False)
                _drop_noop_casts(graph.graph)
                traced[key] = (graph, structure["out"])
            graph, out_structure = traced[key]
            return keras.tree.pack_sequence_as(out_structure, list(graph(*values, *flat)))
    return run


def _drop_noop_casts(graph):
    """Removes `aten::to` nodes that return their input (same dtype and device, no copy) from a
    traced graph. Keras' convert_to_tensor records two per variable read and one per cast: 537
    in the benchmark model's decode step, each a dispatch the interpreter pays per call."""
    import torch

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

