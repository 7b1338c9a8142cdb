"""The functions an exported Gemma runs, traced in TensorFlow through the model's one forward
path (`GemmaBackbone.call` with an explicit cache) and the library's greedy loop.

Only imported under the TensorFlow backend (see `gemma_keras.exporting.build`).

Two families:
- SavedModel: `logits` (token ids -> logits) and `generate` / `generate_no_chat_template`
  (strings -> strings, the chat template and the SentencePiece tokenizer inside the graph
  through tensorflow-text, prefill then a greedy while-loop compiled by XLA).
- LiteRT: `prefill` and `decode`, batch 1, fixed shapes, the KV cache as named inputs and
  outputs (`kv_cache_k_{layer}`, `kv_cache_v_{layer}`, each [1, max_length, kv_heads,
  head_dim]) so an on-device runtime keeps it between calls.
"""

from __future__ import annotations

import tensorflow as tf
from keras import ops

from gemma_keras.backends.tensorflow import exporting
from gemma_keras.layers.kv_cache import Mode, from_per_layer, init_cache, per_layer
from gemma_keras.generation.steps import greedy_loop, hits_stop, model_step
from gemma_keras.tokenizer import strip_graph


def cache_names(config):
    """The LiteRT cache tensors' names, in layer order: k_0, v_0, k_1, v_1, ..."""
    return [f"kv_cache_{part}_{i}" for i in range(config.num_layers) for part in ("k", "v")]


def litert_step(backbone, max_length, with_logits):
    """The body of `prefill` (with_logits=False) and `decode` (True).

    tokens [1, L] int32 and input_pos [L] int32: the tokens' positions, which are also their
    cache slots (batch 1, the stream starts at slot 0), -1 for padding at the end of a short
    prefill chunk. The chunk is written into the cache and then attended over (the backbone's
    "decode" mode, on a cache without a ring; see cache.cache_slots), so prefill and decode
    are the same computation and a long prompt can be prefilled chunk by chunk.

    Why the cache carries no positions: slot s holds position s once written. Handing the
    backbone arange(max_length) as the slots' positions makes every slot after the query
    invisible (the future), every slot before it visible (written by an earlier call), and
    padding slots -1 (the write puts the chunk's positions there).
    """
    config = backbone.config

    def step(tokens, input_pos, caches):
        slot_positions = ops.arange(max_length, dtype="int32")[None, :]  # [1, max_length]
        names = cache_names(config)
        cache = from_per_layer(config, [(caches[k], caches[v])
                                        for k, v in zip(names[::2], names[1::2])],
                               slot_positions)
        with exporting():
            # logits: [1, vocab], the last token's only; an on-device sampler reads them.
            logits, cache = model_step(backbone, tokens, input_pos[None, :], cache,
                                       input_pos[0], Mode.DECODE,
                                       "last" if with_logits else None)
        outputs = dict(zip(names, [t for key_value in per_layer(config, cache)
                                   for t in key_value]))
        if with_logits:
            outputs["logits"] = logits
        return outputs
    return step


def litert_signature(config, length, max_length, dtype="float32"):
    cache_shape = (1, max_length, config.num_key_value_heads, config.head_dim)
    return [tf.TensorSpec((1, length), tf.int32, name="tokens"),
            tf.TensorSpec((length,), tf.int32, name="input_pos"),
            {name: tf.TensorSpec(cache_shape, dtype, name=name) for name in cache_names(config)}]


def logits_fn(backbone):
    def logits(token_ids, padding_mask):
        hidden = backbone({"token_ids": token_ids, "padding_mask": padding_mask})
        return {"logits": ops.cast(backbone.logits(hidden), "float32")}  # [batch, seq, vocab]
    return logits


def chat_wrap(prompts, template):
    """prompts [batch] string -> each sent as one user turn of Gemma's chat format, unless
    empty or already holding turn markers: `generate`'s chat_template="auto" for an instruct
    model, in graph ops, with the template strings from `chat_template_metadata` (see
    `gemma_keras.exporting.apply_chat_template`, the same rule in Python)."""
    marker = template["unless_contains"]
    # \Q...\E: RE2 reads the marker literally; (?s): "." also matches newlines.
    has_turns = tf.strings.regex_full_match(prompts, f"(?s).*\\Q{marker}\\E.*")
    keep = tf.logical_or(tf.equal(prompts, ""), has_turns)
    # Trimmed as format_chat trims (exports made before it did record no "strip").
    body = strip_graph(prompts) if template.get("strip") else prompts
    wrapped = tf.strings.join([template["prefix"], body, template["suffix"]])
    return tf.where(keep, prompts, wrapped)


