"""Quickstart: load a Gemma, generate, stream, chat, look at the logits, save a preset.

    python guides/quickstart.py                       # the bundled demo preset, offline
    python guides/quickstart.py --preset gemma2_instruct_2b_en   # a real one (Kaggle account)

The default is `gemma_demo`, the small Gemma 2 bundled with gemma_keras (trained by
scripts/train_demo_preset.py on the docstrings of Python's standard library), so this runs
in seconds on any machine without network access. Every line works the same with any
preset name, kaggle:// or hf:// handle, or checkpoint directory.
"""

import argparse
import os
import sys
import tempfile

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import gemma_keras as gk  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gemma_demo")
    args = parser.parse_args(argv)
    print(f"gemma_keras {gk.__version__} on Keras {keras.__version__} "
          f"({keras.backend.backend()} backend)")

    lm = gk.GemmaCausalLM.from_preset(args.preset)
    print(f"loaded {args.preset}: {lm.config.describe()}")

    # Text in, text out: the prompt is prefilled once, then each token is one compiled,
    # KV-cached step. An instruct model (the demo is one) gets a string as a user turn in
    # Gemma's chat format and answers it; include_prompt=False returns the answer alone.
    question = "What does str.join do?"
    print(f"\n[generate, instruct]\n{question}\n"
          + lm.generate(question, max_new_tokens=48, include_prompt=False))

    # chat_template=False sends the text as written, to be continued (what keras-hub's
    # generate does): here, code. The result is prompt + completion. Greedy by default.
    prompt = "json.dumps("
    print("\n[generate, greedy]\n" + lm.generate(prompt, max_new_tokens=48, chat_template=False))
    # transformers' repetition_penalty: tokens already seen are made less likely.
    print("\n[generate, repetition_penalty=1.5]\n"
          + lm.generate(prompt, max_new_tokens=48, chat_template=False, repetition_penalty=1.5))
    # Sampling: temperature= / top_k= / top_p= pick a sampler; seeded, so reproducible.
    print("\n[generate, top-p, seed 1]\n"
          + lm.generate("Module collections\n\n", max_new_tokens=32, top_p=0.9, seed=1,
                        chat_template=False))

    # A batch of prompts of different lengths gives what each prompt gives alone.
    batch = lm.generate(["class list(", "Module os.path\n\n"], max_new_tokens=16,
                        chat_template=False)
    print("\n[batch]\n" + "\n---\n".join(batch))

    # Streaming: pieces of the completion as they are decoded (never half a character).
    print("\n[stream]\nModule re\n")
    for piece in lm.generate("Module re\n\n", max_new_tokens=32, stream=True,
                             chat_template=False):
        print(piece, end="", flush=True)
    print()

    # Chat in Gemma's turn format; the KV cache carries over between turns.
    chat = lm.chat()
    for question in ("What does os.path.join do?", "What is the json module?"):
        print(f"\n[chat] user: {question}\nmodel: {chat.send(question, max_new_tokens=64)}")

    # The model itself: logits [batch, seq, vocab] for token ids.
    ids = np.asarray([lm.tokenizer.tokenize("Return the number of items", add_bos=True)])
    logits = keras.ops.convert_to_numpy(
        lm({"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}))
    print(f"\n[logits] shape {logits.shape}; most likely next piece: "
          f"{lm.tokenizer.id_to_token(int(logits[0, -1].argmax()))!r}")

    # Save as a keras-hub preset (keras-hub's from_preset reads it) and load it back.
    with tempfile.TemporaryDirectory() as tmp:
        lm.save_to_preset(f"{tmp}/my_gemma")
        again = gk.GemmaCausalLM.from_preset(f"{tmp}/my_gemma")
        reloaded = keras.ops.convert_to_numpy(
            again({"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}))
    same = np.array_equal(logits, reloaded)
    print(f"\nsaved and reloaded model gives the same logits: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
