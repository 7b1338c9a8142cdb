"""Gemma self-attention: MQA, MHA or GQA by `num_key_value_heads`, optional logit soft-cap,
optional QK-norm (Gemma 3), global or sliding-window masking chosen by the caller."""

import keras
from keras import ops

from gemma_keras import keras_internals
from gemma_keras.layers import precision
from gemma_keras.layers.linear import Linear
from gemma_keras.layers.rms_norm import GemmaRMSNorm
from gemma_keras.layers.rotary import apply_rotary_embedding

# Added to masked logits in float32. Finite, so a row with nothing to attend to (a padding
# query) gives a uniform distribution instead of NaN.
_MASK_VALUE = -2.3819763e38


def attention_mask(query_positions, key_positions, sliding_window=None):
    """Which keys each query may attend to: [batch, query_len, key_len] bool.

    Positions ([batch, len] int) are absolute token positions, -1 for padding and empty cache
    slots. A key is visible when it is a real token, not in the future and, with a sliding
    window of size W, fewer than W positions back (the window includes the query itself).
    """
    q = query_positions[:, :, None]  # [batch, query_len, 1]
    k = key_positions[:, None, :]    # [batch, 1, key_len]
    visible = ops.logical_and(k >= 0, k <= q)
    if sliding_window is not None:
        visible = ops.logical_and(visible, q - k < sliding_window)
    return visible


class GemmaAttention(keras.layers.Layer):
    def __init__(self, num_query_heads, num_key_value_heads, head_dim, hidden_dim, query_scale,
                 logit_soft_cap=None, dropout=0.0, query_key_norm_epsilon=None, **kwargs):
        super().__init__(**kwargs)
        # Keras would cast every float argument to the compute dtype, the float32 RoPE tables
        # included (the bf16 position trap), and walk the cache's structure on every call.
        # Inputs arrive in the right dtypes from the backbone.
        keras_internals.keep_input_dtypes(self)
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.hidden_dim = hidden_dim
        self.query_scale = query_scale
        self.logit_soft_cap = logit_soft_cap
        self.dropout = dropout
        # Kernels [out, in] with the heads flattened (see layers/linear.py): query
        # [heads * head_dim, hidden], key/value [kv_heads * head_dim, hidden], output
        # [hidden, heads * head_dim]. keras-hub's 3-D [heads, hidden, head_dim] kernels make
        # XLA copy the weight every step (half the decode time on CPU); checkpoints are
        # converted at load/save.
        def projection(units, name):
            return Linear(units, dtype=self.dtype_policy, name=name)
        self.query = projection(num_query_heads * head_dim, "query")
        self.key = projection(num_key_value_heads * head_dim, "key")
        self.value = projection(num_key_value_heads * head_dim, "value")
        self.attention_output = projection(hidden_dim, "attention_output")
        self.dropout_layer = keras.layers.Dropout(dropout, dtype=self.dtype_policy)
        # QK-norm (Gemma 3): an RMSNorm over each head's features, its epsilon the model's;
        # None: no such norms (Gemma 1 and 2), so the parameter count stays exact.
        self.query_key_norm_epsilon = query_key_norm_epsilon
        self.query_norm = self.key_norm = None
        if query_key_norm_epsilon is not None:
            self.query_norm = GemmaRMSNorm(query_key_norm_epsilon, dtype=self.dtype_policy,
                                           name="query_norm")
            self.key_norm = GemmaRMSNorm(query_key_norm_epsilon, dtype=self.dtype_policy,
                                         name="key_norm")

    def build(self, input_shape):
        for dense in (self.query, self.key, self.value):
            dense.build(input_shape)
        for norm in (self.query_norm, self.key_norm):
            if norm is not None:
                norm.build((None, None, None, self.head_dim))
        self.attention_output.build((None, None, self.num_query_heads * self.head_dim))
        self.built = True

    def call(self, x, rope, mask, cache=None, training=False):
        """x: [batch, len, hidden]; rope: (sin, cos) of the tokens' positions from
        `rope_tables`; mask: [batch, len, keys] bool.

        Without a cache the keys are this call's tokens. With one (this layer's view,
        `layers.kv_cache.LayerCache`) the new keys and values go through `cache.update`,
        which returns what to attend over (the backbone built `mask` for the same keys).
        Returns (output [batch, len, hidden], updated (key, value) buffers or None).
        """
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        heads = (batch, length, self.num_query_heads, self.head_dim)
        kv_heads = (batch, length, self.num_key_value_heads, self.head_dim)
        query = ops.reshape(self.query(x), heads)     # [batch, len, heads, head_dim]
        key = ops.reshape(self.key(x), kv_heads)      # [batch, len, kv_heads, head_dim]
        value = ops.reshape(self.value(x), kv_heads)  # [batch, len, kv_heads, head_dim]
        if self.query_norm is not None:  # per head, before RoPE (as Gemma 3 was trained)
            query, key = self.query_norm(query), self.key_norm(key)
        query = apply_rotary_embedding(query, rope)
        key = apply_rotary_embedding(key, rope)
        written = None
        keys, values = key, value
        if cache is not None:
            (keys, values), written = cache.update(key, value)
        output = self.attend(query, keys, values, mask, training=training)
        # [batch, len, heads * head_dim] -> [batch, len, hidden]
        output = ops.reshape(output, (batch, length, self.num_query_heads * self.head_dim))
        # float32 under float16 (layers/precision.py), the compute dtype otherwise
        wide = precision.product_dtype(self.compute_dtype)
        return self.attention_output(output, out_dtype=wide), written

    def attend(self, query, key, value, mask, training=False):
        """Scaled dot-product attention over (possibly grouped) heads.

        query: [batch, q_len, heads, head_dim]; key/value: [batch, k_len, kv_heads, head_dim];
        mask: [batch, q_len, k_len] bool. Returns [batch, q_len, heads, head_dim].
        """
        batch, q_len = ops.shape(query)[0], ops.shape(query)[1]
        groups = self.num_query_heads // self.num_key_value_heads
        query = query * ops.cast(self.query_scale, query.dtype)
        # [batch, q_len, kv_heads, groups, head_dim]: query heads that share one kv head
        query = ops.reshape(
            query, (batch, q_len, self.num_key_value_heads, groups, self.head_dim))
        # [batch, kv_heads, groups, q_len, k_len]
        logits = ops.einsum("btkgh,bskh->bkgts", query, key)
        # Soft-cap, mask and softmax in float32: the cap's tanh and the normalisation lose
        # too much in bfloat16.
        logits = ops.cast(logits, "float32")
        if self.logit_soft_cap is not None:
            logits = ops.tanh(logits / self.logit_soft_cap) * self.logit_soft_cap
        logits = ops.where(mask[:, None, None, :, :], logits, _MASK_VALUE)
        probs = ops.cast(ops.softmax(logits, axis=-1), value.dtype)
        probs = self.dropout_layer(probs, training=training)
        # [batch, q_len, kv_heads, groups, head_dim]
        output = ops.einsum("bkgts,bskh->btkgh", probs, value)
        # [batch, q_len, heads, head_dim]
        return ops.reshape(output, (batch, q_len, self.num_query_heads, self.head_dim))

    def get_config(self):
        return {**super().get_config(), "num_query_heads": self.num_query_heads,
                "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
                "hidden_dim": self.hidden_dim, "query_scale": self.query_scale,
                "logit_soft_cap": self.logit_soft_cap,
                "dropout": self.dropout, "query_key_norm_epsilon": self.query_key_norm_epsilon}
