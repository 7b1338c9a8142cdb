"""Evaluating a Gemma: a multiple-choice task scored with log-likelihoods, before and after LoRA.

    python guides/evaluate.py                    # the bundled demo preset, offline, ~1 minute
    python guides/evaluate.py --steps 0          # evaluation only, no fine-tuning

The task is built here from the docstrings of Python's standard library (what the bundled
`gemma_demo` was trained on, see scripts/train_demo_preset.py): "which docstring describes this
function?". The query names a function, the four choices are first lines of standard-library
docstrings, one of them its own. (The other way round, "which function does this docstring
describe?", the demo is at chance, 25% before and 20% after the fine-tune below: it read every
name before its docstring, never after, and a causal model does not learn the reverse.) It is
scored as lm-evaluation-harness scores every multiple-choice task (HellaSwag, ARC, MMLU, ...):
one `(context, continuation)` request per choice, `lm.loglikelihood` gives each choice's
log-probability, and the prediction is
  acc       the choice with the highest log-likelihood;
  acc_norm  the highest log-likelihood divided by the choice's length in bytes (UTF-8), as
            lm-eval's `acc_norm` (so a long choice is not penalised for its length).
Then a short LoRA fine-tune on other questions of the same task (`enable_lora`, `fit`, a few
steps) and the same held-out accuracies again.

The four requests of a question share their context, so `loglikelihood` prefills it once and
scores the four continuations from the cached prefix (see gemma_keras/evaluation/scoring.py).
The commands at the end reproduce the model cards' tables with the real presets.
"""

import argparse
import importlib
import inspect
import os
import random
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import gemma_keras as gk  # noqa: E402

# Modules whose public functions give the questions (all in the demo's training data).
MODULES = ("json", "os.path", "re", "shutil", "textwrap", "random", "glob", "fnmatch", "heapq",
           "bisect", "base64", "statistics", "functools", "copy", "tempfile", "difflib", "csv",
           "urllib.parse", "calendar", "shlex", "gzip", "string", "colorsys", "keyword",
           "zipfile", "tarfile", "pprint", "warnings", "logging", "uuid")
CHOICES = 4


def docstring_items():
    """[(qualified name, first line of its docstring)] of the public functions of MODULES,
    one per distinct first line (several functions share "Return a ..." lines otherwise)."""
    items, seen = [], set()
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name, obj in inspect.getmembers(module, inspect.isfunction):
            if name.startswith("_") or obj.__module__ not in (module_name, module.__name__):
                continue
            doc = inspect.getdoc(obj)
            first = doc.strip().split("\n")[0].strip() if doc else ""
            if len(first) < 20 or first in seen:
                continue
            seen.add(first)
            items.append((f"{module_name}.{name}", first))
    return items


def make_task(items, seed=0):
    """Questions: (context, [4 continuations], index of the right one). The wrong choices are
    other functions' docstring lines, drawn at random. The context is not the demo's training
    layout (`json.dumps(obj, ...)` then the docstring): the fine-tune below teaches it."""
    rng = random.Random(seed)
    names = [name for name, _ in items]
    questions = []
    for name, first in items:
        others = rng.sample([i for i in range(len(items)) if items[i][0] != name], CHOICES - 1)
        choices = [items[i][1] for i in others] + [first]
        rng.shuffle(choices)
        questions.append((f"Function: {name}\nDocstring:", [f" {c}" for c in choices],
                          choices.index(first)))
    return questions


