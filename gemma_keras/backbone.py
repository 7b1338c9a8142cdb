"""GemmaBackbone: token embedding, the decoder stack and the final norm."""

import keras
from keras import ops

from gemma_keras.config import GemmaConfig
from gemma_keras.layers.attention import attention_mask
from gemma_keras.layers.decoder_block import GemmaDecoderBlock
from gemma_keras.layers.rms_norm import GemmaRMSNorm


class GemmaBackbone(keras.Model):
    """The Gemma transformer. Takes `{"token_ids", "padding_mask"}` ([batch, seq] each) and
    returns the final hidden states [batch, seq, hidden].

    Build it from a `GemmaConfig` or from keras-hub's `GemmaBackbone` keyword arguments:
    `GemmaBackbone(config)` or `GemmaBackbone(vocabulary_size=..., num_layers=..., ...)`.
    """

    def __init__(self, config=None, dtype=None, name="gemma_backbone", checkpoint=None,
                 **config_kwargs):
        if config is None:
            config = GemmaConfig(**config_kwargs)
        elif config_kwargs:
            raise TypeError("Pass either a GemmaConfig or keyword arguments, not both.")
        super().__init__(dtype=dtype, name=name)
        self.config = config
        policy = self.dtype_policy
        self.token_embedding = keras.layers.ReversibleEmbedding(
            config.vocabulary_size, config.hidden_dim, tie_weights=True,
            embeddings_initializer=keras.initializers.VarianceScaling(
                1.0, mode="fan_in", distribution="untruncated_normal"),
            logit_soft_cap=config.final_logit_soft_cap,
            dtype=policy, name="token_embedding")
        self.transformer_layers = [
            GemmaDecoderBlock(config, i, dtype=policy, name=f"decoder_block_{i}")
            for i in range(config.num_layers)]
        self.final_normalization = GemmaRMSNorm(
            config.layer_norm_epsilon, dtype=policy, name="final_normalization")
        self.build_weights(checkpoint)

    def build_weights(self, checkpoint=None):
        """Creates every variable now, so the model is usable before any call.

        checkpoint: optional `(reader, source)` from gemma_keras.checkpoints; each variable is
        then created directly from its checkpoint tensor (never random, never a zero copy
        overwritten later), which keeps a load's peak memory near one model.
        """
        from gemma_keras.checkpoints import weights

        if checkpoint is not None:
            weights.install_checkpoint(self, *checkpoint)
        shape = (None, None, self.config.hidden_dim)
        self.token_embedding.build((None, None))
        for block in self.transformer_layers:
            block.build(shape)
        self.final_normalization.build(shape)
        self.built = True
        if checkpoint is not None:
            weights.release_checkpoint(self)

    @property
    def hidden_dim(self):
        return self.config.hidden_dim

    def embed(self, token_ids):
        x = self.token_embedding(token_ids)  # [batch, seq, hidden]
        # The normaliser is cast to the compute dtype *before* multiplying: in bfloat16
        # sqrt(3072) becomes 55.5, and the checkpoints were trained with that rounding.
        return x * ops.cast(self.config.hidden_dim ** 0.5, x.dtype)

    def call(self, inputs, training=False):
        token_ids = inputs["token_ids"]  # [batch, seq]
        padding_mask = inputs.get("padding_mask")
        if padding_mask is None:
            padding_mask = ops.ones_like(token_ids)
        batch, seq = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        # [batch, seq] positions 0..seq-1. RoPE only sees position differences, so this
        # is exact for left padding as well as right padding.
        positions = ops.broadcast_to(ops.arange(seq, dtype="int32")[None, :], (batch, seq))
        global_mask = attention_mask(padding_mask, positions, positions)
        local_mask = (attention_mask(padding_mask, positions, positions,
                                     self.config.sliding_window_size)
                      if self.config.use_sliding_window_attention else global_mask)
        x = self.embed(token_ids)
        for block in self.transformer_layers:
            x = block(x, positions, global_mask, local_mask, training=training)
        return self.final_normalization(x)  # [batch, seq, hidden]

    def get_config(self):
        return {"config": self.config.to_dict(), "name": self.name,
                "dtype": self.dtype_policy.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(GemmaConfig.from_dict(config.pop("config")), **config)
