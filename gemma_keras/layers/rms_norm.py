"""Gemma's RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + scale), always computed in float32."""

import keras
from keras import ops

from gemma_keras import keras_internals


class GemmaRMSNorm(keras.layers.Layer):
    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        # Keras would cast the input to the compute dtype first: under float16 the float32
        # residual stream (layers/precision.py) would overflow before it is normalised.
        keras_internals.keep_input_dtypes(self)
        self.epsilon = epsilon
        # Stored as an offset from 1 (the checkpoints' convention), so zeros is the identity.
        self.scale_initializer = keras.initializers.Zeros()

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale", shape=(input_shape[-1],), initializer=self.scale_initializer)
        self.built = True

    def call(self, x, dtype=None):
        """x: [..., dim] in any float dtype -> normalised, in `dtype` (default: the compute
        dtype; the post-norms of a float16 model ask for float32, layers/precision.py)."""
        # float32 whatever the compute dtype: bf16 mean-of-squares loses the small activations,
        # and both reference implementations upcast here.
        # keras.ops.rms_normalization is that formula on JAX / TensorFlow and torch's fused
        # rms_norm on torch (one traced op instead of seven; same logits here, no measurable
        # speed difference in a decode step).
        x = ops.rms_normalization(ops.cast(x, "float32"),
                                  scale=1.0 + ops.cast(self.scale, "float32"), axis=-1,
                                  epsilon=self.epsilon)
        return ops.cast(x, dtype or self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
