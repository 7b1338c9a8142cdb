"""Peak host memory of loading a checkpoint unsharded vs split 8 ways by gk.model_parallel.

    python bench/distributed_load.py            # ~330 MB float32 checkpoint, ~1 minute

Each load runs in its own process (peak RSS is per process), on 8 virtual CPU devices. On
CPU the "devices" are host memory, so a loaded model is resident in the host either way:
what sharding must not add is a second copy. The numbers to compare are the peak above the
process's baseline (imports, JAX runtime) against the model's size:

- unsharded: the model + one tensor in transit;
- model_parallel (1, 8): the same, if every variable goes from its checkpoint tensor straight
  into its 8 shards (gemma_keras passes Keras' `layout` to its checkpoint initializer);
- "jit initializer": how Keras shards a large variable whose initializer takes no `layout`
  (the previous gemma_keras): the initializer runs under jax.jit, and the tensor read from
  the file becomes a constant of the compiled program.
"""

import argparse
import os
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as common  # noqa: E402

# Before JAX starts, in this process and (inherited) in every child.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Divisible by 8 everywhere; 83M parameters, 333 MB in float32.
CONFIG = dict(vocabulary_size=32000, num_layers=4, num_query_heads=8, num_key_value_heads=8,
              hidden_dim=1024, intermediate_dim=5632, head_dim=128)
MODES = ("unsharded", "model_parallel (1, 8)", "jit initializer")


def rss_mb(field):
    return common.proc_status()[field] / 2 ** 20


def make(directory):
    import gemma_keras as gk

    gk.GemmaCausalLM(gk.GemmaBackbone(gk.GemmaConfig(**CONFIG))).save_to_preset(directory)


def worker(mode, directory) -> dict:
    import keras

    import gemma_keras as gk

    if mode == "jit initializer":
        # Keras' path for an initializer without a `layout` argument.
        from gemma_keras.checkpoints import weights

        call = weights._FromCheckpoint.__call__
        weights._FromCheckpoint.__call__ = lambda self, shape, dtype=None: call(self, shape, dtype)
    keras.ops.zeros((8, 8))  # start the runtime before the baseline
    baseline = rss_mb("VmRSS")
    if mode != "unsharded":
        keras.distribution.set_distribution(gk.model_parallel((1, 8)))
    lm = gk.GemmaCausalLM.from_preset(directory, load_tokenizer=False)
    weights = lm.backbone.weights
    largest = max(int(keras.ops.size(v)) * 4 for v in weights) / 2 ** 20
    model = sum(int(keras.ops.size(v)) * 4 for v in weights) / 2 ** 20
    # What device 0 holds (its shard of every weight).
    device0 = sum(v.value.addressable_shards[0].data.nbytes for v in weights) / 2 ** 20
    return {"mode": mode, "device0_mb": device0, "baseline_mb": baseline,
            "peak_mb": rss_mb("VmHWM"), "after_mb": rss_mb("VmRSS"), "model_mb": model,
            "largest_tensor_mb": largest}


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.make:
        make(args.dir)
        return 0
    if args.worker:
        common.reply(worker(args.worker, args.dir))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        directory = os.path.join(tmp, "preset")
        common.run([__file__, "--make", "--dir", directory])
        rows = [common.result_line(common.run([__file__, "--worker", mode, "--dir", directory]))
                for mode in MODES]
    print(f"checkpoint: {rows[0]['model_mb']:.0f} MB float32, largest tensor "
          f"{rows[0]['largest_tensor_mb']:.0f} MB, 8 virtual CPU devices")
    print(f"{'load':24s} {'baseline':>9s} {'peak':>8s} {'peak - baseline':>16s} "
          f"{'/ model':>8s} {'device 0 holds':>15s}")
    for r in rows:
        extra = r["peak_mb"] - r["baseline_mb"]
        print(f"{r['mode']:24s} {r['baseline_mb']:8.0f}M {r['peak_mb']:7.0f}M "
              f"{extra:15.0f}M {extra / r['model_mb']:8.2f} {r['device0_mb']:14.0f}M")
    return 0


if __name__ == "__main__":
    sys.exit(main())