def generate_fns(backbone, tokenizer, max_length, stop_ids, instruct=False, template=None,
                 skip_ids=()):
    """(generate, generate without the chat template, tokenizer resource):
    `generate(prompts [batch] string, max_new_tokens int32 scalar)` -> {"completion": [batch]
    string, "text": prompt + completion, "token_ids": [batch, max_new_tokens] int32 (the
    completion's ids, padded with <pad>), "num_tokens": [batch] int32}.

    Same semantics as `GemmaCausalLM.generate` with the greedy sampler and its defaults:
    an instruct model's prompts wrapped in the chat template (`chat_wrap`; the second
    function never wraps, as chat_template=False), <bos> then the prompt, ragged batches
    left-padded (each row's positions count its own tokens), stop ids ending each row on its
    own, the stop token not part of the completion, `skip_ids` (special pieces) and ids past
    the SentencePiece vocabulary left out of the text.
    """
    import tensorflow_text as tf_text

    config = backbone.config
    pad = tokenizer.pad_token_id
    sp = tf_text.SentencepieceTokenizer(model=tokenizer.proto, out_type=tf.int32)
    stops = tf.constant(sorted(stop_ids) or [-1], tf.int32)
    dtype = backbone.dtype_policy.compute_dtype

    @tf.function(jit_compile=True)
    def decode(ids, positions, steps):
        # ids, positions: [batch, prompt] (left-padded, -1 positions on padding).
        batch, width = ops.shape(ids)[0], ops.shape(ids)[1]
        cache = init_cache(config, batch, max_length, dtype)
        logits, cache = model_step(backbone, ids, positions, cache, 0, Mode.PREFILL)
        first = ops.cast(ops.argmax(logits, axis=-1), "int32")  # [batch]
        done = hits_stop(first, stops)
        next_positions = ops.max(positions, axis=1) + 1
        out, count, _, _ = greedy_loop(backbone, pad)(
            first, next_positions, done, cache, width, steps - 1, stops)
        return ops.concatenate([first[:, None], out], axis=1), count + 1  # [batch, 1 + slots]

    skips = tf.constant(sorted(skip_ids) or [-1], tf.int32)

    def generate(prompts, max_new_tokens, chat_template):
        sent = chat_wrap(prompts, template) if chat_template else prompts
        ragged = sp.tokenize(sent)  # [batch, (len)]
        bos = tf.fill([tf.shape(prompts)[0], 1], tokenizer.bos_token_id)
        ragged = tf.concat([tf.RaggedTensor.from_tensor(bos), ragged], axis=1)
        lengths = tf.cast(ragged.row_lengths(), tf.int32)
        width = tf.reduce_max(lengths)
        checks = [
            tf.debugging.assert_greater(max_new_tokens, 0,
                                        message="max_new_tokens must be at least 1."),
            tf.debugging.assert_less_equal(
                width + max_new_tokens, max_length,
                message=f"prompt tokens + max_new_tokens exceed this export's max_length of "
                        f"{max_length}; shorten the prompt, lower max_new_tokens, or export "
                        "with a larger max_length.")]
        with tf.control_dependencies(checks):  # before anything sized by them runs
            width = tf.identity(width)
        # XLA compiles the model per prompt width: pad it to a power-of-two bucket (at least
        # 16, as GemmaCausalLM.generate), so a new prompt length rarely compiles again.
        bucket = tf.while_loop(lambda b: b < width, lambda b: b * 2, [tf.constant(16)])[0]
        bucket = tf.minimum(bucket, max_length - max_new_tokens)
        # Left padding: reverse each row, pad on the right, reverse back. [batch, bucket]
        ids = tf.reverse(tf.reverse(ragged, [1]).to_tensor(pad), [1])
        ids = tf.pad(ids, [[0, 0], [bucket - width, 0]], constant_values=pad)
        real = tf.reverse(tf.sequence_mask(lengths, bucket), [1])  # [batch, bucket]
        positions = tf.where(real, tf.cumsum(tf.cast(real, tf.int32), axis=1) - 1, -1)
        tokens, count = decode(ids, positions, max_new_tokens)
        tokens = tokens[:, :count]  # [batch, count]
        # A row's completion ends before its first stop id.
        is_stop = hits_stop(tokens, stops)  # [batch, count]
        keep = tf.logical_not(tf.cast(tf.cumsum(tf.cast(is_stop, tf.int32), axis=1), tf.bool))
        kept = tf.ragged.boolean_mask(tokens, keep)
        # As GemmaTokenizer.detokenize(skip_special=True): ids past the SentencePiece
        # vocabulary (checkpoints pad the embedding table; the op would fail on them) and the
        # special pieces are dropped from the text.
        visible = tf.logical_and(kept.values < tokenizer.vocabulary_size,
                                 tf.logical_not(hits_stop(kept.values, skips)))
        completion = sp.detokenize(tf.ragged.boolean_mask(kept, kept.with_values(visible)))
        dense = kept.to_tensor(pad)  # [batch, longest completion]
        padded = tf.pad(dense, [[0, 0], [0, max_new_tokens - tf.shape(dense)[1]]],
                        constant_values=pad)
        return {"completion": completion, "text": tf.strings.join([prompts, completion]),
                "token_ids": padded, "num_tokens": tf.cast(kept.row_lengths(), tf.int32)}

    def generate_default(prompts, max_new_tokens):  # lm.generate(prompts)
        return generate(prompts, max_new_tokens, instruct)

    def generate_no_chat_template(prompts, max_new_tokens):  # chat_template=False
        return generate(prompts, max_new_tokens, False)
    return generate_default, generate_no_chat_template, sp
