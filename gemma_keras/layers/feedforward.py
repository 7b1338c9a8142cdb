"""GeGLU feed-forward: down(gelu_tanh(gate(x)) * up(x))."""

import keras

from gemma_keras.layers import precision
from gemma_keras.layers.linear import Linear


class GemmaFeedForward(keras.layers.Layer):
    def __init__(self, hidden_dim, branch_dim, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.branch_dim = branch_dim
        # Kernels [out, in]: gating/gating_2 [branch, hidden], linear [hidden, branch].
        self.gating = Linear(branch_dim, dtype=self.dtype_policy, name="ffw_gating")
        self.gating_2 = Linear(branch_dim, dtype=self.dtype_policy, name="ffw_gating_2")
        self.linear = Linear(hidden_dim, dtype=self.dtype_policy, name="ffw_linear")

    def build(self, input_shape):
        self.gating.build(input_shape)
        self.gating_2.build(input_shape)
        self.linear.build((None, None, self.branch_dim))
        self.built = True

    def call(self, x):
        """x [batch, seq, hidden] in the compute dtype -> [batch, seq, hidden], float32 under
        float16 (precision.product_dtype; the intermediate is where activations spike)."""
        wide = precision.product_dtype(self.compute_dtype)
        # The tanh approximation is what Gemma was trained with; some early HF configs say
        # "gelu" (exact), which is wrong for these weights.
        gate = keras.activations.gelu(self.gating(x, out_dtype=wide), approximate=True)
        hidden = gate * self.gating_2(x, out_dtype=wide)  # [batch, seq, branch]
        return precision.scaled_product(self.linear, hidden, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "hidden_dim": self.hidden_dim,
                "branch_dim": self.branch_dim}
