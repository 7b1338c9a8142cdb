"""GemmaBackbone: token embedding, the decoder stack and the final norm."""

import keras
from keras import ops

from gemma_keras import backends, keras_internals, quantization
from gemma_keras.backends.common import int4_nibbles
from gemma_keras.checkpoints import quantizing
from gemma_keras.config import GemmaConfig
from gemma_keras.layers.kv_cache import CacheUpdate
from gemma_keras.layers import precision
from gemma_keras.layers.attention import attention_mask
from gemma_keras.layers.decoder_block import GemmaDecoderBlock
from gemma_keras.layers.rms_norm import GemmaRMSNorm
from gemma_keras.layers.rotary import rope_tables


class GemmaBackbone(keras.Model):
    """The Gemma transformer. Takes `{"token_ids", "padding_mask"}` ([batch, seq] each) and
    returns the final hidden states [batch, seq, hidden].

    Build it from a `GemmaConfig` or from keras-hub's `GemmaBackbone` keyword arguments:
    `GemmaBackbone(config)` or `GemmaBackbone(vocabulary_size=..., num_layers=..., ...)`.
    """

    def __init__(self, config=None, dtype=None, name="gemma_backbone", build_now=True,
                 **config_kwargs):
        """build_now=False leaves the variables to `build_weights()`, for a loader that first
        points each layer's initializer at its checkpoint tensor
        (`checkpoints.weights.backbone_from_checkpoint`)."""
        if config is None:
            config = GemmaConfig(**config_kwargs)
        elif config_kwargs:
            raise TypeError("Pass either a GemmaConfig or keyword arguments, not both.")
        super().__init__(dtype=dtype, name=name)
        self.config = config
        # Recompute each decoder block in the backward pass instead of keeping its
        # activations (less memory for long sequences, about one more forward of compute).
        self.gradient_checkpointing = False
        policy = self.dtype_policy
        self.token_embedding = keras.layers.ReversibleEmbedding(
            config.vocabulary_size, config.hidden_dim, tie_weights=True,
            embeddings_initializer=keras.initializers.VarianceScaling(
                1.0, mode="fan_in", distribution="untruncated_normal"),
            dtype=policy, name="token_embedding")
        self.transformer_layers = [
            GemmaDecoderBlock(config, i, dtype=policy, name=f"decoder_block_{i}")
            for i in range(config.num_layers)]
        self.final_normalization = GemmaRMSNorm(
            config.layer_norm_epsilon, dtype=policy, name="final_normalization")
        if build_now:
            self.build_weights()

    def build_weights(self):
        """Creates every variable now, so the model is usable before any call; each from its
        layer's initializer (a checkpoint tensor when a loader has set them)."""
        shape = (None, None, self.config.hidden_dim)
        self.token_embedding.build((None, None))
        for block in self.transformer_layers:
            block.build(shape)
        self.final_normalization.build(shape)
        self.built = True

    # ---- LoRA and rematerialisation (transformations of the built model) ------------------
    def enable_lora(self, rank, alpha=None, target_names=("query", "value")):
        """Freezes every weight and adds trainable rank-`rank` adapters to the projections
        named in `target_names` ("query", "key", "value", "attention_output", "ffw_gating",
        "ffw_gating_2", "ffw_linear"); alpha / rank scales them (alpha defaults to rank)."""
        from gemma_keras import lora

        lora.enable_lora(self, rank, alpha=alpha, target_names=target_names)

    def save_lora_weights(self, path, overwrite=False):
        from gemma_keras import lora

        lora.save_lora_weights(self, path, overwrite=overwrite)

    def load_lora_weights(self, path):
        from gemma_keras import lora

        lora.load_lora_weights(self, path)

    def merge_lora(self):
        from gemma_keras import lora

        lora.merge_lora(self)

    def embed(self, token_ids, layer_intercept_fn=None):
        """[batch, seq] ids -> [batch, seq, hidden] scaled embeddings. `layer_intercept_fn`
        (see `call`) sees the looked-up rows before the scale, at index -1."""
        embedding = self.token_embedding
        if _int4_table_fits(embedding) and not embedding.lora_enabled:
            # Keras' int4 lookup unpacks the whole table before taking rows (at every
            # decode step: 78% of the benchmark model's int4 step on torch); take the
            # packed rows, then unpack those.
            x = _int4_rows(embedding, token_ids)
        else:
            x = embedding(token_ids)  # [batch, seq, hidden]
        if layer_intercept_fn is not None:
            x = layer_intercept_fn(x, -1)
        # The normaliser is cast to the compute dtype *before* multiplying: in bfloat16
        # sqrt(3072) becomes 55.5, and the checkpoints were trained with that rounding.
        # The product is the residual stream: float32 under float16 (layers/precision.py).
        normaliser = ops.cast(self.config.hidden_dim ** 0.5, x.dtype)
        residual = precision.residual_dtype(x.dtype)
        return ops.cast(x, residual) * ops.cast(normaliser, residual)

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Keras' `Model.quantize`, its loop offered only the layers with a `quantize()` of
        their own (`quantizing.has_quantize`): Keras warns once for every other leaf (the
        norms, dropout) and quantizes the same layers. `GemmaCausalLM.quantize` does the same
        for the whole model (with gemma_keras's defaults)."""
        given = filters

        def offered(layer):
            return (quantizing.has_quantize(layer)
                    and keras_internals.quantize_filter(layer, given))

        super().quantize(mode, config=config, filters=offered, **kwargs)

    def logits(self, hidden):
        """The tied output head with Gemma 2's final soft-cap: [batch, len, hidden] ->
        [batch, len, vocab] in the compute dtype (the cap itself in float32)."""
        # The table [vocab, hidden] is a kernel in [out, in] layout: same product as the
        # projections, which reads it row by row when decoding (no transposed copy).
        embedding = self.token_embedding
        if embedding.quantization_mode is None:
            logits = backends.get().linear(hidden, embedding.embeddings)
        elif embedding.quantization_mode == "int8":
            # Weight-only, as the projections: the table is [out, in] for the head too.
            logits = backends.get().int8_linear(
                hidden, keras_internals.embedding_table(embedding), embedding.embeddings_scale)
        elif _int4_table_fits(embedding):
            # Keras' grouped int4 table is gemma_keras.quantization's layout: the fused
            # product of the projections reads it as it is.
            logits = backends.get().int4_linear(
                hidden, keras_internals.embedding_table(embedding), embedding.embeddings_scale,
                embedding.embeddings_zero)
        else:  # per-channel int4: Keras' own reverse path dequantizes the table
            logits = embedding(hidden, reverse=True)
        cap = self.config.final_logit_soft_cap
        if cap is None:
            return logits
        capped = ops.tanh(ops.cast(logits, "float32") / cap) * cap
        return ops.cast(capped, logits.dtype)

    def call(self, inputs, training=False, cache=None, start=0, mode=None,
             layer_intercept_fn=None):
        """inputs: {"token_ids": [batch, len], "padding_mask": [batch, len]} and optionally
        "positions" [batch, len] (absolute positions, -1 for padding; derived from the padding
        mask when absent, so left and right padding are both exact).

        Without `cache` returns hidden states [batch, len, hidden]. With a cache from
        `gemma_keras.layers.kv_cache.init_cache`, the tokens are columns start.. of the stream
        and `mode` (a `layers.kv_cache.Mode`) says how they use it; returns (hidden, updated
        cache). Training, prefill, decode and chunked prefill all run through this one path.
        """
        token_ids = inputs["token_ids"]  # [batch, len]
        positions = inputs.get("positions")
        if positions is None:
            positions = positions_from_mask(inputs.get("padding_mask"), token_ids)
        config = self.config
        update = None
        if cache is None:
            key_positions = {kind: positions for kind in config.attention_kinds}
        else:
            update = CacheUpdate(config, cache, positions, start, mode)
            key_positions = update.key_positions
        # [batch, len, keys] bool per attention kind
        masks = {kind: attention_mask(positions, keys, config.attention_window(kind))
                 for kind, keys in key_positions.items()}
        # (sin, cos) per attention kind; kinds with the same RoPE share one table (Gemma 1
        # and 2: one for every layer; Gemma 3: base and scaling differ by kind).
        tables, ropes = {}, {}
        for kind in config.attention_kinds:
            if config.rope(kind) not in tables:
                tables[config.rope(kind)] = rope_tables(positions, config.head_dim,
                                                        *config.rope(kind))
            ropes[kind] = tables[config.rope(kind)]
        x = self.embed(token_ids, layer_intercept_fn)
        for i, block in enumerate(self.transformer_layers):
            kind = config.attention_kind(i)
            mask, rope = masks[kind], ropes[kind]
            if update is not None:
                x, written = block(x, rope, mask, cache=update.layer(i), training=training)
                update.store(i, written)
            elif training and self.gradient_checkpointing:
                x = backends.get().remat(
                    lambda h, block=block, mask=mask: block(h, rope, mask, training=training)[0])(x)
            else:
                x, _ = block(x, rope, mask, training=training)
            if layer_intercept_fn is not None:
                x = layer_intercept_fn(x, i)
        x = self.final_normalization(x)  # [batch, len, hidden]
        if update is None:
            return x
        return x, update.result()

    def get_config(self):
        return {"config": self.config.to_dict(), "name": self.name,
                "dtype": self.dtype_policy.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(GemmaConfig.from_dict(config.pop("config")), **config)


def _int4_rows(embedding, token_ids):
    """[batch, seq] ids -> [batch, seq, hidden] dequantized rows of a grouped int4 table."""
    ids = ops.cast(token_ids, "int32")
    table = keras_internals.embedding_table(embedding)
    packed = ops.take(table, ids, axis=0)  # [batch, seq, hidden / 2]
    scale = ops.take(embedding.embeddings_scale, ids, axis=0)[..., None]  # [b, s, groups, 1]
    zero = ops.cast(ops.take(embedding.embeddings_zero, ids, axis=0), scale.dtype)[..., None]
    low, high = int4_nibbles(packed)  # even and odd columns
    q = ops.cast(ops.stack([low, high], axis=-1), scale.dtype)  # [b, s, hidden / 2, 2]
    shape = ops.shape(packed)
    groups = embedding.embeddings_scale.shape[-1]
    q = ops.reshape(q, (shape[0], shape[1], groups, -1))  # [b, s, groups, G]
    rows = ops.reshape((q - zero) * scale, (shape[0], shape[1], -1))
    return ops.cast(rows, embedding.compute_dtype)


def _int4_table_fits(embedding):
    block_size = getattr(embedding, "_int4_block_size", None)
    return (embedding.quantization_mode == "int4" and hasattr(embedding, "embeddings_zero")
            and quantization.int4_layout_fits(embedding.output_dim, block_size))


def positions_from_mask(padding_mask, token_ids):
    """[batch, len] absolute positions: 0, 1, ... over each row's real tokens, -1 on padding.
    Counting real tokens (rather than columns) makes left padding exact, not just relative."""
    if padding_mask is None:
        return ops.broadcast_to(ops.arange(ops.shape(token_ids)[1], dtype="int32")[None, :],
                                ops.shape(token_ids))
    mask = ops.cast(padding_mask, "int32")
    return ops.where(mask > 0, ops.cumsum(mask, axis=1) - 1, -1)
