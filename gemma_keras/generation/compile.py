"""Compiling the model step, per backend: the one place generation touches backend APIs.

`compile_step(model, fn)` returns a callable with fn's signature whose body runs compiled:
JAX through `jax.jit` over the variables' values (a pure function, cache buffers donated on
accelerators), TensorFlow through `tf.function(jit_compile=True)` (XLA), PyTorch eagerly
under `torch.inference_mode` with static shapes. Arguments must keep their shapes and dtypes
between calls (scalars as int32 arrays) or the function is traced again; generation buckets
its shapes for exactly that reason.
"""

from __future__ import annotations

import keras


def compile_step(model, fn, donate_argnums=()):
    backend = keras.backend.backend()
    if backend == "jax":
        return _jax(model, fn, donate_argnums)
    if backend == "tensorflow":
        import tensorflow as tf

        # Static shapes (no reduce_retracing): XLA compiles per shape bucket anyway.
        return tf.function(fn, jit_compile=True)
    if backend == "torch":
        import torch

        def run(*args):
            with torch.inference_mode():
                return fn(*args)
        return run
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
