"""JAX: steps compiled by `jax.jit` as pure functions of the variables' values; host arrays
placed straight into their shards under a keras.distribution; the KV cache kept sharded."""

from __future__ import annotations

import jax
import keras

from gemma_keras.backends import common
from gemma_keras.backends.common import (int4_linear, int8_linear,  # noqa: F401
                                         remat, write_slot)  # XLA's own forms

# A data-dependent loop inside jax.jit stays an XLA while loop.
loops_compile = True


def narrow_products_pay():
    """On CPU, XLA converts every int8 / int4 weight to a float32 copy before each dot (a
    weight-sized `convert` fusion in the optimised HLO; README, Quantization): the 152M
    benchmark model decodes int4 at 0.85x of float32 there. Other platforms are not
    measured; assumed to read the narrow weights."""
    return jax.devices()[0].platform != "cpu"


def linear(x, kernel, out_dtype=None):
    """x [..., in] times kernel [out, in] transposed: [..., out] (in `out_dtype` if given).

    A wider result (float16 operands, float32 result: layers/precision.py) is XLA's dot with
    that result type: the operands are read as they are, no widened copy of the kernel."""
    if out_dtype is None or jax.numpy.dtype(out_dtype) == x.dtype:
        return common.linear(x, kernel)
    kernel = keras.ops.convert_to_tensor(kernel)
    return jax.numpy.einsum("...d,fd->...f", x, kernel,
                            preferred_element_type=jax.numpy.dtype(out_dtype))


def host_array_to_tensor(array, layout=None):
    """layout: a JAX sharding (under `keras.distribution`): the array then goes from the host
    straight into its shards, each device receiving only its slice, instead of whole onto
    one device first. Without one the array itself: Keras converts it once, when it becomes
    a variable."""
    if layout is None:
        return array
    # Keras hands initializers a sharding over an abstract mesh; the transfer needs the
    # distribution's concrete devices, with the same partition spec.
    mesh = keras.distribution.distribution().device_mesh.backend_mesh
    return jax.device_put(array, jax.sharding.NamedSharding(mesh, layout.spec))


def compile_step(model, fn, donate_argnums=()):
    """fn(*args) run as `jax.jit` of a pure function of (variable values, *args); arguments in
    `donate_argnums` (the cache) are donated on accelerators, where XLA then updates them in
    place. The CPU backend cannot use donated buffers and would only warn."""
    variables = list(model.variables)

    def pure(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return fn(*args)

    on_cpu = jax.devices()[0].platform == "cpu"
    donate = () if on_cpu else tuple(i + 1 for i in donate_argnums)
    jitted = jax.jit(pure, donate_argnums=donate)

    def run(*args):
        return jitted([v.value for v in variables], *args)
    return run


def shard_cache(cache):
    """Under a keras.distribution every cache buffer is placed by
    `distribution.cache_layout`: eagerly (moved into shards) and inside a compiled step (a
    sharding constraint, so the cache a step returns keeps the layout it came in with and the
    next step is not compiled again). Without one, the cache unchanged."""
    if keras.distribution.distribution() is None:
        return cache
    from gemma_keras.distribution import cache_layout

    return keras.tree.map_structure(
        lambda x: keras.distribution.distribute_tensor(x, cache_layout(x.shape)), cache)
