"""Scaling Gemma over several devices with `keras.distribution` (JAX).

    mesh = keras.distribution.DeviceMesh((1, 8), ["batch", "model"],
                                         devices=keras.distribution.list_devices())
    keras.distribution.set_distribution(gk.model_parallel(mesh))
    lm = gk.GemmaCausalLM.from_preset("gemma2_27b_en", dtype="bfloat16")  # loads into shards

JAX's partitioner does the work: this module only says where each weight lives, the
`LayoutMap`; XLA then inserts the collectives. The split is Megatron's, in our [out, in]
kernel layout (layers/linear.py):

- query / key / value and both GeGLU input branches are *column parallel*: their output axis
  (axis 0, the heads or FFN units) is split over "model", so each device computes its own
  heads / FFN units from the replicated residual stream, with no communication;
- attention_output and ffw_linear are *row parallel*: their input axis (axis 1) is split, so
  each device contracts its own heads / units and one all-reduce per block sums the parts;
- the embedding [vocab, hidden] is split on *vocab*. The tied head `hidden @ table^T` is
  then column parallel too: each device computes its slice of the logits (the largest
  product of the model) without an all-reduce of the [batch, seq, vocab] result, which the
  hidden split would need; the input lookup becomes a local masked gather plus one
  all-reduce of [batch, seq, hidden], much smaller than the logits;
- LoRA adapters follow their kernel: y += x @ B^T @ A^T with A [out, rank], B [rank, in].
  For a column-parallel kernel A is split on out and B replicated; for a row-parallel one
  B is split on in (x arrives split there) and A replicated. The rank axis is never split;
- norm scales, and anything not named here, are replicated.

Weights are replicated over "batch"; batches are split over it (Keras' trainer does that for
`fit`, the KV cache's own sharding hook for the cache, by `cache_layout`).

Heads that do not divide the model axis: a kernel is split by rows whenever its axis divides
the mesh axis, even when that splits a head (Gemma 2B's single kv head, 256 rows, is cut into
8 x 32 rows of head_dim). That is still exact: XLA adds the collectives RoPE and q.k then need,
on tensors of one head. A weight whose axis does not divide the mesh axis is replicated
instead of failing (`GemmaModelParallel.get_variable_layout`).
"""

from __future__ import annotations

import keras

from gemma_keras.errors import ConfigError

# Variable path pattern (re.fullmatch against `variable.path`) -> (axis of that variable
# split over "model", or None). Paths as `[v.path for v in backbone.weights]` prints them.
_COLUMN = r"(query|key|value|ffw_gating|ffw_gating_2)"
_ROW = r"(attention_output|ffw_linear)"
MODEL_AXIS = {
    r"token_embedding/embeddings": 0,                    # [vocab, hidden]: vocab
    rf".*/{_COLUMN}/kernel": 0,                          # [out, in]: out
    rf".*/{_ROW}/kernel": 1,                             # [out, in]: in
    rf".*/{_COLUMN}/lora_kernel_a": 0,                   # [out, rank]: out
    rf".*/{_COLUMN}/lora_kernel_b": None,                # [rank, in]: replicated
    rf".*/{_ROW}/lora_kernel_a": None,                   # [out, rank]: replicated
    rf".*/{_ROW}/lora_kernel_b": 1,                      # [rank, in]: in
}


def _require_jax(what):
    backend = keras.backend.backend()
    if backend != "jax":
        raise ConfigError(
            f"gemma_keras.{what} needs the JAX backend (KERAS_BACKEND=jax); this process runs "
            f"{backend!r}. Keras' distribution API partitions models only on JAX. Set "
            "KERAS_BACKEND=jax before importing keras, or on this backend train on one device "
            "(TensorFlow: tf.distribute.MirroredStrategy around a plain fit is not wired "
            "into gemma_keras).")


def _as_mesh(mesh, axis_names):
    """A DeviceMesh from a DeviceMesh or a shape tuple (over every device)."""
    if isinstance(mesh, keras.distribution.DeviceMesh):
        return mesh
    return keras.distribution.DeviceMesh(
        tuple(mesh), list(axis_names), devices=keras.distribution.list_devices())


def layout_map(mesh, model_dim="model"):
    """The `keras.distribution.LayoutMap` of every Gemma variant's weights on `mesh`."""
    layouts = keras.distribution.LayoutMap(mesh)
    for pattern, axis in MODEL_AXIS.items():
        # Every layout here is 2-D; the replicated entries are written out so that the map
        # says something about every weight it knows.
        spec = [None, None]
        if axis is not None:
            spec[axis] = model_dim
        layouts[pattern] = tuple(spec)
    return layouts


