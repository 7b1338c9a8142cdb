"""The backend-specific pieces behind the compiled steps, checked against their generic
keras.ops forms on every backend."""

import keras
import numpy as np
import pytest
from keras import ops

from gemma_keras import backend_ops


def test_write_slot_equals_slice_update_and_leaves_the_buffer():
    rng = np.random.default_rng(0)
    buffer = rng.normal(size=(2, 7, 3, 4)).astype("float32")
    update = rng.normal(size=(2, 1, 3, 4)).astype("float32")
    for slot in (0, 4, 6):
        before = ops.convert_to_tensor(buffer)
        out = backend_ops.write_slot(before, ops.convert_to_tensor(update),
                                     ops.convert_to_tensor(np.int32(slot)))
        expected = buffer.copy()
        expected[:, slot] = update[:, 0]
        np.testing.assert_array_equal(ops.convert_to_numpy(out), expected)
        np.testing.assert_array_equal(ops.convert_to_numpy(before), buffer)  # not written


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch-only in-place write")
def test_write_slot_in_place_under_a_donated_torch_step():
    import torch

    buffer = torch.zeros(1, 5, 2)
    with backend_ops.cache_writes_in_place():
        out = backend_ops.write_slot(buffer, torch.ones(1, 1, 2), torch.tensor(3))
    assert out is buffer and buffer[0, 3].tolist() == [1.0, 1.0] and buffer.sum() == 2


def test_linear_is_x_times_kernel_transposed_for_one_and_many_rows():
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(6, 5)).astype("float32")
    for shape in ((1, 1, 5), (1, 5), (3, 4, 5)):
        x = rng.normal(size=shape).astype("float32")
        out = backend_ops.linear(ops.convert_to_tensor(x), ops.convert_to_tensor(kernel))
        np.testing.assert_allclose(ops.convert_to_numpy(out), x @ kernel.T, rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch trace graph pass")
def test_noop_casts_are_dropped_and_real_ones_kept():
    import torch

    from gemma_keras.generation.compile import _drop_noop_casts

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
