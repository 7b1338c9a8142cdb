"""A projection whose kernel is stored [out, in], PyTorch's nn.Linear layout."""

import keras
from keras import ops

from gemma_keras import backends, keras_internals, quantization


def drop_variable(layer, name):
    """`del layer.<name>` for a variable attribute, without the full gc.collect() Keras'
    Layer.__delattr__ runs for every variable it drops.

    Why: quantize() drops each float kernel (and the table, chunk by chunk), disable_lora()
    two adapters per layer; with the three backends imported a collection costs ~0.5-1 s,
    so quantizing or merging a model spent minutes collecting (104 s of the JAX test
    suite's 267 s in-process CPU, profiled with py-spy). Dropping the last reference frees
    the buffer just the same: untrack it as Keras does, then skip to the backend layer's own
    __delattr__ (torch.nn.Module's on torch)."""
    keras_internals.untrack_variable(layer, getattr(layer, name))
    super(keras.layers.Layer, layer).__delattr__(name)


def own_variables(layer):
    """What Keras' `save_own_variables` writes for `layer` ("0", "1", ...: kernel, scale,
    ...), LoRA adapters merged into quantized kernels as Keras merges them when saving."""
    store = {}
    layer.save_own_variables(store)
    return store


class DropsVariablesQuietly:
    """Mixin (before the Keras layer class): `del self.<variable>` goes to `drop_variable`."""

    def __delattr__(self, name):
        if isinstance(getattr(self, name, None), keras.Variable):
            drop_variable(self, name)
        else:
            super().__delattr__(name)


