"""Chat with an instruct preset: Gemma's turn format, multi-turn sessions, streaming.

    python guides/chat.py                                   # the bundled demo preset, offline
    python guides/chat.py --preset gemma2_instruct_2b_en    # a real instruct model (Kaggle)

`lm.chat()` keeps the conversation's KV cache between turns: each `send` feeds only the new
message, never the whole conversation again. Replies end at `<end_of_turn>`, which is how
Gemma's instruct models close their turn. The bundled demo answers questions about Python's
standard library ("What does X do?") from what it learned of its docstrings; a real instruct
preset answers anything.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import gemma_keras as gk  # noqa: E402
from gemma_keras.generation.chat import format_chat  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gemma_demo")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    lm = gk.GemmaCausalLM.from_preset(args.preset)

    # What the model sees: Gemma's turn markers around each message, <bos> first.
    print("prompt format:", repr(format_chat([("user", "What does len do?")])))

    chat = lm.chat()
    questions = ["What does os.path.join do?", "What is the json module?",
                 "What does str.join do?"]
    for question in questions:
        start = time.perf_counter()
        reply = chat.send(question, max_new_tokens=args.max_new_tokens)
        print(f"\nuser: {question}\nmodel: {reply.strip()}\n"
              f"  ({time.perf_counter() - start:.2f} s; the conversation now holds "
              f"{len(chat.token_ids)} tokens)")

    # Streaming: pieces as they are decoded. Sampling with a seed is reproducible.
    print("\nuser: What is the re module?\nmodel (streamed, top-p, seed 0): ", end="")
    for piece in lm.chat().send("What is the re module?", max_new_tokens=args.max_new_tokens,
                                sampler="top_p", seed=0, stream=True):
        print(piece, end="", flush=True)
    print()

    chat.reset()  # start over: the history and the cache are dropped
    print("after reset the conversation holds", len(chat.token_ids), "tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
