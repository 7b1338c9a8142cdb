"""GemmaCausalLM: the backbone plus the tied output head, with preset loading and saving."""

from __future__ import annotations

import math
import numbers
import os

import keras

from gemma_keras import keras_internals
from gemma_keras.backbone import GemmaBackbone
from gemma_keras.checkpoints import quantizing
from gemma_keras.checkpoints.weights import copied_backbone, quantized_layers
from gemma_keras.errors import ArgumentTypeError, ConfigError, InvalidArgumentError
from gemma_keras.generation import options as options_module
from gemma_keras.generation.drafting import SELF_DRAFT_MODES
from gemma_keras.generation import chat as chat_module
from gemma_keras.generation import generate as generate_module
from gemma_keras.generation.options import GenerateOptions
from gemma_keras.generation.steps import CompiledSteps
from gemma_keras.tokenizer import TOKENIZER_FILES, GemmaTokenizer


class GemmaCausalLM(keras.Model):
    """Gemma language model: `lm({"token_ids", "padding_mask"})` gives logits
    [batch, seq, vocab] (soft-capped for Gemma 2).

    The logits are the backend's tensor in the compute dtype (`dtype_policy.compute_dtype`,
    bfloat16 for a bfloat16 checkpoint), as any Keras model's call: on PyTorch they carry
    autograd's graph (a user's own training loop gets gradients), so read them with
    `keras.ops.convert_to_numpy(logits)`, which works on every backend; `np.asarray` cannot
    read a torch tensor that requires grad, nor torch's bfloat16."""

    def __init__(self, backbone: GemmaBackbone, tokenizer: GemmaTokenizer = None,
                 instruct=None, **kwargs):
        super().__init__(dtype=backbone.dtype_policy, **kwargs)
        self.backbone = backbone
        self.tokenizer = tokenizer
        # True for instruction-tuned checkpoints, False for base ones, None when unknown;
        # decides whether generation stops at <end_of_turn> by default.
        self.instruct = instruct
        self.preprocessor = None
        if tokenizer is not None:
            from gemma_keras.preprocessor import GemmaCausalLMPreprocessor

            # Plain texts for a base model; pairs in the chat format for an instruct one.
            self.preprocessor = GemmaCausalLMPreprocessor(tokenizer, chat_format=bool(instruct))
        self._steps = None  # compiled_steps(), and the variables they were made for
        self._steps_signature = None
        # What the drafts of the last speculative generate / chat reply achieved.
        self.last_speculation = None
        self.built = True
        # Our arguments (block_size, filters) are checked and resolved before Keras' own
        # per-instance wrapper of `quantize` resolves `config` from `mode`.
        keras_internals.check_quantize_arguments_first(self, _quantize_arguments)

    @property
    def config(self):
        return self.backbone.config

    def call(self, inputs, training=False):
        hidden = self.backbone(inputs, training=training)  # [batch, seq, hidden]
        return self.backbone.logits(hidden)  # [batch, seq, vocab], soft-capped

    @classmethod
    def from_preset(cls, preset, dtype=None, quantize=None, block_size=128,
                    load_tokenizer=True):
        """Loads a built-in preset name, a `kaggle://` or `hf://` handle, or a local keras-hub
        preset / Hugging Face checkpoint directory.

        dtype: "float32", "bfloat16" or "float16"; None keeps the checkpoint's dtype.
        quantize: None, "int8" (per output channel) or "int4" (in groups of `block_size`
        inputs, default 128; None or -1: per output channel): weight-only quantization while
        loading, one tensor at a time, so the float model never exists whole in memory (what
        lets a 9B model load in int4 on a 16 GB machine). The result is exactly
        `from_preset(preset, dtype).quantize(quantize, block_size=block_size)`. A preset
        saved quantized (`save_to_preset` of a quantized model, or a keras-hub int8 preset)
        loads quantized without it.
        `instruct` comes from the card of an official preset (by name, Kaggle handle or Google
        HF repo), else from what the checkpoint records (`save_to_preset` writes it), else
        None.
        """
        from gemma_keras.checkpoints.loading import load_backbone, read_instruct

        _check_path("preset", preset, "a preset name (gk.list_presets()), a kaggle:// or "
                    "hf:// handle, or a directory")
        _check_flag("load_tokenizer", load_tokenizer)
        backbone, directory = load_backbone(preset, dtype=dtype, quantize=quantize,
                                            block_size=block_size)
        tokenizer = None
        if load_tokenizer:
            for name in TOKENIZER_FILES:
                if (directory / name).is_file():
                    tokenizer = GemmaTokenizer(directory / name)
                    break
        return cls(backbone, tokenizer, instruct=read_instruct(preset, directory))

    def quantize(self, mode=None, config=None, filters=None, block_size=128, **kwargs):
        """Weight quantization of the projections and the (tied) embedding, Keras'
        `Model.quantize` with gemma_keras's defaults: "int8" per output channel; "int4" in
        groups of `block_size` inputs (default 128; None or -1: per output channel), e.g.
        `lm.quantize("int4", block_size=32)`. `config` (a keras.quantizers config) and
        `filters` work as in Keras; `block_size` is then ignored. Raises gk.ConfigError for
        another mode or a bad block size."""
        # The instance's `quantize` (set in __init__) resolves the arguments and calls this
        # through Keras' wrapper with `config` already resolved.
        table = self.backbone.token_embedding
        given, done = filters, None
        if (mode in quantizing.MODES and table.built and table.quantization_mode is None
                and not table.lora_enabled and keras_internals.quantize_filter(table, given)):
            # The table in row chunks (Keras quantizes it whole: several float32 copies of
            # a 256k-row table), then Keras' loop for the rest.
            quantizing.quantize_built_table(table, mode, config)
            done = table
            # What Keras does after its loop changed a layer (its loop may change none now):
            # drop the compiled fit/predict functions, retrack torch's parameter lists.
            self.train_function = self.test_function = self.predict_function = None
            keras_internals.after_quantize(self, mode)

        def filters(layer):
            # Only layers with a quantize() of their own are offered to Keras' loop: it
            # warns for every other leaf (RMSNorm, Dropout) and quantizes the same layers.
            return (layer is not done and quantizing.has_quantize(layer)
                    and keras_internals.quantize_filter(layer, given))

        super().quantize(mode, config=config, filters=filters, **kwargs)

    # ---- training -----------------------------------------------------------------------
    def compile(self, optimizer="auto", loss="auto", weighted_metrics="auto", **kwargs):
        """Keras' compile with defaults for next-token training: AdamW (learning rate 2e-4
        with LoRA enabled, 2e-5 without), loss scaling for float16 (any optimizer), cross-entropy on the
        logits in float32 averaged over weighted labels only, accuracy and perplexity."""
        from gemma_keras import training

        if optimizer == "auto":
            optimizer = training.default_optimizer(self)
        optimizer = training.loss_scaled(self, optimizer, kwargs.get("auto_scale_loss", True))
        super().compile(
            optimizer=optimizer,
            loss=training.default_loss() if loss == "auto" else loss,
            weighted_metrics=(training.default_metrics() if weighted_metrics == "auto"
                              else weighted_metrics),
            **kwargs)

    def fit(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        """Keras' fit, also on raw data: a string or list of strings, `{"prompts": [...],
        "responses": [...]}` (loss on responses only), a list of records
        `[{"prompt": ..., "response": ...}, ...]` or `[{"text": ...}, ...]` (the lines of a
        `gemma-keras finetune` JSONL file, read with json.loads), a tf.data dataset of
        strings or prompts/responses, a Python generator yielding any of these, or
        `{"token_ids", "padding_mask"}` (labels = next token). Compiles with the defaults of
        `compile()` when not compiled yet. Any other form, an unknown keyword or a bad count
        (epochs, batch_size, ...) is a gk.InvalidArgumentError / gk.ArgumentTypeError naming
        it, before anything runs."""
        return self._run_keras(super().fit, x, y, batch_size, sample_weight, kwargs,
                               is_fit=True)

    def evaluate(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        """Keras' evaluate on the same inputs as `fit`."""
        if kwargs.get("_use_cached_eval_dataset"):  # fit's validation: data adapted already
            return super().evaluate(x, y, batch_size=batch_size, sample_weight=sample_weight,
                                    **kwargs)
        return self._run_keras(super().evaluate, x, y, batch_size, sample_weight, kwargs)

    def _run_keras(self, method, x, y, batch_size, sample_weight, kwargs, is_fit=False):
        from gemma_keras import training

        # Keras' own arguments checked first too (Keras would raise a bare TypeError for an
        # unknown keyword, or fail inside its loop for epochs="2").
        training.check_keras_arguments(method, kwargs)
        x, y, sample_weight, batch_size = training.adapt(self, x, y, sample_weight, batch_size)
        if kwargs.get("validation_data") is not None:  # the same raw forms as x
            kwargs["validation_data"] = training.adapt_validation(self, kwargs["validation_data"])
        if not self.compiled:
            self.compile()
        if is_fit and y is None and not isinstance(x, dict):
            # Datasets and generators come in their own order: Keras would warn that its
            # default shuffle=True is ignored.
            kwargs.setdefault("shuffle", False)
        return method(x, y, batch_size=batch_size, sample_weight=sample_weight, **kwargs)

    def save_lora_weights(self, path, overwrite=False):
        """Writes only the LoRA adapters to an .h5 file (see `gemma_keras.lora`). An existing
        file is refused (TargetExistsError) unless `overwrite=True`."""
        self.backbone.save_lora_weights(path, overwrite=overwrite)

    def load_lora_weights(self, path):
        self.backbone.load_lora_weights(path)

    def merge_lora(self):
        """Folds the LoRA adapters into the base weights: same logits, no adapters. Raises
        ConfigError when no adapters are enabled (a merge then would do nothing, which is
        almost always a forgotten enable_lora / load_lora_weights)."""
        self.backbone.merge_lora()

    def disable_lora(self):
        """Drops the LoRA adapters unmerged: the base model's weights and logits again, every
        weight trainable, and `backbone.enable_lora` free to start a new adapter. Does nothing
        when no adapters are enabled."""
        from gemma_keras import lora

        lora.disable_lora(self.backbone)

    def chat(self, system=None, draft=None, draft_tokens=None, **unknown):
        """A multi-turn chat session in Gemma's turn format that keeps the KV cache between
        turns: `chat = lm.chat(); chat.send("Hi")`; `chat.send(..., stream=True)` streams.
        draft, draft_tokens: every reply is decoded speculatively, as `generate`'s. The
        sampling keywords go to each `send`."""
        options_module.refuse_unknown_keywords(
            "chat()", unknown, ["system", "draft", "draft_tokens"],
            {name: f"It is a keyword of each reply: chat.send(message, {name}=...)"
             for name in chat_module.SEND_KEYWORDS})
        return chat_module.ChatSession(self, system=system, draft=draft,
                                       draft_tokens=draft_tokens,
                                       on_speculation=self._keep_speculation)

    def compiled_steps(self) -> CompiledSteps:
        """This model's compiled decoding functions (generation/steps.py), made again when
        its variables changed: they take the variables as inputs, and quantize() or
        enable_lora() replace or add variables."""
        signature = tuple(id(v) for v in self.variables)
        if self._steps is None or self._steps_signature != signature:
            self._steps, self._steps_signature = CompiledSteps(self), signature
        return self._steps

    def _keep_speculation(self, stats):
        self.last_speculation = stats

    def draft_model(self, draft):
        """The GemmaCausalLM that drafts for this model under `generate(draft=...)`: `draft`
        itself (checked to share the tokenizer), this model's weights quantized ("int4",
        "int8"), or a preset loaded in this model's dtype. Built ones are kept on the model
        (rebuilt when its variables change: quantize(), enable_lora())."""
        return _draft_model(self, draft)

    def generate(self, inputs=None, *args, **kwargs):
        """Generates text with a KV cache: the prompt in one pass, then one compiled step per
        token.

        inputs: a string, a list of strings (prompts of any lengths, batched), or the
            pre-tokenized dict {"token_ids", "padding_mask"}. Strings give prompt +
            completion text (keras-hub's convention; the prompt exactly as passed, so
            `text[len(prompt):]` is the completion); the dict gives {"token_ids",
            "padding_mask"}: the prompt then the generated ids (stop id included),
            right-padded. An empty string prompt is <bos> alone.
        chat_template: "auto" sends each string to an instruct model (`self.instruct`) as one
            user turn in Gemma's chat format, so that it answers (the completion is then the
            model's reply); strings that already hold turn markers, empty strings, token ids
            and base models are sent as they are. True always wraps, False never (continue
            the text as written, e.g. code, as keras-hub's generate does).
        include_prompt: False returns the completion alone (ids: the generated ids alone).
        skip_special_tokens: True (default) leaves special pieces (<bos>, <eos>, <pad>,
            turn markers) out of the completion text.
        max_length: total tokens, prompt included; or max_new_tokens (default 128).
        min_new_tokens: the stop ids cannot end a row before it has this many new tokens.
        sampler: "greedy", "random", "top_k", "top_p" or a `gk.samplers` object; None is
            greedy unless temperature / top_k / top_p / min_p are given, which then pick the
            sampler (top_p, else top_k, else random) as in transformers; with a sampler name
            they set its parameters; with a sampler object they are an error. min_p (in
            [0, 1]) keeps the tokens at least min_p times as likely as the most likely one.
            The rules apply in transformers' order: repetition_penalty and min_new_tokens,
            then temperature, top_k, top_p, min_p.
        num_beams: beam search (sampler=None or "beam", or a `gk.samplers.BeamSampler`),
            exactly transformers' `generate(num_beams=..., do_sample=False)`: the same
            tokens for the same checkpoint. num_beams=1 is greedy. length_penalty (default
            1.0): a finished beam scores its log-probability sum / (new tokens **
            length_penalty). early_stopping: False (default), True or "never", as in
            transformers. return_beams=True returns, per prompt, every beam as (text, or its
            ids as a 1-D array, score), best first (one string prompt: its list alone).
            Beams take stop_token_ids and min_new_tokens, not stream, stop_strings or
            repetition_penalty.
        repetition_penalty: transformers' semantics: the logit of every token already in
            the prompt or the completion is divided by it when positive, multiplied when
            negative (> 1 discourages repeats; 1.0 or None: off).
        stop_token_ids: "auto" (<eos>, and <end_of_turn> unless the model is known to be a
            base model), None, or ids. Each row stops on its own. stop_strings: optional
            strings that end a row's completion (not included).
        seed: an int makes sampling reproducible: the same seed and arguments give the same
            text on every call; across backends too in float32 (bfloat16 logits differ
            slightly between backends, so sampled text may too). stream: with one string
            prompt, return an iterator of the completion's text pieces as they are decoded.
        draft: speculative decoding. A drafter proposes `draft_tokens` tokens per row, the
            model checks them all in one pass and keeps the longest agreeing prefix plus one
            token of its own. "prompt_lookup": drafts copied from earlier in the prompt and
            completion (no model; for editing, summarising, code; 8 drafts per round by
            default). "int4" / "int8": this model's weights quantized, as its own drafter. A
            GemmaCausalLM or a preset (name, handle, path) sharing this model's tokenizer:
            a smaller model (4 drafts by default). Greedy output is plain greedy's; sampled
            output has exactly the distribution of plain sampling (the rejection rule), but
            not the same draws for a seed. `lm.last_speculation` then holds the acceptance
            figures; a warning says when they were too low to pay.

        Samplers and the logits rules (min_new_tokens, repetition_penalty) run on the host on
        float32 logits: switching them never recompiles. Bad arguments raise
        `gk.InvalidArgumentError` / `gk.ArgumentTypeError` before any compilation; an
        unknown keyword (`max_tokens=`) is a `gk.ArgumentTypeError` naming the one to use.
        options: a `gk.GenerateOptions` holding any of these (keywords given beside it
        override its values).
        """
        self.last_speculation = None
        return generate_module.generate(
            self, inputs, GenerateOptions.from_call("generate()", args, kwargs),
            on_speculation=self._keep_speculation)

    # The keywords are GenerateOptions' fields (their one definition); this signature
    # shows them to help(), IDEs and inspect.
    generate.__signature__ = options_module.signature_of(
        "inputs", options_module.FIELDS, options_module.POSITIONAL)

    # ---- scoring ------------------------------------------------------------------------
    def score(self, token_ids, padding_mask=None, scoring_mode="logits",
              layer_intercept_fn=None, target_ids=None):
        """keras-hub's `GemmaCausalLM.score`: per-token scores of given token ids, compiled.

        token_ids, padding_mask (default all ones), target_ids: [batch, num_tokens].
        scoring_mode "logits": the logits [batch, num_tokens, vocab] (soft-capped, compute
        dtype), as `lm(...)`; "loss": the cross-entropy of `target_ids` at each position
        [batch, num_tokens] in float32, not masked (multiply by the padding mask to drop
        padding). layer_intercept_fn(x, i): called with the looked-up embeddings at i = -1
        and each decoder block's output at i = 0, 1, ...; its return value is what the model
        continues with (keras-hub ignores the value it returns at i = -1). With a hook the
        forward runs eagerly, so it may record activations or sit in a gradient tape.
        Ids are integer NumPy arrays, nested lists or tensors of any backend, within the
        vocabulary (text is tokenized first: `np.array([lm.tokenizer.tokenize(text,
        add_bos=True)])`); anything else is a gk.ArgumentTypeError naming the argument.
        Raises gk.InvalidArgumentError for another scoring_mode, or "loss" without targets.
        """
        from gemma_keras.evaluation import scoring

        return scoring.score(self, token_ids, padding_mask=padding_mask,
                             scoring_mode=scoring_mode, layer_intercept_fn=layer_intercept_fn,
                             target_ids=target_ids)

    def loglikelihood(self, requests, batch_size=16):
        """[(context, continuation), ...] strings -> [(log P(continuation | context), whether
        greedy decoding would write the continuation)], as lm-evaluation-harness computes
        them: the request is tokenized whole and split where the context's tokens end,
        <bos> first. Requests sharing a context (the choices of a question) prefill it once
        and score every continuation from the cached prefix, `batch_size` at a time."""
        from gemma_keras.evaluation import scoring

        return scoring.loglikelihood(self, requests, batch_size=batch_size)

    def loglikelihood_rolling(self, texts, batch_size=16, max_length=None):
        """[text, ...] -> [log P(text | <bos>)], every token scored once; texts longer than
        `max_length` (default: the model's context) are read in windows, each token
        predicted from as many preceding tokens as fit (lm-evaluation-harness' rolling
        windows). Perplexity: exp(-total / number of tokens)."""
        from gemma_keras.evaluation import scoring

        return scoring.loglikelihood_rolling(self, texts, batch_size=batch_size,
                                             max_length=max_length)

    def save_to_preset(self, preset_dir, max_shard_size=None, format="keras_hub",
                       overwrite=False):
        """Writes a keras-hub preset directory (keras-hub's GemmaCausalLM.from_preset loads it),
        or with format="hf" a Hugging Face checkpoint (transformers' from_pretrained loads it).

        Written under a temporary name and renamed, so an interrupted save leaves no
        half-written preset. `max_shard_size` (GB) splits the weights into shards. An existing
        `preset_dir` is refused (TargetExistsError) unless `overwrite=True`. `self.instruct`
        is recorded (keras-hub: metadata.json; HF: a "gemma_keras" key in config.json, which
        transformers ignores), so `from_preset` on the directory gives it back.

        A quantized model is saved quantized (format="keras_hub" only; "hf" raises
        gk.ConfigError): int8 in keras-hub's own layout, which keras-hub loads too; int4 in
        our layers' layout, which only gemma_keras loads (Keras' int4 groups keras-hub's
        attention kernels differently). LoRA adapters are merged into the saved weights, as
        for a float model (quantized kernels are re-quantized with the adapter folded in, as
        keras-hub saves a quantized LoRA model).
        """
        _check_path("preset_dir", preset_dir, "a directory to write")
        _check_flag("overwrite", overwrite)
        if max_shard_size is not None and (
                isinstance(max_shard_size, bool) or not isinstance(max_shard_size, numbers.Real)
                or not math.isfinite(max_shard_size) or max_shard_size <= 0):
            from gemma_keras.errors import InvalidArgumentError

            raise InvalidArgumentError(f"max_shard_size={max_shard_size!r}: pass the largest "
                                       "shard in GB as a positive number (e.g. 5), or None for "
                                       "one file.")
        if format == "hf":
            from gemma_keras.checkpoints.hf_writer import write_checkpoint

            write_checkpoint(self.backbone, self.tokenizer, preset_dir,
                             max_shard_size=max_shard_size, overwrite=overwrite,
                             instruct=self.instruct)
            return
        if format != "keras_hub":
            from gemma_keras.errors import ConfigError

            raise ConfigError(f"format must be 'keras_hub' or 'hf', got {format!r}.")
        from gemma_keras.checkpoints.keras_hub_format import write_preset

        write_preset(self.backbone, self.tokenizer, preset_dir, max_shard_size=max_shard_size,
                     sequence_length=self.config.max_sequence_length, overwrite=overwrite,
                     instruct=self.instruct)


def _quantize_arguments(mode, config, filters, block_size, kwargs):
    """`quantize()`'s arguments checked and resolved to Keras' (mode, config)."""
    quantizing.check_filters(filters, kwargs)
    return quantizing.resolve(mode, block_size, config)


def _check_path(name, value, what):
    if not isinstance(value, (str, os.PathLike)):
        from gemma_keras.errors import ArgumentTypeError

        raise ArgumentTypeError(f"{name} must be {what} (a str or pathlib.Path), got "
                                f"{type(value).__name__} {value!r:.60}.")


def _check_flag(name, value):
    if not isinstance(value, bool):
        from gemma_keras.errors import ArgumentTypeError

        raise ArgumentTypeError(f"{name} must be True or False, got {value!r:.60}.")


# ---- draft models for generate(draft=...) -------------------------------------------------
def _draft_model(lm, draft):
    """`GemmaCausalLM.draft_model`."""
    if isinstance(draft, GemmaCausalLM):
        if draft is lm:
            raise InvalidArgumentError(
                "draft= is the model itself: drafting with it costs a full step per draft and "
                "gains nothing. Pass a smaller model, draft='int4' or draft='prompt_lookup'.")
        _check_compatible(lm, draft)
        return draft
    if not isinstance(draft, str):
        raise ArgumentTypeError(
            f"draft must be a GemmaCausalLM, a preset name or path, 'int4', 'int8' or "
            f"'prompt_lookup'; got {type(draft).__name__}.")
    signature = tuple(id(v) for v in lm.variables)
    drafts = getattr(lm, "_drafts", None)
    if drafts is None or drafts.signature != signature:
        drafts = lm._drafts = _Drafts(signature)
    if draft not in drafts.models:
        if draft in SELF_DRAFT_MODES:
            model = _self_draft(lm, draft)
        else:
            model = GemmaCausalLM.from_preset(draft, dtype=lm.backbone.dtype_policy.name)
            _check_compatible(lm, model, draft)
        drafts.models[draft] = model
    return drafts.models[draft]


class _Drafts:
    """The draft models built for one model. A plain object: Keras would track a dict or
    tuple holding models as the target's own layers, adding their weights to its variables
    (and so to every compiled step's inputs)."""

    def __init__(self, signature):
        self.signature, self.models = signature, {}


def _self_draft(lm, mode):
    """A copy of `lm` with its weights quantized to `mode` (LoRA adapters merged), built one
    tensor at a time from the target's: the float copy never exists whole."""
    found = sorted(set(quantized_layers(lm.backbone).values()))
    if found:
        raise ConfigError(
            f"draft={mode!r}: this model is already {'/'.join(found)}-quantized, so a "
            f"{mode} copy of it would draft at nearly its own speed. Draft from the float "
            "model, or pass a smaller model or draft='prompt_lookup'.")
    copy = copied_backbone(lm.backbone, None, "the target model",
                           quantizing.requested(mode, quantizing.DEFAULT_BLOCK_SIZE))
    return GemmaCausalLM(copy, lm.tokenizer, instruct=lm.instruct)


def _check_compatible(lm, draft, source="draft"):
    """The drafter must speak the target's tokens: the same vocabulary, piece for piece."""
    ours, theirs = lm.backbone.config.vocabulary_size, draft.backbone.config.vocabulary_size
    if ours != theirs:
        raise ConfigError(f"{source}: its vocabulary has {theirs} entries and the model's "
                          f"{ours}; a draft model must share the target's tokenizer.")
    if lm.tokenizer is not None and draft.tokenizer is not None:
        if lm.tokenizer.proto != draft.tokenizer.proto and _pieces(lm) != _pieces(draft):
            raise ConfigError(f"{source}: its tokenizer's pieces differ from the model's; a "
                              "draft model must share the target's tokenizer.")


def _pieces(lm):
    tokenizer = lm.tokenizer
    return [tokenizer.id_to_token(i) for i in range(tokenizer.vocabulary_size)]
