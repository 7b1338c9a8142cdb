"""Run by tests/test_distribution.py in a child process with 8 virtual CPU devices (XLA_FLAGS
must be set before JAX starts): the same tiny Gemmas on one device and under each mesh, with
logits, greedy tokens, one LoRA fit step and the weights' shardings printed as one JSON line.

Standalone: `python tests/distributed_child.py` (sets the flags itself)."""

import os

# Optimisation level 0: the programs are tiny and compiling them is most of the time; the
# SPMD partitioner, which is what is under test, runs at every level.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import gemma_keras as gk  # noqa: E402
from gemma_keras import distribution as dist  # noqa: E402
from gemma_keras.config import GemmaConfig  # noqa: E402
from gemma_keras.generation.session import GenerationSession  # noqa: E402
from gemma_keras.lora import ALL_TARGETS  # noqa: E402

COMMON = dict(vocabulary_size=256, num_layers=2, hidden_dim=64, intermediate_dim=192)
CASES = {
    # Gemma 1 MQA: one kv head of 16 rows, split 2 rows per device on a model axis of 8.
    "gemma_mqa": GemmaConfig(**COMMON, num_query_heads=4, num_key_value_heads=1, head_dim=16),
    # Gemma 2 GQA: 4 kv heads (the cache splits them on a model axis of 4, not of 8), a
    # sliding window shorter than the prompts, soft-caps and post-norms.
    "gemma2_gqa": GemmaConfig(
        **COMMON, num_query_heads=8, num_key_value_heads=4, head_dim=8,
        use_post_ffw_norm=True, use_post_attention_norm=True, attention_logit_soft_cap=4.0,
        final_logit_soft_cap=6.0, use_sliding_window_attention=True, sliding_window_size=5),
    # Gemma 3: QK-norms (replicated), RoPE per attention kind with x8 linear scaling on the
    # global layer, query_pre_attn_scalar, no soft-caps. Two layers: one local, one global.
    "gemma3": GemmaConfig(
        **COMMON, num_query_heads=8, num_key_value_heads=4, head_dim=8,
        use_post_ffw_norm=True, use_post_attention_norm=True, use_query_key_norm=True,
        use_sliding_window_attention=True, sliding_window_size=5, rope_max_wavelength=1e6,
        local_rope_max_wavelength=1e4, global_rope_scaling_factor=8.0,
        query_pre_attn_scalar=24.0),
}
# A vocabulary that 8 does not divide: the embedding must fall back to replication.
ODD_VOCAB = GemmaConfig(**{**COMMON, "vocabulary_size": 250}, num_query_heads=4,
                        num_key_value_heads=1, head_dim=16)
BATCH, SEQ, NEW = 8, 12, 10


def batch(vocab, seed=0):
    """[8, 12] ids with right padding of several lengths (labels only where real)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(4, vocab, size=(BATCH, SEQ)).astype("int32")
    ids[:, 0] = 2
    mask = np.ones_like(ids)
    for r in range(BATCH):
        mask[r, SEQ - r % 4:] = 0
    return ids * mask, mask


def write_preset(config, directory, seed=0):
    """A random preset whose greedy output wanders (weights large against the embedding)."""
    backbone = gk.GemmaBackbone(config)
    rng = np.random.RandomState(seed)
    for v in backbone.weights:
        std = 0.5 if "norm" in v.path else (0.01 if "embedding" in v.path else 0.3)
        v.assign(rng.normal(0, std, v.shape).astype("float32"))
    gk.GemmaCausalLM(backbone).save_to_preset(directory)


def set_adapters(backbone, seed=1):
    rng = np.random.RandomState(seed)
    for v in backbone.trainable_variables:
        v.assign(rng.normal(0, 0.2, v.shape).astype("float32"))


def spec_of(x):
    """{"spec": mesh axis per dimension, "split": whether a device holds less than all of
    it} for a variable or a JAX array."""
    x = getattr(x, "value", x)
    sharding = x.sharding
    spec = list(getattr(sharding, "spec", ()))
    spec += [None] * (len(x.shape) - len(spec))
    shard = sharding.shard_shape(tuple(x.shape))
    return {"spec": [s if isinstance(s, (str, type(None))) else str(s) for s in spec],
            "split": list(shard) != list(x.shape)}


def run(directory, config, distribution, fit=True):
    keras.distribution.set_distribution(distribution)
    try:
        lm = gk.GemmaCausalLM.from_preset(directory, load_tokenizer=False)
        ids, mask = batch(config.vocabulary_size)
        # Compiled (Keras' predict step), as eager op-by-op dispatch over 8 devices is slow.
        out = {"logits": np.asarray(lm.predict_on_batch(
            {"token_ids": ids, "padding_mask": mask})).tolist()}
        out["weights"] = {v.path: spec_of(v) for v in lm.backbone.weights}
        if not fit:
            return out
        # Greedy decoding of prompts of several lengths (left-padded inside generate).
        generated = lm.generate({"token_ids": ids[:, :7], "padding_mask": mask[:, :7]},
                                max_new_tokens=NEW, stop_token_ids=None)
        out["tokens"] = np.asarray(generated["token_ids"]).tolist()
        # The cache a generation session holds after its prefill (placed by shard_cache).
        session = GenerationSession(lm, [list(range(2, 9))] * BATCH, 16)
        out["cache"] = {kind: spec_of(part["kv"][0][0]) for kind, part in session.cache.items()}
        # One LoRA step on every projection; SGD so the update is the gradient itself, and
        # momentum so the optimizer has state whose layout follows its variable's.
        lm.backbone.enable_lora(rank=2, target_names=ALL_TARGETS)
        set_adapters(lm.backbone)
        lm.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0, momentum=0.5),
                   weighted_metrics=[])
        history = lm.fit({"token_ids": ids, "padding_mask": mask}, batch_size=BATCH,
                         epochs=1, verbose=0, shuffle=False)
        out["loss"] = float(history.history["loss"][0])
        out["adapters"] = {v.path: keras.ops.convert_to_numpy(v).tolist()
                           for v in lm.backbone.trainable_variables}
        out["adapter_weights"] = {v.path: spec_of(v) for v in lm.backbone.trainable_variables}
        out["optimizer"] = {v.path: spec_of(v) for v in lm.optimizer.variables
                            if len(v.shape) == 2}
        return out
    finally:
        keras.distribution.set_distribution(None)


def main():
    meshes = {
        "model_1x8": lambda: dist.model_parallel(keras.distribution.DeviceMesh(
            (1, 8), ["batch", "model"], devices=keras.distribution.list_devices())),
        "data_8": lambda: dist.data_parallel(),
        "mixed_2x4": lambda: dist.model_parallel((2, 4)),
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case, config in CASES.items():
            directory = os.path.join(tmp, case)
            write_preset(config, directory)
            results[case] = {"single": run(directory, config, None)}
            for name, make in meshes.items():
                results[case][name] = run(directory, config, make())
        directory = os.path.join(tmp, "odd_vocab")
        write_preset(ODD_VOCAB, directory)
        results["odd_vocab"] = {"single": run(directory, ODD_VOCAB, None, fit=False),
                                "model_1x8": run(directory, ODD_VOCAB, meshes["model_1x8"](),
                                                 fit=False)}
    results["devices"] = len(keras.distribution.list_devices())
    sys.stdout.write("RESULT " + json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
