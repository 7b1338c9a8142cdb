"""GemmaCausalLM: the backbone plus the tied output head, with preset loading and saving."""

from __future__ import annotations

import keras

from gemma_keras.backbone import GemmaBackbone
from gemma_keras.tokenizer import TOKENIZER_FILES, GemmaTokenizer


class GemmaCausalLM(keras.Model):
    """Gemma language model: `lm({"token_ids", "padding_mask"})` gives logits
    [batch, seq, vocab] (soft-capped for Gemma 2)."""

    def __init__(self, backbone: GemmaBackbone, tokenizer: GemmaTokenizer = None, **kwargs):
        super().__init__(dtype=backbone.dtype_policy, **kwargs)
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.built = True

    @property
    def config(self):
        return self.backbone.config

    def call(self, inputs, training=False):
        hidden = self.backbone(inputs, training=training)  # [batch, seq, hidden]
        # Tied head, final soft-cap included: [batch, seq, vocab]
        return self.backbone.token_embedding(hidden, reverse=True)

    @classmethod
    def from_preset(cls, preset, dtype=None, load_tokenizer=True):
        """Loads a built-in preset name, a `kaggle://` or `hf://` handle, or a local keras-hub
        preset / Hugging Face checkpoint directory.

        dtype: "float32", "bfloat16" or "float16"; None keeps the checkpoint's dtype.
        """
        from gemma_keras.checkpoints.loading import load_backbone

        backbone, directory = load_backbone(preset, dtype=dtype)
        tokenizer = None
        if load_tokenizer:
            for name in TOKENIZER_FILES:
                if (directory / name).is_file():
                    tokenizer = GemmaTokenizer(directory / name)
                    break
        return cls(backbone, tokenizer)

    def save_to_preset(self, preset_dir, max_shard_size=None):
        """Writes a keras-hub preset directory (keras-hub's GemmaCausalLM.from_preset loads it).

        Written under a temporary name and renamed, so an interrupted save leaves no
        half-written preset. `max_shard_size` (GB) splits the weights into shards.
        """
        from gemma_keras.checkpoints.keras_hub_format import write_preset

        write_preset(self.backbone, self.tokenizer, preset_dir, max_shard_size=max_shard_size,
                     sequence_length=self.config.max_sequence_length)
