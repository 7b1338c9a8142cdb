"""GemmaCausalLM: the backbone plus the tied output head, with preset loading and saving."""

from __future__ import annotations

import keras

from gemma_keras.backbone import GemmaBackbone
from gemma_keras.tokenizer import TOKENIZER_FILES, GemmaTokenizer


class GemmaCausalLM(keras.Model):
    """Gemma language model: `lm({"token_ids", "padding_mask"})` gives logits
    [batch, seq, vocab] (soft-capped for Gemma 2)."""

    def __init__(self, backbone: GemmaBackbone, tokenizer: GemmaTokenizer = None,
                 instruct=None, **kwargs):
        super().__init__(dtype=backbone.dtype_policy, **kwargs)
        self.backbone = backbone
        self.tokenizer = tokenizer
        # True for instruction-tuned checkpoints, False for base ones, None when unknown;
        # decides whether generation stops at <end_of_turn> by default.
        self.instruct = instruct
        self._steps = None
        self.built = True

    @property
    def config(self):
        return self.backbone.config

    def call(self, inputs, training=False):
        hidden = self.backbone(inputs, training=training)  # [batch, seq, hidden]
        return self.backbone.logits(hidden)  # [batch, seq, vocab], soft-capped

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
        return cls(backbone, tokenizer, instruct=_is_instruct(preset))

    def chat(self, system=None):
        """A multi-turn chat session in Gemma's turn format that keeps the KV cache between
        turns: `chat = lm.chat(); chat.send("Hi")`; `chat.send(..., stream=True)` streams."""
        from gemma_keras.generation.chat import ChatSession

        return ChatSession(self, system=system)

    def _compiled_steps(self):
        from gemma_keras.generation.generate import CompiledSteps

        # Compiled steps take the variables as inputs; quantize() or enable_lora() replace
        # or add variables, and then the steps must be built again.
        signature = tuple(id(v) for v in self.variables)
        if self._steps is None or getattr(self, "_steps_signature", None) != signature:
            self._steps = CompiledSteps(self)
            self._steps_signature = signature
        return self._steps

    def generate(self, inputs, max_length=None, max_new_tokens=None, sampler="greedy",
                 stop_token_ids="auto", seed=None, stream=False, stop_strings=None):
        """Generates text with a KV cache: the prompt in one pass, then one compiled step per
        token.

        inputs: a string, a list of strings (prompts of any lengths, batched), or the
            pre-tokenized dict {"token_ids", "padding_mask"}; strings give prompt + completion
            text (as keras-hub), the dict gives {"token_ids", "padding_mask"} with the prompt
            then the generated ids, right-padded.
        max_length: total tokens, prompt included; or max_new_tokens (default 128).
        sampler: "greedy", "random", "top_k", "top_p" or a `gk.samplers` object.
        stop_token_ids: "auto" (<eos>, and <end_of_turn> unless the model is known to be a
            base model), None, or ids. Each row stops on its own. stop_strings: optional
            strings that end a row's completion (not included).
        seed: makes sampling reproducible. stream: with one string prompt, return an
            iterator of completion text pieces as they are decoded.
        """
        from gemma_keras.generation.generate import generate

        return generate(self, inputs, max_length=max_length, max_new_tokens=max_new_tokens,
                        sampler=sampler, stop_token_ids=stop_token_ids, seed=seed,
                        stream=stream, stop_strings=stop_strings)

    def save_to_preset(self, preset_dir, max_shard_size=None):
        """Writes a keras-hub preset directory (keras-hub's GemmaCausalLM.from_preset loads it).

        Written under a temporary name and renamed, so an interrupted save leaves no
        half-written preset. `max_shard_size` (GB) splits the weights into shards.
        """
        from gemma_keras.checkpoints.keras_hub_format import write_preset

        write_preset(self.backbone, self.tokenizer, preset_dir, max_shard_size=max_shard_size,
                     sequence_length=self.config.max_sequence_length)


def _is_instruct(preset):
    """Whether a preset handle names an instruction-tuned model; None when it cannot tell."""
    from gemma_keras.presets import get_preset_card, list_presets

    handle = str(preset)
    if handle in list_presets():
        return get_preset_card(handle).instruct
    if handle.startswith(("kaggle://", "hf://")):
        name = handle.split("://", 1)[1].split("@")[0].lower()
        return "instruct" in name or name.endswith("-it") or "-it/" in name
    return None
