"""Outputs of every decoding and scoring path on the bundled demo preset, to compare two
versions of the code (A/B) after a restructuring that must not change behaviour.

    # before: the code of another checkout (a git worktree), its outputs to a file
    PYTHONPATH=/tmp/before python scripts/ab_outputs.py --output /tmp/a.json
    python scripts/ab_outputs.py --output /tmp/b.json        # this checkout
    python scripts/ab_outputs.py --compare /tmp/a.json /tmp/b.json

What it records (JAX by default; KERAS_BACKEND picks another): greedy generation of a ragged
batch (text and ids), seeded sampling with every rule (temperature, top-k, top-p, min-p,
repetition penalty, min_new_tokens, stop strings), streaming pieces, beams with their scores,
speculative decoding (prompt lookup and the int8 self-draft, greedy and sampled), two
chat turns, score logits and loss, loglikelihood and rolling
loglikelihood; with --export, a SavedModel's generate (TensorFlow). Token ids and texts must be
equal; floats equal to 1e-5 relative (a compilation may fuse differently).

It also times decoding and scoring (--time), so an interleaved pair of runs on a quiet
machine compares their speed: `--compare` prints both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

PROMPTS = ["What does str.join do?", "def read_lines(path):\n    ", "Module os\n\n"]


def _ids(x):
    import numpy as np

    return np.asarray(x).tolist()


def record(export=False, timing=False):
    import keras
    import numpy as np

    import gemma_keras as gk

    lm = gk.GemmaCausalLM.from_preset("gemma_demo", dtype="float32")
    out = {"backend": keras.backend.backend()}
    out["greedy"] = lm.generate(PROMPTS, max_new_tokens=24)
    out["greedy_raw"] = lm.generate(PROMPTS, max_new_tokens=24, chat_template=False)
    ids = lm.generate({"token_ids": np.array([[2, 651, 9, 77, 5], [0, 0, 2, 651, 9]]),
                       "padding_mask": np.array([[1] * 5, [0, 0, 1, 1, 1]], bool)},
                      max_new_tokens=12)
    out["greedy_ids"] = {k: _ids(v) for k, v in ids.items()}
    out["sampled"] = lm.generate(PROMPTS, max_new_tokens=24, temperature=0.8, top_k=40,
                                 top_p=0.9, min_p=0.05, repetition_penalty=1.2,
                                 min_new_tokens=4, seed=7)
    out["sampled_random"] = lm.generate(PROMPTS, max_new_tokens=24, sampler="random", seed=3)
    out["stop_strings"] = lm.generate(PROMPTS, max_new_tokens=32, stop_strings=["\n", "."],
                                      chat_template=False)
    out["stream"] = list(lm.generate(PROMPTS[1], max_new_tokens=24, stream=True,
                                     chat_template=False))
    out["stream_sampled"] = list(lm.generate(PROMPTS[0], max_new_tokens=24, stream=True,
                                             temperature=0.7, seed=5))
    beams = lm.generate(PROMPTS, max_new_tokens=12, num_beams=3, return_beams=True,
                        chat_template=False)
    out["beams"] = [[(text, score) for text, score in row] for row in beams]
    out["beam_best"] = lm.generate(PROMPTS, max_new_tokens=12, num_beams=3,
                                   length_penalty=0.5, early_stopping=True)
    for draft in ("prompt_lookup", "int8"):
        out[f"draft_{draft}"] = lm.generate(PROMPTS, max_new_tokens=24, draft=draft,
                                            chat_template=False)
        out[f"draft_{draft}_sampled"] = lm.generate(PROMPTS, max_new_tokens=24, draft=draft,
                                                    temperature=0.8, seed=11)
        out[f"draft_{draft}_stats"] = str(lm.last_speculation)
    chat = lm.chat(system="Answer briefly.")
    out["chat"] = [chat.send("What does os.path.join do?", max_new_tokens=16),
                   chat.send("And os.path.split?", max_new_tokens=16, temperature=0.6,
                             seed=2)]
    out["chat_ids"] = chat.token_ids
    tokens = np.array([lm.tokenizer.tokenize("json.dumps(obj, indent=2)", add_bos=True)])
    logits = lm.score(tokens)
    out["score_logits"] = np.asarray(keras.ops.convert_to_numpy(logits), "float64")[0, :, :64
                                                                                     ].tolist()
    loss = lm.score(tokens[:, :-1], scoring_mode="loss", target_ids=tokens[:, 1:])
    out["score_loss"] = np.asarray(keras.ops.convert_to_numpy(loss), "float64").tolist()
    out["loglikelihood"] = [list(r) for r in lm.loglikelihood(
        [("Module json\n\n", "JSON encoder"), ("Module json\n\n", "Regular expressions"),
         ("def f(", "x):")])]
    out["rolling"] = lm.loglikelihood_rolling(["Module re\n\nRegular expression operations.",
                                               "x" * 300], max_length=64)
    if export:
        import subprocess

        with tempfile.TemporaryDirectory() as tmp:
            gk.export(lm, f"{tmp}/sm", max_length=64)
            code = ("import json, sys, tensorflow as tf, tensorflow_text\n"
                    f"m = tf.saved_model.load({tmp + '/sm'!r})\n"
                    "r = m.signatures['generate'](prompts=tf.constant(sys.argv[1:]), "
                    "max_new_tokens=tf.constant(12))\n"
                    "print(json.dumps([t.decode() for t in r['completion'].numpy()]))\n")
            result = subprocess.run([sys.executable, "-c", code, *PROMPTS], text=True,
                                    capture_output=True, check=True)
            out["saved_model"] = json.loads(result.stdout.strip().splitlines()[-1])
    if timing:
        out["timing"] = _time(lm, np)
    return out


def _time(lm, np):
    """Best of 5: greedy decode of 64 tokens (batch 1 and 3), and 16 loglikelihood requests."""
    def best(fn):
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)
    requests = [("Module json\n\n", f"choice {i}") for i in range(16)]
    return {
        "decode_b1_64_s": best(lambda: lm.generate(PROMPTS[1], max_new_tokens=64,
                                                   stop_token_ids=None, chat_template=False)),
        "decode_b3_64_s": best(lambda: lm.generate(PROMPTS, max_new_tokens=64,
                                                   stop_token_ids=None, chat_template=False)),
        "loglikelihood_16_s": best(lambda: lm.loglikelihood(requests)),
    }


def _close(a, b, path, problems):
    if isinstance(a, float) and isinstance(b, float):
        if not math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5):
            problems.append(f"{path}: {a!r} != {b!r}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            problems.append(f"{path}: length {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]", problems)
    elif isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                problems.append(f"{path}.{key}: only in {'B' if key not in a else 'A'}")
            else:
                _close(a[key], b[key], f"{path}.{key}", problems)
    elif a != b:
        problems.append(f"{path}: {a!r:.80} != {b!r:.80}")


def compare(path_a, path_b) -> int:
    a, b = (json.load(open(p)) for p in (path_a, path_b))
    timing = a.pop("timing", None), b.pop("timing", None)
    problems = []
    _close(a, b, "outputs", problems)
    print(f"{len(a)} outputs compared ({a.get('backend')}): "
          f"{'identical' if not problems else f'{len(problems)} differences'}")
    for line in problems[:40]:
        print("  " + line)
    if all(timing):
        for key in timing[0]:
            print(f"  {key}: A {timing[0][key]:.3f} s, B {timing[1][key]:.3f} s "
                  f"(B/A {timing[1][key] / timing[0][key]:.2f})")
    return 1 if problems else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", help="Write the outputs here (JSON).")
    parser.add_argument("--export", action="store_true", help="Also a SavedModel's generate.")
    parser.add_argument("--time", action="store_true", help="Also time decode and scoring.")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"))
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    out = record(args.export, args.time)
    text = json.dumps(out, indent=1)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
