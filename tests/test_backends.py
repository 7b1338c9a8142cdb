"""The backend-specific pieces behind the compiled steps, checked against their generic
keras.ops forms on every backend."""

import keras
import numpy as np
import pytest
from keras import ops

from gemma_keras import backends

backend = backends.get()


def test_write_slot_equals_slice_update_and_leaves_the_buffer():
    rng = np.random.default_rng(0)
    buffer = rng.normal(size=(2, 7, 3, 4)).astype("float32")
    update = rng.normal(size=(2, 1, 3, 4)).astype("float32")
    for slot in (0, 4, 6):
        before = ops.convert_to_tensor(buffer)
        out = backend.write_slot(before, ops.convert_to_tensor(update),
                                 ops.convert_to_tensor(np.int32(slot)))
        expected = buffer.copy()
        expected[:, slot] = update[:, 0]
        np.testing.assert_array_equal(ops.convert_to_numpy(out), expected)
        np.testing.assert_array_equal(ops.convert_to_numpy(before), buffer)  # not written


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch-only in-place write")
def test_write_slot_in_place_only_into_a_donated_buffer_nothing_else_reads():
    import torch

    class Weightless:
        variables = []

    from gemma_keras.layers.kv_cache import write as cache_write  # reads .shape too

    def write(buffer, update, slot):
        return cache_write(buffer, update, slot) * 1.0

    def write_and_read_old(buffer, update, slot):  # the old buffer is read after the write
        return cache_write(buffer, update, slot) + buffer

    for fn, donate, in_place in ((write, (0,), True), (write, (), False),
                                 (write_and_read_old, (0,), False)):
        step = backend.compile_step(Weightless(), fn, donate_argnums=donate)
        for slot in (3, 1):  # the first call traces, the second runs the graph
            buffer = torch.zeros(1, 5, 2)
            out = step(buffer, torch.ones(1, 1, 2), torch.tensor(slot, dtype=torch.int32))
            expected = torch.zeros(1, 5, 2)
            expected[0, slot] = 1.0
            # Writing the old buffer in place would double the second function's output.
            assert torch.equal(out, expected), fn
            assert torch.equal(buffer, expected if in_place else torch.zeros(1, 5, 2)), fn


def test_linear_is_x_times_kernel_transposed_for_one_and_many_rows():
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(6, 5)).astype("float32")
    for shape in ((1, 1, 5), (1, 5), (3, 4, 5)):
        x = rng.normal(size=shape).astype("float32")
        out = backend.linear(ops.convert_to_tensor(x), ops.convert_to_tensor(kernel))
        np.testing.assert_allclose(ops.convert_to_numpy(out), x @ kernel.T, rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("cpu_bfloat16", ["as is", "without"])
def test_bfloat16_linear_for_one_few_and_many_rows(cpu_bfloat16, monkeypatch):
    """The bfloat16 product on any CPU: oneDNN's where the CPU has a bfloat16 inner product,
    otherwise (forced with "without" on torch) F.linear for few rows and the widened kernel
    for many. Each row count takes its own branch; all equal the float product of the
    rounded operands to bfloat16's output rounding."""
    if cpu_bfloat16 == "without":
        if keras.backend.backend() != "torch":
            pytest.skip("the CPU capability probe is torch's")
        from gemma_keras.backends import torch as torch_backend
        monkeypatch.setattr(torch_backend, "_onednn_has_bfloat16", lambda: False)
    rng = np.random.default_rng(2)
    kernel = ops.cast(rng.normal(size=(48, 64)).astype("float32"), "bfloat16")
    for shape in ((1, 1, 64), (2, 3, 64), (4, 9, 64)):  # 1, 6 and 36 rows
        x = ops.cast(rng.normal(size=shape).astype("float32"), "bfloat16")
        out = backend.linear(x, kernel)
        assert ops.dtype(out) == "bfloat16"
        expected = (ops.convert_to_numpy(ops.cast(x, "float32")).astype("float64")
                    @ ops.convert_to_numpy(ops.cast(kernel, "float32")).astype("float64").T)
        np.testing.assert_allclose(ops.convert_to_numpy(ops.cast(out, "float32")), expected,
                                   rtol=1e-2, atol=2e-2)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch trace graph pass")
def test_noop_casts_are_dropped_and_real_ones_kept():
    import torch

    from gemma_keras.backends.torch import _drop_noop_casts

    def fn(x, i):
        return (x.to(torch.float32) + i.to(torch.int64)  # no-op cast, then a real one
                + x.to(torch.float32, copy=True))         # an asked-for copy stays

    graph = torch.jit.trace(fn, (torch.ones(3), torch.ones(3, dtype=torch.int32)))
    casts = [n for n in graph.graph.nodes() if n.kind() == "aten::to"]
    _drop_noop_casts(graph.graph)
    kept = [n for n in graph.graph.nodes() if n.kind() == "aten::to"]
    assert len(casts) == 3 and len(kept) == 2
    out = graph(torch.full((3,), 2.0), torch.full((3,), 5, dtype=torch.int32))
    assert out.tolist() == [9.0, 9.0, 9.0]