class GemmaModelParallel(keras.distribution.ModelParallel):
    """Keras' ModelParallel with one change: a weight whose split axis does not divide its
    mesh axis (a vocabulary of 256,001, 4 kv heads on 8 devices with odd head_dim) is
    replicated rather than refused by JAX."""

    def get_variable_layout(self, variable):
        layout = super().get_variable_layout(variable)
        sizes = dict(zip(self.device_mesh.axis_names, self.device_mesh.shape))
        axes = tuple(layout.axes)
        if len(axes) != len(variable.shape):
            # A quantized or reshaped variable under a 2-D pattern: replicate it.
            return keras.distribution.TensorLayout([None] * len(variable.shape),
                                                   self.device_mesh)
        if all(a is None or dim % sizes[a] == 0 for a, dim in zip(axes, variable.shape)):
            return layout
        return keras.distribution.TensorLayout([None] * len(variable.shape), self.device_mesh)


def model_parallel(mesh, batch_dim="batch", model_dim="model"):
    """A `keras.distribution.ModelParallel` for Gemma on `mesh`: pass it to
    `keras.distribution.set_distribution` before building or loading the model.

    mesh: a `keras.distribution.DeviceMesh` with a `batch_dim` and a `model_dim` axis (either
        may be 1), or its shape, e.g. (2, 4) over every device. (1, n) is pure tensor
        parallelism, (n, 1) pure data parallelism with replicated weights.
    """
    _require_jax("model_parallel")
    mesh = _as_mesh(mesh, (batch_dim, model_dim))
    missing = [d for d in (batch_dim, model_dim) if d not in mesh.axis_names]
    if missing:
        raise ConfigError(
            f"The mesh has axes {list(mesh.axis_names)}, but model_parallel needs "
            f"{batch_dim!r} and {model_dim!r} (missing {missing}). Name them, e.g. "
            f"DeviceMesh((1, 8), [{batch_dim!r}, {model_dim!r}]), or pass batch_dim= / "
            "model_dim=; an axis may have size 1.")
    return GemmaModelParallel(layout_map=layout_map(mesh, model_dim), batch_dim_name=batch_dim)


def data_parallel(devices=None):
    """`keras.distribution.DataParallel` over `devices` (default: all): weights replicated,
    batches split. For a model that fits one device."""
    _require_jax("data_parallel")
    return keras.distribution.DataParallel(
        devices=devices if devices is not None else keras.distribution.list_devices())


def cache_layout(shape, distribution=None):
    """The TensorLayout of a KV-cache buffer under `distribution` (default: the active one),
    or None when there is none. key/value [batch, slots, kv_heads, head_dim] split kv_heads
    over the model axis (as the key/value projections split them; head_dim for a single kv
    head) and batch over the batch axis; positions [batch, slots] split batch. An axis that
    does not divide is replicated: e.g. a batch of 1 on a data axis of 8."""
    distribution = distribution or keras.distribution.distribution()
    if distribution is None:
        return None
    mesh = distribution.device_mesh
    sizes = dict(zip(mesh.axis_names, mesh.shape))
    model_dim = _model_dim(distribution)
    spec = [None] * len(shape)
    batch_dim = distribution.batch_dim_name
    if batch_dim in sizes and shape[0] % sizes[batch_dim] == 0:
        spec[0] = batch_dim
    if len(shape) == 4 and model_dim is not None:
        kv_heads, head_dim = shape[2], shape[3]
        if kv_heads % sizes[model_dim] == 0:
            spec[2] = model_dim
        elif kv_heads == 1 and head_dim % sizes[model_dim] == 0:
            # One kv head (Gemma 2B): the key/value kernels' rows are that head's head_dim,
            # split over the model axis, so the new keys arrive split on head_dim; the cache
            # keeps them so (8x smaller per device on 8, no gather per step).
            spec[3] = model_dim
    return keras.distribution.TensorLayout(spec, mesh)


def _model_dim(distribution):
    """The mesh axis the weights are split over, or None (data parallel)."""
    layouts = getattr(distribution, "_layout_map", None)
    if layouts is None:
        return None
    for key in layouts:
        for axis in layouts[key].axes:
            if axis is not None:
                return axis
    return None