class Linear(DropsVariablesQuietly, keras.layers.EinsumDense):
    """y = x @ kernel^T for x [batch, len, in] and kernel [out, in].

    Why [out, in]: decoding is one matrix-vector product per weight, and on every backend's
    CPU path the product that reads each output's row contiguously is the fast one (measured
    on the benchmark model's weights: XLA 19 vs 22 ms per step, TF-XLA 24.5 vs 27.5, torch
    oneDNN 21 vs 31 for `x @ W[in, out]`). It is also how HF checkpoints store the weights,
    so they load without a transpose.

    An EinsumDense underneath, so Keras' `enable_lora`, `quantize` and serialisation apply
    unchanged. Keras' LoRA factors the kernel as kernel + (alpha / rank) * A @ B, here
    A [out, rank] and B [rank, in]; instead of materialising that full-size sum on every call
    (as EinsumDense does), the adapter is applied as two thin products, x @ B^T @ A^T.
    """

    def __init__(self, units, **kwargs):
        kwargs.pop("equation", None)
        kwargs.pop("output_shape", None)
        super().__init__("btd,fd->btf", output_shape=(None, units), **kwargs)
        self.units = units

    def call(self, inputs, training=None, out_dtype=None):
        """out_dtype: a wider result than the compute dtype (float32 for float16 operands,
        see layers/precision.py); None: the compute dtype."""
        outputs = backends.get().linear(inputs, self._kernel, out_dtype)
        return self._with_adapter(inputs, outputs)

    def quantized_call(self, inputs, training=None, out_dtype=None):
        if self.quantization_mode == "int8":
            # Weight-only (x stays in the compute dtype): see backends' int8_linear.
            outputs = backends.get().int8_linear(inputs, self._kernel, self.kernel_scale,
                                                 out_dtype)
        elif self._own_int4:
            outputs = backends.get().int4_linear(inputs, self._kernel, self.kernel_scale,
                                                 self.kernel_zero, out_dtype)
        else:
            # Keras' own int4 (per channel, or groups that straddle our layout's halves).
            # Its quantized calls add LoRA with `einsum(equation, x, A)`, which assumes the
            # kernel's last axis is the output; ours is the input. Run them without the
            # adapter (the attribute is only read at trace time) and add it here.
            lora_enabled, self.lora_enabled = self.lora_enabled, False
            try:
                outputs = super().quantized_call(inputs, training=training)
            finally:
                self.lora_enabled = lora_enabled
        return self._with_adapter(inputs, ops.cast(outputs, out_dtype or self.compute_dtype))

    # ---- int4 in gemma_keras.quantization's layout ----------------------------------------
    @property
    def _own_int4(self):
        return self.quantization_mode == "int4" and getattr(self, "_int4_own_layout", False)

    def _int4_build(self, kernel_shape, config=None):
        out_features, in_features = kernel_shape
        block_size = quantization.int4_group(in_features,
                                             keras_internals.int4_block_size(self, config))
        if block_size is None:  # an odd width: Keras' own int4
            self._int4_own_layout = False
            return super()._int4_build(kernel_shape, config)
        self._set_quantization_info()
        self._int4_own_layout = True
        self._int4_block_size = block_size  # the group this layer uses (see int4_group)
        self.inputs_quantizer = None
        self.original_kernel_shape = tuple(kernel_shape)  # what LoRA adapters are shaped by
        groups = in_features // block_size
        self._kernel = self.add_weight(name="kernel", shape=(out_features, in_features // 2),
                                       initializer="zeros", dtype="int8", trainable=False)
        self.kernel_scale = self.add_weight(name="kernel_scale", shape=(out_features, groups),
                                            initializer="ones", trainable=False)
        self.kernel_zero = self.add_weight(name="kernel_zero", shape=(out_features, groups),
                                           initializer="zeros", dtype="int8", trainable=False)

    def _int4_arrays(self, kernel, block_size):
        """float kernel [out, in] -> this layout's (kernel, scale, zero) NumPy arrays."""
        return quantization.quantize_int4(ops.convert_to_numpy(kernel), block_size)

    def _int4_dequantized(self):
        """The float32 kernel [out, in] the int4 weights stand for."""
        return quantization.dequantize_int4(*(ops.convert_to_numpy(v) for v in (
            self._kernel, self.kernel_scale, self.kernel_zero)))

    def _get_kernel_with_merged_lora(self):
        # What Keras' save_own_variables writes: for our int4, the adapter folded in and
        # quantized again in the same layout.
        if not self._own_int4:
            return super()._get_kernel_with_merged_lora()
        if not self.lora_enabled:
            return self._kernel, self.kernel_scale, self.kernel_zero
        return self._int4_arrays(self._merged_float_kernel(self._int4_dequantized()),
                                 self._int4_block_size)

    def _merged_float_kernel(self, base):
        delta = ops.matmul(self.lora_kernel_a, self.lora_kernel_b)  # [out, in]
        return ops.cast(base, "float32") + delta * (self.lora_alpha / self.lora_rank)

    def _with_adapter(self, inputs, outputs):
        if not self.lora_enabled:
            return outputs
        # In float32, as the adapter weights: a bfloat16 low-rank path would round away
        # small updates. [batch, len, in] -> [batch, len, rank] -> [batch, len, out]
        x = ops.cast(inputs, "float32")
        linear = backends.get().linear
        delta = linear(linear(x, self.lora_kernel_b), self.lora_kernel_a)
        delta = delta * (self.lora_alpha / self.lora_rank)
        return ops.add(outputs, ops.cast(delta, outputs.dtype))

    def merge_lora(self):
        """Folds the adapter into the kernel and removes it: the layer is plain again.
        Quantized kernels are re-quantized with the adapter folded in (lossy, as Keras does
        when it saves a quantized LoRA layer)."""
        if not self.lora_enabled:
            return
        if self.quantization_mode is None:
            self._kernel.assign(self.merged_kernel())
        elif self._own_int4:
            for variable, value in zip((self._kernel, self.kernel_scale, self.kernel_zero),
                                       self._get_kernel_with_merged_lora()):
                variable.assign(value)
        else:
            kernel, scale, _ = self._get_kernel_with_merged_lora()
            self._kernel.assign(kernel)
            self.kernel_scale.assign(scale)
        self.disable_lora()

    def merged_kernel(self):
        """The float kernel with the adapter folded in, in the kernel's dtype: [out, in]."""
        return ops.cast(self._merged_float_kernel(self._kernel), self._kernel.dtype)

    def disable_lora(self):
        """Drops the adapter without folding it in."""
        if not self.lora_enabled:
            return
        del self.lora_kernel_a  # Keras untracks a variable attribute when it is deleted
        del self.lora_kernel_b
        self.lora_enabled = False
        self.lora_rank = None
        self.lora_alpha = None
        if self.quantization_mode is None:  # integer tensors cannot require gradients
            self._kernel.trainable = self.trainable

    def quantize(self, mode=None, type_check=True, config=None):
        # Keras refuses to quantize EinsumDense subclasses (their call may differ); ours
        # hands every other quantized call to EinsumDense's own, so its quantization is
        # exact here.
        if mode != "int4":
            return super().quantize(mode, type_check=False, config=config)
        requested = keras_internals.int4_block_size(self, config)
        block_size = quantization.int4_group(self._kernel.shape[1], requested)
        if block_size is None:
            return super().quantize(mode, type_check=False, config=config)
        arrays = self._int4_arrays(self._kernel, block_size)
        self.quantization_config = config
        del self._kernel
        self.quantized_build(tuple(arrays[0].shape[:1]) + (arrays[0].shape[1] * 2,), mode,
                             config)
        for variable, value in zip((self._kernel, self.kernel_scale, self.kernel_zero),
                                   arrays):
            variable.assign(value)
        if self.dtype_policy.quantization_mode is None:
            # The block size asked for: building from this policy gives the same group.
            requested = -1 if requested is None else requested
            self.dtype_policy = keras.dtype_policies.get(
                f"int4/{requested}_from_{self.dtype_policy.name}")

    def get_config(self):
        config = super().get_config()
        for key in ("equation", "output_shape"):
            config.pop(key, None)
        return {**config, "units": self.units}