def accuracies(lm, questions):
    """(acc, acc_norm) over the questions: one loglikelihood request per choice, all questions
    in one call (lm-eval sends a task's requests the same way)."""
    requests = [(context, choice) for context, choices, _ in questions for choice in choices]
    scores = lm.loglikelihood(requests, batch_size=16)
    log_likelihoods = np.array([value for value, _ in scores]).reshape(-1, CHOICES)
    lengths = np.array([len(c.encode("utf-8")) for _, c in requests]).reshape(-1, CHOICES)
    gold = np.array([answer for _, _, answer in questions])
    acc = float(np.mean(log_likelihoods.argmax(axis=1) == gold))
    acc_norm = float(np.mean((log_likelihoods / lengths).argmax(axis=1) == gold))
    return acc, acc_norm


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gemma_demo")
    parser.add_argument("--steps", type=int, default=24, help="LoRA training steps (0: none).")
    parser.add_argument("--test-size", type=int, default=64, help="Held-out questions.")
    args = parser.parse_args(argv)
    print(f"Keras {keras.__version__}, {keras.backend.backend()} backend")
    keras.utils.set_random_seed(0)  # the adapters' initial weights: a reproducible run
    start = time.perf_counter()

    items = docstring_items()
    random.Random(1).shuffle(items)
    test, train = make_task(items[: args.test_size]), make_task(items[args.test_size:])
    print(f"task: {len(items)} standard-library functions; {len(test)} held-out questions, "
          f"{len(train)} for training; chance = {1 / CHOICES:.0%}")
    context, choices, answer = test[0]
    print(f"example:\n  {context!r}\n  choices {choices}, right: {choices[answer]!r}")

    # float32: the demo is stored in bfloat16, and training wants float32 weights.
    lm = gk.GemmaCausalLM.from_preset(args.preset, dtype="float32")
    # A single call gives (log-probability, whether greedy decoding gives the continuation).
    print("one request:", lm.loglikelihood([(context, choices[answer])]))
    t = time.perf_counter()
    before = accuracies(lm, test)
    # The first calls compile the scoring functions (shapes are bucketed, so a task compiles
    # a few); on this guide's 2-core CPU, ~15 s of the first pass, ~4 s warm.
    print(f"before fine-tuning: acc {before[0]:.1%}, acc_norm {before[1]:.1%} (held-out; "
          f"{CHOICES * len(test)} requests, {time.perf_counter() - t:.0f} s, compilation "
          f"included)")

    if args.steps:
        # Train on the other questions, written exactly as they are scored: context, then
        # the right choice (loss on the choice only), no chat format, no <eos> after it.
        lm.preprocessor.chat_format = False
        lm.preprocessor.add_eos = False
        lm.preprocessor.sequence_length = 48
        lm.backbone.enable_lora(rank=4)
        lm.compile(optimizer=keras.optimizers.AdamW(3e-3, weight_decay=0.01))
        rng = random.Random(2)
        pairs = [(context, choices[answer]) for context, choices, answer in train]
        data = [rng.choice(pairs) for _ in range(16 * args.steps)]  # steps x batch 16
        history = lm.fit({"prompts": [p for p, _ in data], "responses": [r for _, r in data]},
                         batch_size=16, epochs=1, verbose=0)
        print(f"LoRA rank 4, {args.steps} steps: loss {history.history['loss'][-1]:.3f}")
        after = accuracies(lm, test)
        seen = accuracies(lm, train[: args.test_size])
        print(f"after fine-tuning:  acc {after[0]:.1%}, acc_norm {after[1]:.1%} (held-out); "
              f"acc {seen[0]:.1%}, acc_norm {seen[1]:.1%} on questions it trained on")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


# The model cards' tables, with the real presets (need a Kaggle download and hours of CPU, or
# an accelerator; not run here). Both use lm-evaluation-harness' own tasks and metrics:
#
#   pip install "gemma-keras[eval]"
#   python -m gemma_keras.evaluation run --model gemma_keras \
#       --model_args preset=gemma2_2b_en,dtype=bfloat16 --tasks mmlu --num_fewshot 5
#   gemma-keras eval --tasks hellaswag --preset gemma2_2b_en --num-fewshot 10
#   gemma-keras eval --tasks arc_challenge --preset gemma2_2b_en --num-fewshot 25
#
# `python -m gemma_keras.evaluation` is lm-eval's own command line with the model
# "gemma_keras" registered; `gemma-keras eval` is the same run from this package's CLI.

if __name__ == "__main__":
    sys.exit(main())
