"""Model-parallel Gemma on 8 devices, on a laptop: the bundled demo preset split over 8 virtual
CPU devices, the same steps as a TPU v3-8 or 8-GPU run of 7B / 27B (see guides/scaling.md).

    python guides/scaling.py          # ~20 s on 2 CPU cores

Steps: a 2 x 4 mesh (2 data-parallel replicas of a 4-way tensor-parallel model), the layout
map from `gk.model_parallel`, loading straight into the shards, the weights' shardings,
greedy generation and one LoRA fit step under the distribution, and the generated text
compared with the single-device model's.
"""

import os

# Before JAX starts: pretend the CPU is 8 devices. On a TPU v3-8 or 8 GPUs drop this line.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ["KERAS_BACKEND"] = "jax"  # keras.distribution partitions on JAX only

import keras  # noqa: E402

import gemma_keras as gk  # noqa: E402

PROMPTS = ["json.dumps(", "Module collections\n\n", "class list(", "Module os.path\n\n"]


def main():
    # float32 so the single-device and the sharded runs can be compared token for token.
    reference = gk.GemmaCausalLM.from_preset("gemma_demo", dtype="float32")
    expected = reference.generate(PROMPTS, max_new_tokens=24, chat_template=False)
    del reference

    devices = keras.distribution.list_devices()
    print(f"{len(devices)} devices: {devices[0]} ...")
    mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], devices=devices)
    keras.distribution.set_distribution(gk.model_parallel(mesh))

    # Every variable is created from its checkpoint tensor directly in its shards.
    lm = gk.GemmaCausalLM.from_preset("gemma_demo", dtype="float32")
    for v in lm.backbone.weights[:6]:
        shard = v.value.sharding.shard_shape(v.shape)
        print(f"  {v.path:45s} {str(tuple(v.shape)):14s} per device {shard}")

    # A batch of 4 prompts: the KV cache is split over the 2 replicas by batch (the demo's 2
    # kv heads do not divide the model axis of 4, so over that axis it is replicated).
    texts = lm.generate(PROMPTS, max_new_tokens=24, chat_template=False)  # code: continued
    print("generated:", repr(texts[0]))
    print("same greedy text on 8 devices:", texts == expected)

    # LoRA under the distribution: adapters and optimizer state are split like their kernels;
    # Keras' trainer splits each batch of 4 over the 2 replicas.
    lm.backbone.enable_lora(rank=4)
    history = lm.fit({"prompts": ["What is Keras?", "What is Gemma?"] * 2,
                      "responses": ["A deep learning API.", "A family of open models."] * 2},
                     batch_size=4, epochs=1, verbose=0)
    print(f"one LoRA step, loss {history.history['loss'][0]:.3f}")


if __name__ == "__main__":
    main()
