"""Everything that differs between Keras backends, in one folder.

Layers and generation code are written in keras.ops. What keras.ops cannot say, or says
slowly on one backend, is a function of the backend modules here, all with the same names:

    host_array_to_tensor(array, layout=None)  a host array as a tensor, without extra copies
    linear(x, kernel)                  x [..., in] @ kernel [out, in]^T, the fastest product
    write_slot(buffer, update, slot)   one column written into a cache buffer
    compile_step(model, fn, donate_argnums=())   fn compiled over the model's variables
    loops_compile                      whether a while loop inside compile_step stays a loop
    narrow_products_pay()              whether int8 / int4 products beat float32 ones here
    remat(fn)                          fn recomputed in the backward pass
    shard_cache(cache)                 a KV cache placed for the active keras.distribution

`get()` returns the module of the process's backend (Keras has one per process), chosen once.
`common` holds the keras.ops versions the others fall back to. `choice` settles which backend
Keras imports, before it is imported; nothing in this package imports Keras at import time.
"""

from __future__ import annotations

import importlib

_MODULES = {"jax": "gemma_keras.backends.jax", "tensorflow": "gemma_keras.backends.tensorflow",
            "torch": "gemma_keras.backends.torch"}
_chosen = []


def get():
    """The backend module for Keras' backend in this process."""
    if not _chosen:
        import keras

        name = _MODULES.get(keras.backend.backend(), "gemma_keras.backends.common")
        _chosen.append(importlib.import_module(name))
    return _chosen[0]
