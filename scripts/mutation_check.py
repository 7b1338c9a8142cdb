#!/usr/bin/env python
"""Mutation check: do the tests catch a developer's small bugs?

Each entry of MUTATIONS below is one small deliberate bug (an off-by-one, a wrong sign, a
dropped argument, any for all, a wrong cast...) in one file of the library. The script applies
each one alone to a fresh copy of the repository, runs the tests that should catch it on the
backend whose code it touches, and prints a table:

    caught    the tests failed (pytest exit status 1): good
    survived  the tests passed (exit status 0): no test notices this bug
    broken    pytest could not run them (exit status 2-5: a collection error, a selection
              that matches nothing, or the guard below): the entry or its tests are wrong
    timeout   the run passed --timeout (the bug hangs or slows the tests; not counted)

Before any mutation, the tests the chosen mutations select run once on an unmutated copy (the
baseline: per backend and -k expression, the union of their test files, split into --jobs
runs), so a red run is the mutation's doing: a mutation one of whose tests fails (or whose
file cannot run) without it is reported "not run", with the reason.

How a copy is run: the working tree is snapshotted once (gemma_keras/, tests/, presets/,
guides/, scripts/, bench/, README.md, pyproject.toml: everything but .git, .venv and caches),
each run gets its own copy of the snapshot, and pytest runs from the copy with the copy first
on PYTHONPATH (the venv's editable install points at the working tree; child processes the
tests start inherit PYTHONPATH and run in the copy too). A small pytest plugin passed with -p
checks inside the run that `gemma_keras` is imported from the copy, or stops the run (broken).
Environment as tests/conftest.py and scripts/test.sh set it: KERAS_BACKEND, OMP_NUM_THREADS=1,
GEMMA_KERAS_TEST_ALL=1 (so `once` tests of other backends' passes run too); JAX runs share one
compilation cache per invocation (its keys are the compiled programs, so a mutated program
never reads an unmutated one's entry). The preset cards' package data is read through the
editable install (it is data; no mutation touches it).

Slow (a few minutes per mutation on 2 cores): not part of CI. Typical use:

    .venv/bin/python scripts/mutation_check.py --list
    .venv/bin/python scripts/mutation_check.py --check            # every snippet still unique
    .venv/bin/python scripts/mutation_check.py --only S-temperature-multiplied --jobs 1
    .venv/bin/python scripts/mutation_check.py --jobs 2 --json mutation_results.json

A mutation's `old` text must occur exactly once in its file: the script refuses to run
otherwise (the code moved on: update the entry), unless --skip-invalid.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import glob
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Tuple

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutation:
    id: str
    file: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: Tuple[str, ...]  # pytest arguments: files, node ids or globs (tests/test_*.py)
    description: str
    k: Optional[str] = None  # a -k expression, or None
    backend: str = "jax"  # the backend whose code the mutation touches
    # Why it is expected to survive today (no test can or does see it), or "" (caught).
    survives: str = ""


# ---- the test selections, named once so that entries share baselines -------------------------
NUMERICS = ("tests/test_config_numerics.py", "tests/test_parity.py", "tests/test_model.py")
SAMPLING = ("tests/test_sampling_reference.py", "tests/test_generate_api.py",
            "tests/test_generation.py")
STOPPING = ("tests/test_stopping_reference.py", "tests/test_generation.py",
            "tests/test_sampling_reference.py")
SPECULATIVE = ("tests/test_speculative.py", "tests/test_sampling_reference.py",
               "tests/test_stopping_reference.py")
CACHE = ("tests/test_generation.py", "tests/test_speculative.py")
BEAM = ("tests/test_beam.py", "tests/test_stopping_reference.py")
SCORING = ("tests/test_scoring_reference.py", "tests/test_evaluation.py",
           "tests/test_evaluation_harness.py")
LORA = ("tests/test_lora.py",)
QUANTIZED = ("tests/test_quantization.py", "tests/test_model.py")
FLOAT16 = ("tests/test_float16.py",)
TOKENIZER = ("tests/test_tokenizer.py", "tests/test_generate_api.py", "tests/test_generation.py")
LITERT = ("tests/test_export.py",)  # with k="litert or runner"
SAVED_MODEL = ("tests/test_export.py",)  # with k="saved_model", on TensorFlow
CLI = ("tests/test_cli_arguments.py",
       "tests/test_generate_api.py::test_cli_sampling_flags_equal_the_python_keywords")

M = Mutation
MUTATIONS: List[Mutation] = [
    # ---- the rows of issue 33's table, and its speculative rollback ----------------------------
    M("S-temperature-multiplied", "gemma_keras/generation/samplers.py",
      "logits.astype(np.float64) / self.temperature",
      "logits.astype(np.float64) * self.temperature",
      SAMPLING + ("tests/test_speculative.py",),
      "logits multiplied by the temperature instead of divided"),
    M("P-penalty-ignores-drafts", "gemma_keras/generation/speculative.py",
      "contexts = [history + proposed[:j] for j in range(len(proposed) + 1)]",
      "contexts = [list(history) for j in range(len(proposed) + 1)]",
      SPECULATIVE + ("tests/test_generate_api.py",),
      "speculative repetition-penalty context leaves out the earlier drafts of the round"),
    M("T-stop-string-newest-text", "gemma_keras/generation/stopping.py",
      "searched = max(0, len(self.raw.text) - self._longest + 1)",
      "searched = len(self.raw.text)",
      STOPPING + ("tests/test_speculative.py", "tests/test_generate_api.py"),
      "stop string searched only in the newest token's text (one split over tokens is missed)"),
    M("E-is-greedy-any", "gemma_keras/evaluation/scoring.py",
      "bool(greedy[r, : len(row.chunk)].all())",
      "bool(greedy[r, : len(row.chunk)].any())",
      SCORING, "loglikelihood's is_greedy computed with any instead of all"),
    M("X-litert-prefill-start-ignored", "gemma_keras/exporting/runner.py",
      "chunk, first = ids[begin:end], start + begin",
      "chunk, first = ids[begin:end], begin",
      LITERT, "LiteRT runner's prefill(start=) ignored: positions restart at 0",
      k="litert or runner", backend="tensorflow"),  # conversion variants run on TF only
    M("B-rope-base-ignored", "gemma_keras/backbone.py",
      "rope_tables(positions, config.head_dim,\n"
      "                                                        *config.rope(kind))",
      "rope_tables(positions, config.head_dim)",
      NUMERICS, "RoPE base ignored (always 10,000)"),
    M("L-rmsnorm-epsilon-dropped", "gemma_keras/layers/rms_norm.py",
      "axis=-1,\n                                  epsilon=self.epsilon)",
      "axis=-1)",
      NUMERICS, "RMSNorm's configured epsilon dropped (Keras' default used)"),
    M("B-embedding-scale-float32", "gemma_keras/backbone.py",
      "normaliser = ops.cast(self.config.hidden_dim ** 0.5, x.dtype)",
      "normaliser = ops.cast(self.config.hidden_dim ** 0.5, \"float32\")",
      ("tests/test_config_numerics.py", "tests/test_model.py", "tests/test_float16.py"),
      "embedding scale cast to float32 instead of the compute dtype"),
    M("P-rollback-off-by-one", "gemma_keras/generation/speculative.py",
      "keep = np.where(live, position - 1, keep)",
      "keep = np.where(live, position - 2, keep)",
      SPECULATIVE, "speculative rollback (host rounds) also forgets the last kept token"),

    # ---- gemma_keras/layers, config -------------------------------------------------------------
    M("L-rope-rotation-sign", "gemma_keras/layers/rotary.py",
      "[first * cos - second * sin, second * cos + first * sin]",
      "[first * cos + second * sin, second * cos - first * sin]",
      NUMERICS, "RoPE rotates the other way (sin sign swapped)"),
    M("L-rope-positions-bfloat16", "gemma_keras/layers/rotary.py",
      "angles = ops.cast(positions, \"float32\")[:, :, None]",
      "angles = ops.cast(positions, \"bfloat16\")[:, :, None]",
      NUMERICS, "RoPE positions cast to bfloat16 (8190 -> 8192)"),
    M("L-window-off-by-one", "gemma_keras/layers/attention.py",
      "q - k < sliding_window", "q - k <= sliding_window",
      NUMERICS + CACHE, "sliding window sees one key too many"),
    M("L-softcap-after-mask", "gemma_keras/layers/attention.py",
      "        if self.logit_soft_cap is not None:\n"
      "            logits = ops.tanh(logits / self.logit_soft_cap) * self.logit_soft_cap\n"
      "        logits = ops.where(mask[:, None, None, :, :], logits, _MASK_VALUE)\n",
      "        logits = ops.where(mask[:, None, None, :, :], logits, _MASK_VALUE)\n"
      "        if self.logit_soft_cap is not None:\n"
      "            logits = ops.tanh(logits / self.logit_soft_cap) * self.logit_soft_cap\n",
      NUMERICS, "attention soft-cap applied after the mask (masked keys get -cap, not -inf)"),
    M("L-gelu-exact", "gemma_keras/layers/feedforward.py",
      "approximate=True", "approximate=False",
      NUMERICS, "exact GELU instead of Gemma's tanh approximation"),
    M("L-ffw-reads-attention-norm", "gemma_keras/layers/decoder_block.py",
      "h = self.ffw(self.pre_ffw_norm(x))", "h = self.ffw(self.pre_attention_norm(x))",
      NUMERICS, "feed-forward normalised with the pre-attention norm's scale"),
    M("L-float16-products-unguarded", "gemma_keras/layers/precision.py",
      "    return residual_dtype(compute_dtype)\n",
      "    return keras.backend.standardize_dtype(compute_dtype)\n",
      FLOAT16, "float16 products that spike no longer get a float32 result"),
    M("L-lora-scale-not-divided-by-rank", "gemma_keras/layers/linear.py",
      "delta = delta * (self.lora_alpha / self.lora_rank)",
      "delta = delta * self.lora_alpha",
      LORA, "LoRA adapter scaled by alpha instead of alpha / rank in the forward pass"),
    M("C-local-layers-odd", "gemma_keras/config.py",
      "(layer_index + 1) % self.sliding_window_pattern != 0",
      "layer_index % self.sliding_window_pattern != 0",
      NUMERICS, "Gemma 2's sliding-window layers are the odd ones (should start at layer 0)"),

    # ---- Gemma 3 ---------------------------------------------------------------------------------
    M("L-qk-norm-after-rope", "gemma_keras/layers/attention.py",
      "            query, key = self.query_norm(query), self.key_norm(key)\n"
      "        query = apply_rotary_embedding(query, rope)\n"
      "        key = apply_rotary_embedding(key, rope)",
      "            pass\n"
      "        query = apply_rotary_embedding(query, rope)\n"
      "        key = apply_rotary_embedding(key, rope)\n"
      "        if self.query_norm is not None:\n"
      "            query, key = self.query_norm(query), self.key_norm(key)",
      NUMERICS, "Gemma 3's QK-norm applied after RoPE instead of before"),
    M("C-local-rope-base-is-global", "gemma_keras/config.py",
      "wavelength = self.local_rope_max_wavelength or self.rope_max_wavelength",
      "wavelength = self.rope_max_wavelength",
      NUMERICS, "Gemma 3's local layers rotate with the global RoPE base (1M, not 10k)"),
    M("L-rope-linear-scaling-ignored", "gemma_keras/layers/rotary.py",
      "inverse_frequency = inverse_frequency / scaling_factor",
      "inverse_frequency = inverse_frequency",
      NUMERICS, "linear RoPE scaling (x8 on Gemma 3's global layers) ignored"),
    M("K-hf-gemma3-local-base-ignored", "gemma_keras/checkpoints/hf_format.py",
      'theta = hf["rope_local_base_freq"] if local else hf.get("rope_theta", default_theta)',
      'theta = hf.get("rope_theta", default_theta)',
      ("tests/test_parity.py",), "a 4.50-style Gemma 3 config's rope_local_base_freq ignored",
      k="gemma3"),
    M("K-hf-gemma3-defaults-ignored", "gemma_keras/checkpoints/hf_format.py",
      'return {**_GEMMA3_DEFAULTS, **inner}, "gemma3_text"',
      'return dict(inner), "gemma3_text"',
      ("tests/test_gemma3_configs.py", "tests/test_parity.py"), "a multimodal Gemma 3's text_config read without "
      "transformers' defaults (the hub's 4B omits its heads, head dim and vocabulary)",
      k="gemma3"),
    M("K-hf-gemma3-old-prefix-dropped", "gemma_keras/checkpoints/hf_format.py",
      'GEMMA3_TEXT_PREFIXES = ("language_model.model.", "model.language_model.")',
      'GEMMA3_TEXT_PREFIXES = ("model.language_model.",)',
      ("tests/test_parity.py",), "the hub's language_model.model.* weight prefix not read",
      k="gemma3"),

    # ---- gemma_keras/backbone.py -----------------------------------------------------------------
    M("B-padding-positions-unmasked", "gemma_keras/backbone.py",
      "return ops.where(mask > 0, ops.cumsum(mask, axis=1) - 1, -1)",
      "return ops.cumsum(mask, axis=1) - 1",
      NUMERICS, "padding tokens get real positions instead of -1 (masks see them)"),
    M("B-final-softcap-unscaled", "gemma_keras/backbone.py",
      "capped = ops.tanh(ops.cast(logits, \"float32\") / cap) * cap",
      "capped = ops.tanh(ops.cast(logits, \"float32\")) * cap",
      NUMERICS, "final logit soft-cap computes cap * tanh(x) instead of cap * tanh(x / cap)"),

    # ---- gemma_keras/generation: cache, samplers, options, stopping, session, chat ---------------
    M("C-ring-without-lookahead", "gemma_keras/layers/kv_cache.py",
      "min(total_columns, window + lookahead)", "min(total_columns, window)",
      CACHE, "sliding-window ring loses the speculative lookahead slots"),
    M("C-truncate-off-by-one", "gemma_keras/layers/kv_cache.py",
      "ops.where(part[\"positions\"] > keep, -1, part[\"positions\"])",
      "ops.where(part[\"positions\"] >= keep, -1, part[\"positions\"])",
      CACHE, "truncate also forgets the last position it should keep"),
    M("C-write-skips-first-column", "gemma_keras/layers/kv_cache.py",
      "written = column >= start", "written = column > start",
      CACHE, "a chunk's write skips the slot of its first column"),
    M("S-top-p-excludes-crossing-token", "gemma_keras/generation/samplers.py",
      "keep_sorted = (np.cumsum(probs, axis=-1) - probs) < self.p",
      "keep_sorted = np.cumsum(probs, axis=-1) < self.p",
      SAMPLING, "top-p drops the token whose mass crosses p"),
    M("S-top-k-keeps-k-minus-1", "gemma_keras/generation/samplers.py",
      "np.where(logits >= kth, logits, -np.inf)", "np.where(logits > kth, logits, -np.inf)",
      SAMPLING, "top-k keeps k - 1 tokens (> instead of >=)"),
    M("S-min-p-unnormalised", "gemma_keras/generation/samplers.py",
      "np.exp(logits - top) < min_p", "np.exp(logits) < min_p",
      SAMPLING, "min-p compares exp(logit) with min_p, not the ratio to the top token"),
    M("S-repetition-penalty-sign", "gemma_keras/generation/samplers.py",
      "np.where(score < 0, score * penalty, score / penalty)",
      "np.where(score > 0, score * penalty, score / penalty)",
      SAMPLING, "repetition penalty multiplies positive logits and divides negative ones"),
    M("O-min-new-tokens-off-by-one", "gemma_keras/generation/options.py",
      "if n < self.min_new_tokens]", "if n <= self.min_new_tokens]",
      SAMPLING + ("tests/test_stopping_reference.py",),
      "min_new_tokens masks the stop ids for one token too many"),
    M("O-penalty-context-without-prompt", "gemma_keras/generation/options.py",
      "[row.prompt + row.generated for row in rows]",
      "[row.generated for row in rows]",
      SAMPLING, "repetition penalty counts only the generated tokens, not the prompt"),
    M("T-stream-releases-stop-prefix", "gemma_keras/generation/stopping.py",
      "range(min(len(s) - 1, len(text)), 0, -1)",
      "range(min(len(s) - 1, len(text)), 1, -1)",
      STOPPING + ("tests/test_generate_api.py",),
      "a stream emits a 1-character start of a stop string before it is decided"),
    M("G-chat-drops-pending-token", "gemma_keras/generation/chat.py",
      "self._pending = generated[-1:]", "self._pending = []",
      ("tests/test_generation.py", "tests/test_generate_api.py"),
      "chat forgets to feed the reply's last sampled token to the cache"),
    M("Z-chat-turn-without-newline", "gemma_keras/tokenizer.py",
      "format_turn(role, t) + \"<end_of_turn>\\n\"",
      "format_turn(role, t) + \"<end_of_turn>\"",
      TOKENIZER + ("tests/test_first_hour.py::test_hf_checkpoint_carries_the_chat_template",),
      "chat format closes a turn without its newline"),
    M("Z-detokenize-vocabulary-boundary", "gemma_keras/tokenizer.py",
      "0 <= int(i) < self.vocabulary_size", "0 <= int(i) <= self.vocabulary_size",
      TOKENIZER, "detokenize keeps the id equal to the vocabulary size (past the table)"),

    # ---- speculative decoding and drafting -------------------------------------------------------
    M("P-accept-ratio-inverted", "gemma_keras/generation/speculative.py",
      "if rng.random() * q[token] < p[j, token]:",
      "if rng.random() * p[j, token] < q[token]:",
      SPECULATIVE, "draft accepted with probability min(1, q / p) instead of min(1, p / q)"),
    M("P-device-accepts-any-agreement", "gemma_keras/generation/speculative.py",
      "accepted = ops.sum(ops.cumprod(ops.cast(agree, \"int32\"), axis=1), axis=1)",
      "accepted = ops.sum(ops.cast(agree, \"int32\"), axis=1)",
      SPECULATIVE, "compiled rounds count agreeing drafts, not the agreeing prefix"),
    # Drafting bugs that only change which drafts are proposed leave the output exact (each
    # draft is verified; even a sampled draft judged as one-hot keeps the target's
    # distribution), so the one here is in what a drafter is allowed to be.
    M("D-draft-with-larger-vocabulary-accepted", "gemma_keras/causal_lm.py",
      "    if ours != theirs:\n", "    if ours > theirs:\n",
      SPECULATIVE, "a draft model whose vocabulary is larger than the target's is accepted"),

    # ---- beam search ------------------------------------------------------------------------------
    M("M-last-step-not-finished", "gemma_keras/generation/beam.py",
      "(step + 1 >= max_new_tokens)", "(step + 1 > max_new_tokens)",
      BEAM, "beams reaching max_new_tokens are not finished hypotheses"),
    M("M-length-penalty-off-by-one", "gemma_keras/generation/beam.py",
      "penalized = top_scores / np.float32(float(step + 1) ** sampler.length_penalty)",
      "penalized = top_scores / np.float32(float(step + 2) ** sampler.length_penalty)",
      BEAM, "finished beams length-penalised with one token too many"),

    # ---- gemma_keras/evaluation ---------------------------------------------------------------------
    M("E-rolling-context-short", "gemma_keras/evaluation/scoring.py",
      "tokens[end - max_length - 1:done]", "tokens[end - max_length:done]",
      SCORING, "rolling windows read one context token fewer than lm-eval's"),
    M("E-harness-double-bos", "gemma_keras/evaluation/harness.py",
      "add_bos = (not string.startswith(bos_text) if add_special_tokens is None",
      "add_bos = (True if add_special_tokens is None",
      ("tests/test_evaluation_harness.py", "tests/test_scoring_reference.py"),
      "tok_encode adds <bos> to a string that starts with <bos>"),

    # ---- gemma_keras/exporting --------------------------------------------------------------------
    M("X-saved-model-first-position", "gemma_keras/exporting/signatures.py",
      "next_positions = ops.max(positions, axis=1) + 1",
      "next_positions = ops.max(positions, axis=1)",
      SAVED_MODEL, "SavedModel's first decoded token reuses the last prompt position",
      k="saved_model", backend="tensorflow"),

    # ---- gemma_keras/checkpoints --------------------------------------------------------------------
    M("K-hf-query-scale-always-head-dim", "gemma_keras/checkpoints/hf_format.py",
      'values["query_head_dim_normalize"] = scalar == head_dim',
      'values["query_head_dim_normalize"] = True',
      NUMERICS, "HF Gemma 2 config: query_pre_attn_scalar ignored (the 27B query scale)"),
    M("K-hf-rms-eps-ignored", "gemma_keras/checkpoints/hf_format.py",
      "layer_norm_epsilon=float(hf.get(\"rms_norm_eps\", 1e-6))",
      "layer_norm_epsilon=1e-6",
      NUMERICS, "HF config's rms_norm_eps ignored when reading a checkpoint"),
    M("K-keras-hub-kernel-reshaped", "gemma_keras/checkpoints/keras_hub_format.py",
      "lambda a: a.transpose(0, 2, 1).reshape(heads * h, d)",
      "lambda a: a.reshape(heads * h, d)",
      NUMERICS, "keras-hub q/k/v kernels reshaped where they must be transposed"),
    M("K-hf-writer-query-scalar-swapped", "gemma_keras/checkpoints/hf_writer.py",
      "query_pre_attn_scalar=config.query_scale ** -2,",
      "query_pre_attn_scalar=config.head_dim,",
      ("tests/test_parity.py", "tests/test_config_numerics.py"),
      "HF save writes the other query_pre_attn_scalar"),
    M("K-atomic-removes-running-saves", "gemma_keras/checkpoints/atomic.py",
      "leftovers = [entry for entry in _leftovers(target) if not _running(entry[2])]",
      "leftovers = list(_leftovers(target))",
      ("tests/test_crash_safety.py",),
      "a save's tidy-up deletes the temporaries of a save still running",
      k="leftovers"),

    # ---- tokenizer-side training data, training, LoRA ---------------------------------------------
    M("R-first-response-label-untrained", "gemma_keras/preprocessor.py",
      "weight = mask[:, 1:] & (column >= np.array(starts)[:, None])",
      "weight = mask[:, 1:] & (column > np.array(starts)[:, None])",
      LORA, "prompt/response pairs: the response's first token gets no loss"),
    M("R-tf-first-response-label-untrained", "gemma_keras/preprocessor.py",
      "weight = tf.logical_and(mask[:, 1:], column >= starts[:, None])",
      "weight = tf.logical_and(mask[:, 1:], column > starts[:, None])",
      LORA, "tf.data preprocessing: the response's first token gets no loss"),
    M("N-loss-averages-padding", "gemma_keras/training.py",
      "reduction=\"mean_with_sample_weight\"", "reduction=\"sum_over_batch_size\"",
      LORA, "default loss averages over padding and prompt labels too"),
    M("N-accuracy-on-bfloat16-logits", "gemma_keras/training.py",
      "return super().update_state(y_true, keras.ops.cast(y_pred, \"float32\"), sample_weight)",
      "return super().update_state(y_true, y_pred, sample_weight)",
      LORA, "accuracy compares ids on bfloat16 logits (ids above 256 round)"),
    M("N-perplexity-ignores-weights", "gemma_keras/training.py",
      "weight = (keras.ops.ones_like(losses) if sample_weight is None\n"
      "                  else keras.ops.cast(sample_weight, \"float32\"))",
      "weight = keras.ops.ones_like(losses)",
      LORA, "perplexity counts padding and prompt labels"),
    M("A-alpha-argument-dropped", "gemma_keras/lora.py",
      "layer.enable_lora(rank, lora_alpha=rank if alpha is None else alpha)",
      "layer.enable_lora(rank, lora_alpha=rank)",
      LORA, "enable_lora ignores alpha"),
    M("A-parameter-count-value-heads", "gemma_keras/lora.py",
      "\"value\": (d, k * h)", "\"value\": (d, n * h)",
      LORA, "LoRA parameter count sizes the value projection by query heads"),

    # ---- quantization ---------------------------------------------------------------------------------
    M("Q-unpack-loses-sign", "gemma_keras/quantization.py",
      "low = np.left_shift(packed, 4) >> 4", "low = packed & 0x0F",
      QUANTIZED, "int4 unpacking loses the low nibble's sign"),
    M("Q-dequantize-zero-sign", "gemma_keras/quantization.py",
      "((q - np.asarray(zero, np.float32)[..., None])",
      "((q + np.asarray(zero, np.float32)[..., None])",
      QUANTIZED, "int4 dequantization adds the zero point instead of subtracting it"),

    # ---- backends ---------------------------------------------------------------------------------------
    M("Y-common-int8-scale-multiplied", "gemma_keras/backends/common.py",
      "return y / keras.ops.cast(scale, y.dtype)", "return y * keras.ops.cast(scale, y.dtype)",
      QUANTIZED, "int8 product multiplied by the scale instead of divided (Keras' convention)"),
    M("Y-common-int4-nibbles-swapped", "gemma_keras/backends/common.py",
      "return ops.right_shift(ops.left_shift(packed, 4), 4), ops.right_shift(packed, 4)",
      "return ops.right_shift(packed, 4), ops.right_shift(ops.left_shift(packed, 4), 4)",
      QUANTIZED, "int4 nibbles read high first: even and odd inputs swapped"),
    M("Y-jax-wide-product-narrow", "gemma_keras/backends/jax.py",
      "return jax.numpy.einsum(\"...d,fd->...f\", x, kernel,\n"
      "                            preferred_element_type=jax.numpy.dtype(out_dtype))",
      "return jax.numpy.einsum(\"...d,fd->...f\", x, kernel)",
      FLOAT16, "JAX: a float16 product asked for a float32 result returns float16"),
    M("Y-tensorflow-eager-wide-product-narrow", "gemma_keras/backends/tensorflow.py",
      "return linear(tf.cast(x, wide), tf.cast(kernel, wide))",
      "return linear(x, kernel)",
      FLOAT16, "TensorFlow outside XLA: out_dtype dropped, float16 result",
      backend="tensorflow"),
    M("Y-torch-int4-zero-sign", "gemma_keras/backends/torch.py",
      "pairs = torch.stack([scale, -zero * scale], dim=-1)",
      "pairs = torch.stack([scale, zero * scale], dim=-1)",
      QUANTIZED, "torch int4 kernel: offset +zero * scale instead of -zero * scale",
      backend="torch"),
    M("Y-torch-int8-scale-not-inverted", "gemma_keras/backends/torch.py",
      "lambda s: (1.0 / s.reshape(-1)).to(torch.bfloat16)",
      "lambda s: s.reshape(-1).to(torch.bfloat16)",
      QUANTIZED, "torch int8 kernel given the scale instead of its inverse",
      backend="torch"),
    M("Y-torch-in-place-write-shared-buffer", "gemma_keras/backends/torch.py",
      "if buffer.unique() not in donated or len(readers) != 1:",
      "if buffer.unique() not in donated or len(readers) < 1:",
      ("tests/test_backends.py", "tests/test_generation.py"),
      "torch writes a donated cache in place although another op still reads it",
      backend="torch"),

    # ---- cli ------------------------------------------------------------------------------------------------
    M("I-cli-zero-accepted-as-positive", "gemma_keras/cli.py",
      "if value <= 0:", "if value < 0:",
      CLI, "CLI: 0 accepted where a positive number is required (--max-new-tokens 0)"),
    M("I-cli-repetition-penalty-dropped", "gemma_keras/cli.py",
      "repetition_penalty=args.repetition_penalty)", "repetition_penalty=None)",
      CLI, "CLI: --repetition-penalty checked but not passed to generate / chat"),
]
del M

# pytest exit statuses: 0 passed, 1 failed, 2 interrupted, 3 internal error, 4 usage error,
# 5 no tests collected.
RESULT_OF_EXIT = {0: "survived", 1: "caught"}

GUARD_PLUGIN = '''"""Loaded by scripts/mutation_check.py with -p: stops the run unless gemma_keras is the
copy's (the venv's editable install points at the working tree)."""
import importlib.util
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(os.environ["GEMMA_KERAS_MUTATION_ROOT"]).resolve()


def _inside(path):
    try:
        pathlib.Path(path).resolve().relative_to(ROOT)
        return True
    except ValueError:
        return False


def pytest_configure(config):
    spec = importlib.util.find_spec("gemma_keras")  # finds, does not import
    if spec is None or not _inside(spec.origin):
        pytest.exit(f"mutation guard: gemma_keras would come from "
                    f"{spec and spec.origin}, not from the copy {ROOT}", returncode=4)


def pytest_collection_finish(session):
    import gemma_keras  # by now conftest has set the backend's environment

    if not _inside(gemma_keras.__file__):
        pytest.exit(f"mutation guard: gemma_keras was imported from "
                    f"{gemma_keras.__file__}, not from the copy {ROOT}", returncode=4)
    print(f"mutation guard: gemma_keras from {gemma_keras.__file__}", file=sys.stderr)
'''

# What the snapshot leaves out (everything else in the working tree is copied).
_SKIP = {".git", ".venv", ".pytest_cache", "__pycache__", "build", "dist", ".cache"}


def _ignore(directory, names):
    return [n for n in names if n in _SKIP or n.endswith((".egg-info", ".pyc"))]


def problems(mutations, root=ROOT) -> Dict[str, str]:
    """id -> why the entry cannot be applied to the tree at `root` (empty: all fine)."""
    found = {}
    seen = set()
    for m in mutations:
        if m.id in seen:
            found[m.id] = "duplicate id"
        seen.add(m.id)
        path = root / m.file
        if not path.is_file():
            found[m.id] = f"{m.file} does not exist"
            continue
        count = path.read_text().count(m.old)
        if count != 1:
            found[m.id] = f"the old snippet occurs {count} times in {m.file} (must be once)"
        elif m.old == m.new:
            found[m.id] = "old and new are the same"
        elif m.backend not in ("jax", "tensorflow", "torch"):
            found[m.id] = f"unknown backend {m.backend!r}"
    return found


def apply(mutation, copy: pathlib.Path):
    path = copy / mutation.file
    text = path.read_text()
    assert text.count(mutation.old) == 1, mutation.id  # checked on the snapshot already
    path.write_text(text.replace(mutation.old, mutation.new))


def test_args(tests, copy: pathlib.Path) -> Tuple[List[str], List[str]]:
    """(pytest arguments that exist in the copy, the ones that do not)."""
    present, missing = [], []
    for item in tests:
        file = item.split("::")[0]
        if any(c in file for c in "*?["):
            matches = sorted(str(pathlib.Path(p).relative_to(copy))
                             for p in glob.glob(str(copy / file)))
            (present.extend(matches) if matches else missing.append(item))
        elif (copy / file).exists():
            present.append(item)
        else:
            missing.append(item)
    return present, missing


class Runner:
    def __init__(self, workdir: pathlib.Path, timeout: Optional[float], keep_copies=False):
        self.workdir = workdir
        self.snapshot = workdir / "snapshot"
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.plugin_dir = workdir / "plugin"
        self.plugin_dir.mkdir(exist_ok=True)
        (self.plugin_dir / "_mutation_guard.py").write_text(GUARD_PLUGIN)
        self.jax_cache = workdir / "jax_cache"
        self.jax_cache.mkdir(exist_ok=True)
        self.timeout = timeout
        self.keep_copies = keep_copies
        self._count = 0
        self._lock = threading.Lock()
        self.processes = set()

    def take_snapshot(self):
        shutil.copytree(ROOT, self.snapshot, ignore=_ignore, symlinks=True)

    def _new_copy(self, name) -> pathlib.Path:
        with self._lock:
            self._count += 1
            copy = self.workdir / f"run{self._count:03d}_{name}" / "repo"
        shutil.copytree(self.snapshot, copy, symlinks=True)
        return copy

    def run(self, name, tests, k, backend, mutation=None, timeout=None, baseline=False):
        """One pytest run on a fresh copy: a dict with exit code, seconds, log path, notes.
        baseline: no -x (every test's outcome is wanted), outcomes kept from JUnit XML."""
        copy = self._new_copy(name)
        if mutation is not None:
            apply(mutation, copy)
        present, missing = test_args(tests, copy)
        log = self.logs / f"{name}.log"
        record = {"missing_tests": missing, "log": str(log)}
        if not present:
            record.update(exit=5, seconds=0.0, note="none of its test files exist")
            log.write_text(f"none of {list(tests)} exist in the copy\n")
            self._drop(copy)
            return record
        env = dict(os.environ)
        env.update(KERAS_BACKEND=backend, OMP_NUM_THREADS="1", GEMMA_KERAS_TEST_ALL="1",
                   PYTHONDONTWRITEBYTECODE="1", GEMMA_KERAS_MUTATION_ROOT=str(copy),
                   HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3")
        env["PYTHONPATH"] = os.pathsep.join(
            [str(copy), str(self.plugin_dir)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        if backend == "jax":  # one compilation cache for the whole invocation (see the doc)
            env.update(JAX_COMPILATION_CACHE_DIR=str(self.jax_cache),
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                       JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        else:
            env.pop("JAX_COMPILATION_CACHE_DIR", None)
        junit = copy.parent / "junit.xml"
        command = ([sys.executable, "-m", "pytest"] + ([] if baseline else ["-x"])
                   # -o addopts=: pyproject's "-q" and ours would make -qq, which hides
                   # the "N passed" line the logs should show.
                   + ["-q", "-o", "addopts=", "-p", "no:cacheprovider", "-p", "_mutation_guard",
                      f"--basetemp={copy.parent / 'pytest_tmp'}"]
                   + ([f"--junitxml={junit}"] if baseline else [])
                   + present + (["-k", k] if k else []))
        limit = timeout or self.timeout
        start = time.monotonic()
        with open(log, "w") as out:
            out.write(f"$ cd {copy} && KERAS_BACKEND={backend} {' '.join(command)}\n")
            if mutation is not None:
                out.write(f"# {mutation.file}:\n# - {mutation.old!r}\n# + {mutation.new!r}\n")
            out.flush()
            process = subprocess.Popen(command, cwd=copy, env=env, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            self.processes.add(process)
            try:
                code = process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                _kill(process)
                code = None
            finally:
                self.processes.discard(process)
        record.update(exit=code, seconds=round(time.monotonic() - start, 1))
        if code is None:
            record["note"] = f"passed the {limit:.0f} s limit"
        if baseline:
            record["outcomes"] = _junit_outcomes(junit) if junit.is_file() else {}
        self._drop(copy)
        return record

    def _drop(self, copy):
        if not self.keep_copies:
            shutil.rmtree(copy.parent, ignore_errors=True)

    def stop_all(self):
        for process in list(self.processes):
            _kill(process)


def _kill(process):
    """Ends a run and every process it started (its own session)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _junit_outcomes(path) -> Dict[str, Tuple[str, float]]:
    """test id ("tests/test_x.py::test_y[param]") -> ("passed" / "failed" / "skipped",
    seconds) from pytest's JUnit XML."""
    import xml.etree.ElementTree as ElementTree

    outcomes = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/") + ".py"
        kinds = {child.tag for child in case}
        outcome = ("failed" if kinds & {"failure", "error"} else
                   "skipped" if "skipped" in kinds else "passed")
        outcomes[f"{module}::{case.get('name')}"] = (outcome, float(case.get("time") or 0))
    return outcomes


def _file_of(item):
    return item.split("::")[0]


def baseline_groups(mutations, jobs):
    """The unmutated runs that cover `mutations`: per (backend, -k), the union of their test
    files, split into up to `jobs` runs of whole files. [(backend, k, [pytest args])]."""
    groups = {}
    for m in mutations:
        groups.setdefault((m.backend, m.k), []).extend(m.tests)
    runs = []
    for (backend, k), items in groups.items():
        items = list(dict.fromkeys(items))
        whole = {i for i in items if "::" not in i}
        items = [i for i in items if "::" not in i or _file_of(i) not in whole]
        parts = max(1, min(jobs, len(items)))
        for n in range(parts):
            runs.append((backend, k, items[n::parts]))
    return runs


def baseline_verdict(mutation, baselines):
    """(None when every test the mutation selects passed unmutated, else why not; the seconds
    those tests took unmutated)."""
    seconds, why = 0.0, []
    for item in mutation.tests:
        file = _file_of(item)
        runs = [r for r in baselines if r["backend"] == mutation.backend
                and r["k"] == mutation.k and (item in r["tests"] or file in r["tests"])]
        if not runs:
            return f"no baseline ran {item}", seconds
        run = runs[0]
        if item in run["missing_tests"] or file in run["missing_tests"]:
            continue  # not in the tree: left out of the mutation's run as well
        if result_of(run) not in ("survived", "caught"):
            why.append(f"{file}: baseline {result_of(run)} ({run['log']})")
            continue
        for test, (outcome, took) in run.get("outcomes", {}).items():
            if test.startswith(file + "::") and ("::" not in item
                                                 or test.split("[")[0] == item):
                seconds += took
                if outcome == "failed":
                    why.append(f"{test} fails unmutated")
    return ("; ".join(why) or None), seconds


def result_of(record):
    if record["exit"] is None:
        return "timeout"
    return RESULT_OF_EXIT.get(record["exit"], "broken")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated mutation ids to run")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--check", action="store_true",
                        help="check that every old snippet occurs exactly once, run nothing")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (default 2)")
    parser.add_argument("--timeout", type=float,
                        help="seconds per mutation run (default: max(600, 3 x its baseline))")
    parser.add_argument("--baseline-timeout", type=float, default=1800,
                        help="seconds per baseline run (default 1800)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the unmutated runs (a red run may then not be the bug's)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="report entries whose snippet is not found once, run the rest")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--workdir", help="copies and logs go here (default: a new temp dir)")
    parser.add_argument("--keep-copies", action="store_true", help="keep each run's copy")
    args = parser.parse_args(argv)

    chosen = MUTATIONS
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        by_id = {m.id: m for m in MUTATIONS}
        unknown = [w for w in wanted if w not in by_id]
        if unknown:
            parser.error(f"unknown mutation id(s) {unknown}; see --list")
        chosen = [by_id[w] for w in wanted]

    if args.list:
        for m in chosen:
            tests = " ".join(m.tests) + (f" -k {m.k!r}" if m.k else "")
            flag = "  [expected to survive]" if m.survives else ""
            print(f"{m.id}  ({m.backend})  {m.file}\n    {m.description}{flag}\n    {tests}")
        print(f"{len(chosen)} mutations")
        return 0

    if args.check:
        bad = problems(chosen)
        for mid, why in bad.items():
            print(f"invalid: {mid}: {why}", file=sys.stderr)
        print(f"{len(chosen) - len(bad)} of {len(chosen)} mutations apply cleanly")
        return 1 if bad else 0

    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="gemma_mutation_"))
    workdir.mkdir(parents=True, exist_ok=True)
    runner = Runner(workdir, args.timeout, args.keep_copies)
    runner.take_snapshot()
    print(f"snapshot of {ROOT} in {runner.snapshot}; logs in {runner.logs}", flush=True)
    # Checked on the snapshot: the working tree may change while this runs.
    bad = problems(chosen, runner.snapshot)
    for mid, why in bad.items():
        print(f"invalid: {mid}: {why}", file=sys.stderr)
    if bad and not args.skip_invalid:
        print("refusing to run: fix the entries above (or pass --skip-invalid)",
              file=sys.stderr)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        return 2
    runnable = [m for m in chosen if m.id not in bad]
    results = {m.id: {"id": m.id, "file": m.file, "description": m.description,
                      "backend": m.backend, "tests": list(m.tests), "k": m.k,
                      "expected_to_survive": m.survives or None} for m in chosen}
    for mid, why in bad.items():
        results[mid].update(result="invalid", seconds=0.0, note=why)

    baselines = []
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs))
    try:
        if not args.no_baseline:
            planned = baseline_groups(runnable, max(1, args.jobs))
            futures = {pool.submit(runner.run, f"baseline{i:02d}_{backend}", tests, k, backend,
                                   None, args.baseline_timeout, True): (backend, k, tests)
                       for i, (backend, k, tests) in enumerate(planned)}
            for future in concurrent.futures.as_completed(futures):
                backend, k, tests = futures[future]
                record = future.result()
                record.update(backend=backend, k=k, tests=tests)
                baselines.append(record)
                failed = [t for t, (o, _) in record.get("outcomes", {}).items() if o == "failed"]
                verdict = {"survived": "green", "caught": "RED"}.get(result_of(record),
                                                                      result_of(record))
                print(f"baseline {backend:10} {verdict:8} {record['seconds']:7.1f} s  "
                      f"{' '.join(tests)}" + (f" -k {k!r}" if k else "")
                      + (f"\n  failing unmutated: {', '.join(failed)}" if failed else "")
                      + (f"\n  not in the tree: {record['missing_tests']}"
                         if record["missing_tests"] else ""), flush=True)

        def launch(m):
            why, seconds = (baseline_verdict(m, baselines) if not args.no_baseline
                            else (None, None))
            if why is not None:
                return {"exit": None, "seconds": 0.0, "skipped": True, "note": why,
                        "missing_tests": [], "log": ""}
            limit = args.timeout or max(600.0, 3 * (seconds or 200.0) + 120)
            return runner.run(m.id, m.tests, m.k, m.backend, m, limit)

        futures = {pool.submit(launch, m): m for m in runnable}
        for future in concurrent.futures.as_completed(futures):
            m = futures[future]
            record = future.result()
            result = "not run" if record.get("skipped") else result_of(record)
            results[m.id].update(result=result, seconds=record["seconds"],
                                 exit=record.get("exit"), log=record["log"],
                                 missing_tests=record["missing_tests"],
                                 note=record.get("note"))
            print(f"{result:8} {record['seconds']:7.1f} s  {m.id}"
                  + (f"  ({record['note']})" if record.get("note") else ""), flush=True)
    except KeyboardInterrupt:
        runner.stop_all()
        pool.shutdown(wait=False, cancel_futures=True)
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        pool.shutdown(wait=True)

    rows = [results[m.id] for m in chosen]
    _table(rows)
    counted = [r for r in rows if r.get("result") in ("caught", "survived")]
    caught = sum(r["result"] == "caught" for r in counted)
    share = 100.0 * caught / len(counted) if counted else 0.0
    print(f"\ncaught {caught} of {len(counted)} mutations that ran to a verdict: {share:.1f}%")
    for kind in ("survived", "broken", "timeout", "not run", "invalid"):
        ids = [r["id"] for r in rows if r.get("result") == kind]
        if ids:
            print(f"{kind}: {', '.join(ids)}")
    for r in rows:
        if r.get("result") == "survived" and r.get("expected_to_survive"):
            print(f"  {r['id']} was expected to survive: {r['expected_to_survive']}")
        if r.get("missing_tests"):
            print(f"  {r['id']}: test files not in the tree, left out: {r['missing_tests']}")
    print(f"logs: {runner.logs}")
    if args.json:
        summary = {"caught": caught, "counted": len(counted), "caught_percent": round(share, 1),
                   "baselines": [{"tests": r["tests"], "k": r["k"], "backend": r["backend"],
                                  "result": {"survived": "green", "caught": "red"}.get(
                                      result_of(r), result_of(r)), "seconds": r["seconds"],
                                  "failing": [t for t, (o, _) in r.get("outcomes", {}).items()
                                              if o == "failed"],
                                  "log": r["log"]} for r in baselines]}
        pathlib.Path(args.json).write_text(json.dumps({"summary": summary, "mutations": rows},
                                                      indent=1))
    if not args.keep_copies:
        shutil.rmtree(runner.snapshot, ignore_errors=True)
    return 0


def _table(rows):
    headers = ("id", "file", "description", "result", "seconds")
    cells = [(r["id"], r["file"].replace("gemma_keras/", ""), r["description"],
              r.get("result", "?"), f"{r.get('seconds', 0.0):.0f}") for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    print()
    print(" | ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("-|-".join("-" * w for w in widths))
    for c in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(c, widths)))


if __name__ == "__main__":
    sys.exit(main())
