"""Export to a TensorFlow SavedModel and to LiteRT (TFLite) for on-device generation.

    python guides/export.py                        # the bundled demo preset, offline
    python guides/export.py --preset ./my_gemma --max-length 512

1. `gk.export(lm, dir)`: a SavedModel with a `generate` signature (strings in, strings out;
   the chat template and the SentencePiece tokenizer are inside the graph),
   `generate_no_chat_template` and a `logits` signature. Serving it needs TensorFlow and
   tensorflow-text's op library, not Keras or gemma_keras.
2. `gk.export(lm, "x.tflite", quantize="int8")` (the suffix means LiteRT): `prefill` and
   `decode` signatures with the KV cache as explicit inputs and outputs, tokenizer.model and
   a JSON description beside the file. `gemma_keras.exporting.runner.LiteRTGenerator` drives
   them with the LiteRT interpreter the way an on-device runtime would.

Both answer like `lm.generate`'s defaults: the demo is an instruct model, so a question goes
in as one user turn of Gemma's chat format; code to continue is sent as written with the
opt-out (`generate_no_chat_template`, `chat_template=False`).

Any backend works: on JAX or PyTorch the model is handed to a TensorFlow child process. A
LoRA fine-tuned model exports with its adapters merged.
"""

import argparse
import importlib.util
import os
import pathlib
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import gemma_keras as gk  # noqa: E402
from gemma_keras.exporting.runner import LiteRTGenerator  # noqa: E402

QUESTION = "What does str.join do?"  # answered: the chat template, as generate's default
CODE = "json.dumps("                 # continued as written: chat_template=False


def load_saved_model(path):
    """How a serving process without Keras loads the export: TensorFlow plus tensorflow-text's
    SentencePiece op library (tensorflow_text's Python package would import tf.keras)."""
    import tensorflow as tf

    package = importlib.util.find_spec("tensorflow_text").submodule_search_locations[0]
    tf.load_op_library(os.path.join(package, "python", "ops", "_sentencepiece_tokenizer.so"))
    return tf.saved_model.load(str(path))


def size_mib(*paths):
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    return sum(f.stat().st_size for f in files) / 2 ** 20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gemma_demo")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", help="directory for the exports (default: a temporary one)")
    args = parser.parse_args(argv)
    lm = gk.GemmaCausalLM.from_preset(args.preset, dtype="float32")
    new = args.max_new_tokens
    keras_answer = lm.generate(QUESTION, max_new_tokens=new)
    keras_code = lm.generate(CODE, max_new_tokens=new, chat_template=False)
    print(f"[keras, {os.environ['KERAS_BACKEND']}] {keras_answer!r} / {keras_code!r}")

    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(args.out or tmp)
        # --- SavedModel -------------------------------------------------------------------
        start = time.perf_counter()
        saved = gk.export(lm, out / "saved_model", max_length=args.max_length)
        print(f"[saved_model] exported in {time.perf_counter() - start:.1f} s, "
              f"{size_mib(saved):.1f} MiB")
        import tensorflow as tf

        model = load_saved_model(saved)
        answer, code = (model.signatures[name](prompts=tf.constant([prompt]),
                                               max_new_tokens=tf.constant(new))["text"]
                        .numpy()[0].decode()
                        for name, prompt in (("generate", QUESTION),
                                             ("generate_no_chat_template", CODE)))
        print(f"[saved_model] {answer!r} / {code!r}")
        print(f"saved_model equals keras: {(answer, code) == (keras_answer, keras_code)}")

        # --- LiteRT, float32 and int8 -----------------------------------------------------
        for quantize in (None, "int8"):
            name = f"gemma_{quantize or 'float32'}.tflite"
            start = time.perf_counter()
            path = gk.export(lm, out / name, quantize=quantize, max_length=args.max_length,
                             prefill_length=32)
            took = time.perf_counter() - start
            runner = LiteRTGenerator(path)
            start = time.perf_counter()
            answer = QUESTION + runner.generate(QUESTION, new)
            code = CODE + runner.generate(CODE, new, chat_template=False)
            speed = 2 * new / (time.perf_counter() - start)  # at most: replies may stop early
            print(f"[litert {quantize or 'float32'}] exported in {took:.1f} s, "
                  f"{size_mib(path):.1f} MiB, <= {speed:.0f} tokens/s: {answer!r} / {code!r}")
            if quantize is None:
                print(f"litert equals keras: {(answer, code) == (keras_answer, keras_code)}")


if __name__ == "__main__":
    main()
