"""GeGLU feed-forward: down(gelu_tanh(gate(x)) * up(x))."""

import keras

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
        # The tanh approximation is what Gemma was trained with; some early HF configs say
        # "gelu" (exact), which is wrong for these weights.
        gate = keras.activations.gelu(self.gating(x), approximate=True)  # [batch, seq, branch]
        return self.linear(gate * self.gating_2(x))  # [batch, seq, hidden]

    def get_config(self):
        return {**super().get_config(), "hidden_dim": self.hidden_dim,
                "branch_dim": self.branch_dim}
