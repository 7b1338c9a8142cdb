"""One Gemma transformer layer: pre-norm attention and GeGLU, each optionally post-normed
(Gemma 2), each added back to the residual stream."""

import keras
from keras import ops

from gemma_keras import keras_internals
from gemma_keras.config import GemmaConfig
from gemma_keras.layers import precision
from gemma_keras.layers.attention import GemmaAttention
from gemma_keras.layers.feedforward import GemmaFeedForward
from gemma_keras.layers.rms_norm import GemmaRMSNorm


class GemmaDecoderBlock(keras.layers.Layer):
    def __init__(self, config, layer_index, **kwargs):
        super().__init__(**kwargs)
        # Keras would cast every float argument to the compute dtype, the float32 RoPE tables
        # included (the bf16 position trap), and walk the cache's structure on every call.
        # Inputs arrive in the right dtypes from the backbone.
        keras_internals.keep_input_dtypes(self)
        self.config = config
        self.layer_index = layer_index
        eps, policy = config.layer_norm_epsilon, self.dtype_policy
        self.pre_attention_norm = GemmaRMSNorm(eps, dtype=policy, name="pre_attention_norm")
        self.attention = GemmaAttention(
            num_query_heads=config.num_query_heads,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            hidden_dim=config.hidden_dim,
            query_scale=config.query_scale,
            logit_soft_cap=config.attention_logit_soft_cap,
            dropout=config.dropout,
            query_key_norm_epsilon=eps if config.use_query_key_norm else None,
            dtype=policy,
            name="attention")
        self.pre_ffw_norm = GemmaRMSNorm(eps, dtype=policy, name="pre_ffw_norm")
        self.ffw = GemmaFeedForward(config.hidden_dim, config.ffn_branch_dim, dtype=policy,
                                    name="ffw")
        # Post-norms exist only where the config has them, so the parameter count is exact.
        self.post_attention_norm = (
            GemmaRMSNorm(eps, dtype=policy, name="post_attention_norm")
            if config.use_post_attention_norm else None)
        self.post_ffw_norm = (
            GemmaRMSNorm(eps, dtype=policy, name="post_ffw_norm")
            if config.use_post_ffw_norm else None)
        self.residual_dropout = keras.layers.Dropout(config.dropout, dtype=policy)
        # It sees the residual branch, float32 under float16 (layers/precision.py): no cast.
        keras_internals.keep_input_dtypes(self.residual_dropout)

    def build(self, input_shape):
        for layer in (self.pre_attention_norm, self.attention, self.pre_ffw_norm, self.ffw,
                      self.post_attention_norm, self.post_ffw_norm):
            if layer is not None:
                layer.build(input_shape)
        self.built = True

    def call(self, x, rope, mask, cache=None, training=False):
        """x: [batch, len, hidden], the residual stream (float32 under float16, the compute
        dtype otherwise: layers/precision.py); mask: [batch, len, keys] bool for this layer's
        attention kind; `cache` this layer's view of the KV cache or None. Returns (x, this
        layer's updated (key, value) buffers or None)."""
        residual = precision.residual_dtype(self.compute_dtype)
        h, cache = self.attention(self.pre_attention_norm(x), rope, mask, cache=cache,
                                  training=training)
        if self.post_attention_norm is not None:
            h = self.post_attention_norm(h, dtype=residual)
        x = x + ops.cast(self.residual_dropout(h, training=training), residual)
        h = self.ffw(self.pre_ffw_norm(x))
        if self.post_ffw_norm is not None:
            h = self.post_ffw_norm(h, dtype=residual)
        return x + ops.cast(self.residual_dropout(h, training=training), residual), cache

    def get_config(self):
        return {**super().get_config(), "layer_index": self.layer_index,
                "config": self.config.to_dict()}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(GemmaConfig.from_dict(config.pop("config")), **config)
