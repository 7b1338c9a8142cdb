"""How much accuracy the low-precision weight formats cost, measured on the bundled `gemma_demo`
preset (offline): float32, bfloat16, int8 and int4 (blocks of 128 and of 32 inputs).

    python bench/quantized_accuracy.py                    # JAX, writes bench/results/quantized_accuracy.md
    python bench/quantized_accuracy.py --backend torch    # ... quantized_accuracy_torch.md
    python bench/quantized_accuracy.py --output -         # print only

What it measures, for each format against float32 (`from_preset("gemma_demo", dtype="float32")`;
the preset stores bfloat16 weights, so "float32" is those values computed in float32):

1. Held-out loss and perplexity with `lm.evaluate({"token_ids", "padding_mask"})`, as
   scripts/train_demo_preset.py measured them when it trained the preset: on the same held-out
   windows, rebuilt by that script's own functions (imported from it, not copied): the
   docstrings of this Python's standard library -> examples(seed) -> pack() with the preset's
   tokenizer -> shuffled with np.random.default_rng(seed) -> the first 2% of the windows. The
   corpus depends on the Python version: the preset's training.json records the one it was
   trained on, and the report says whether it matches (it then reproduces the recorded token
   count and held-out loss).
2. Logits error against float32 on the first --windows held-out windows (next-token logits of
   `lm.predict`, [windows, 256, vocab]): max |logits - float32 logits| over all of them divided by the range
   (max - min) of the float32 logits over all of them ("max / range"), and the same per row,
   a row being one position's vocabulary vector (|diff| max / that row's float32 range), as a
   mean and a max over rows; and top-1 agreement: the share of positions whose argmax equals
   float32's.
3. Greedy generation against float32: 16 chat questions about standard-library functions
   (the preset is an instruct model trained on their docstrings), 32 new tokens each, greedy,
   stopping at <end_of_turn>/<eos> as `generate` does by default; the share of rows whose
   generated ids equal float32's exactly, and the mean length of the common prefix (tokens).

int8 is `lm.quantize("int8")` (per output channel, weight-only); int4 `lm.quantize("int4")`
(block 128) and `lm.quantize("int4", block_size=32)`, each quantizing a float32 model. One
process for all formats (the model is 4.2M parameters: about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PRESET = "gemma_demo"
FORMATS = ("float32", "bfloat16", "int8", "int4", "int4/32")
QUESTIONS = tuple(f"What does {name} do?" for name in (
    "os.path.join", "json.dumps", "json.loads", "re.compile", "re.sub", "collections.Counter",
    "itertools.chain", "functools.partial", "math.sqrt", "shutil.copy", "subprocess.run",
    "random.choice", "os.listdir", "time.sleep", "textwrap.dedent", "str.split"))
NEW_TOKENS = 32


def training_script():
    """scripts/train_demo_preset.py as a module (its functions build the corpus)."""
    spec = importlib.util.spec_from_file_location(
        "train_demo_preset", ROOT / "scripts" / "train_demo_preset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preset_record():
    """The preset's training.json (Python version, seed, max_docs, held-out loss), or {}."""
    from gemma_keras.checkpoints.resolve import demo_preset_directory

    path = demo_preset_directory() / "training.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def held_out_windows(tokenizer, record):
    """The held-out [windows, 257] rows scripts/train_demo_preset.py set aside, rebuilt with
    the seed and max_docs the preset records; also the count of training tokens (to check the
    corpus is the one the preset was trained on)."""
    import numpy as np

    script = training_script()
    args = record.get("args", {})
    seed, max_docs = args.get("seed", 0), args.get("max_docs")
    docs = script.docstrings(max_docs)
    rows = script.pack(tokenizer, script.examples(docs, seed=seed), script.SEQUENCE_LENGTH)
    rng = np.random.default_rng(seed)
    rng.shuffle(rows)
    held_out = rows[: max(1, len(rows) // 50)]
    return held_out, int(rows.size - held_out.size), len(docs)


def load(fmt):
    """gemma_demo in one of FORMATS (the quantized ones quantize a float32 model)."""
    import gemma_keras as gk

    lm = gk.GemmaCausalLM.from_preset(PRESET, dtype="bfloat16" if fmt == "bfloat16" else "float32")
    if fmt == "int8":
        lm.quantize("int8")
    elif fmt.startswith("int4"):
        lm.quantize("int4", block_size=int(fmt.partition("/")[2] or 128))
    return lm


def int4_fallbacks(lm):
    """Paths of the int4 projections that kept Keras' own int4 layout (widths that the
    block size does not divide)."""
    from gemma_keras.layers.linear import Linear

    return [layer.path for layer in lm.backbone._flatten_layers()
            if isinstance(layer, Linear) and layer.quantization_mode == "int4"
            and not layer._own_int4]


def forward(lm, rows, keep, chunk=8):
    """Runs the held-out rows [windows, len + 1] through `lm.predict` (one compiled forward
    pass per batch of `chunk`): (the float32 next-token logits of the first `keep` windows,
    [keep, len, vocab]; mean cross-entropy and top-1 accuracy over all windows, computed
    here from the logits in float32)."""
    import numpy as np

    ids, labels = rows[:, :-1], rows[:, 1:]
    values = lm.predict({"token_ids": ids, "padding_mask": np.ones_like(ids, "int32")},
                        batch_size=chunk, verbose=0)
    nll, correct = 0.0, 0
    for start in range(0, len(rows), chunk):
        value = np.asarray(values[start: start + chunk], np.float32)
        part = labels[start: start + chunk]
        nll += cross_entropy(value, part) * part.size
        correct += int((value.argmax(-1) == part).sum())
    return np.asarray(values[:keep], np.float32), nll / labels.size, correct / labels.size


def logits_error(got, want):
    """(max |got - want| / range of want, per-row mean and max of the same), rows = the last
    axis's vectors; and the share of rows with the same argmax."""
    import numpy as np

    diff = np.abs(got - want)
    whole = float(diff.max() / np.ptp(want))
    rows = diff.max(-1) / np.ptp(want, axis=-1)
    top1 = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    return whole, float(rows.mean()), float(rows.max()), top1


def cross_entropy(values, labels):
    """Mean next-token cross-entropy (nats) of float32 logits against labels."""
    import numpy as np

    values = values.astype(np.float64)
    top = values.max(-1, keepdims=True)
    log_z = np.log(np.exp(values - top).sum(-1)) + top[..., 0]
    picked = np.take_along_axis(values, labels[..., None], -1)[..., 0]
    return float(np.mean(log_z - picked))


def prompts(tokenizer):
    """The QUESTIONS as one user turn each in Gemma's chat format, tokenized with <bos>,
    right-padded: {"token_ids", "padding_mask"}."""
    import numpy as np

    from gemma_keras.tokenizer import format_chat

    tokens = [tokenizer.tokenize(format_chat([("user", q)]), add_bos=True) for q in QUESTIONS]
    width = max(map(len, tokens))
    ids = np.zeros((len(tokens), width), "int32")
    mask = np.zeros((len(tokens), width), "int32")
    for row, t in enumerate(tokens):
        ids[row, : len(t)], mask[row, : len(t)] = t, 1
    return {"token_ids": ids, "padding_mask": mask}


def greedy(lm, batch):
    """Each row's generated ids (up to and including a stop id), greedy, NEW_TOKENS at most."""
    import keras
    import numpy as np

    out = lm.generate(batch, max_new_tokens=NEW_TOKENS, sampler="greedy", include_prompt=False)
    ids = np.asarray(keras.ops.convert_to_numpy(out["token_ids"]))
    mask = np.asarray(keras.ops.convert_to_numpy(out["padding_mask"])).astype(bool)
    return [list(row[m]) for row, m in zip(ids, mask)]


def agreement(got, want):
    """(share of rows identical, mean common-prefix length in tokens)."""
    same, prefix = 0, 0
    for a, b in zip(got, want):
        same += a == b
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefix += n
    return same / len(want), prefix / len(want)


def measure(args):
    import keras
    import numpy as np

    import gemma_keras as gk

    started = time.time()
    record = preset_record()
    reference = load("float32")
    held_out, train_tokens, n_docs = held_out_windows(reference.tokenizer, record)
    log(f"held out: {held_out.shape[0]} windows of {held_out.shape[1]} tokens "
        f"({train_tokens:,} training tokens; preset records {record.get('tokens')}) "
        f"[{time.time() - started:.0f} s]")
    windows = min(args.windows, len(held_out))
    batch = prompts(reference.tokenizer)

    results, want_logits, want_ids = {}, None, None
    for fmt in args.formats:
        lm = reference if fmt == "float32" else load(fmt)
        t = time.time()
        held = lm.evaluate({"token_ids": held_out, "padding_mask": np.ones_like(held_out, bool)},
                           batch_size=16, verbose=0, return_dict=True)
        t_eval = time.time() - t
        got_logits, own_loss, own_accuracy = forward(lm, held_out, windows)
        t_logits = time.time() - t - t_eval
        got_ids = greedy(lm, batch)
        t_greedy = time.time() - t - t_eval - t_logits
        if fmt == "float32":
            want_logits, want_ids = got_logits, got_ids
        row = dict(loss=float(held["loss"]), perplexity=float(held["perplexity"]),
                   keras_accuracy=float(held["accuracy"]), own_loss=own_loss,
                   accuracy=own_accuracy)
        row["max_over_range"], row["row_mean"], row["row_max"], row["top1"] = logits_error(
            got_logits, want_logits)
        row["greedy_identical"], row["greedy_prefix"] = agreement(got_ids, want_ids)
        row["greedy_length"] = float(np.mean([len(r) for r in got_ids]))
        row["int4_fallbacks"] = int4_fallbacks(lm) if fmt.startswith("int4") else []
        row["weight_bytes"] = int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize
                                      for v in lm.backbone.weights))
        row["seconds"] = time.time() - t
        row["seconds_split"] = [t_eval, t_logits, t_greedy]
        results[fmt] = row
        log(f"{fmt}: loss {row['loss']:.4f}, max/range {row['max_over_range']:.4%}, "
            f"top-1 {row['top1']:.2%}, greedy identical {row['greedy_identical']:.0%} "
            f"[{row['seconds']:.0f} s: evaluate {t_eval:.0f}, logits {t_logits:.0f}, "
            f"generate {t_greedy:.0f}]")
        del got_logits
    return dict(backend=keras.backend.backend(), python=platform.python_version(),
                keras=keras.__version__, gemma_keras=getattr(gk, "__version__", "?"),
                record=record, docs=n_docs, train_tokens=train_tokens,
                held_out=list(held_out.shape), windows=windows, results=results,
                seconds=time.time() - started)


def report(m):
    record, results = m["record"], m["results"]
    recorded = record.get("held_out", {})
    same_corpus = (record.get("python") == m["python"] and record.get("tokens")
                   == m["train_tokens"])
    lines = [
        "# Accuracy of the weight formats on gemma_demo", "",
        f"`python bench/quantized_accuracy.py --backend {m['backend']}`, "
        f"{time.strftime('%Y-%m-%d')}: Keras {m['keras']}, KERAS_BACKEND={m['backend']}, "
        f"Python {m['python']}, {os.cpu_count()} CPU cores, {m['seconds']:.0f} s.", "",
        f"Held out: {m['held_out'][0]} windows of {m['held_out'][1]} tokens, rebuilt with "
        f"scripts/train_demo_preset.py's functions from {m['docs']:,} docstrings of Python "
        f"{m['python']} (seed {record.get('args', {}).get('seed', 0)}; {m['train_tokens']:,} "
        f"training tokens). "
        + (f"The preset was trained on Python {record.get('python')} with {record.get('tokens'):,} "
           f"training tokens and records a held-out loss of {recorded.get('loss', float('nan')):.4f} "
           f"(measured in float32 before it was saved in bfloat16): "
           + ("the same corpus." if same_corpus else "**not the same corpus**.")
           if record else "The preset records no training metadata."), "",
        "Loss and perplexity: `lm.evaluate` on all held-out windows (next-token cross-entropy "
        "in nats, as the training script measured it); \"loss from logits\" and accuracy are "
        "computed here from the same windows' logits cast to float32 (Keras' accuracy metric "
        "is not used: on bfloat16 logits it compares the labels after rounding them to "
        "bfloat16, which above id 256 merges neighbouring ids and overstates accuracy; its "
        "figure is in the last column). Logits columns: on the first "
        f"{m['windows']} held-out windows ({m['windows'] * (m['held_out'][1] - 1):,} positions), "
        "against float32: max |logits - float32| / (max - min of the float32 logits); the same "
        "per position (one vocabulary row), mean and max over positions; top-1: positions "
        "whose argmax is float32's. Greedy: 16 chat questions (\"What does json.dumps do?\"), "
        f"up to {NEW_TOKENS} new tokens, stopping at <end_of_turn>: rows identical to float32, "
        "mean common prefix in tokens (float32's mean length "
        f"{results.get('float32', {}).get('greedy_length', float('nan')):.1f}).", "",
        "| weights | weight bytes | loss | perplexity | loss from logits | accuracy | "
        "logits max / range | per-row mean | per-row max | top-1 agreement | greedy identical "
        "| greedy common prefix | Keras' accuracy metric |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    names = {"float32": "float32", "bfloat16": 'bfloat16 (`dtype="bfloat16"`)',
             "int8": 'int8 (`quantize("int8")`)', "int4": 'int4, block 128 (`quantize("int4")`)',
             "int4/32": 'int4, block 32 (`quantize("int4", block_size=32)`)'}
    for fmt, r in results.items():
        lines.append(
            f"| {names.get(fmt, fmt)} | {r['weight_bytes'] / 1e6:.2f} MB | {r['loss']:.4f} | "
            f"{r['perplexity']:.3f} | {r['own_loss']:.4f} | {r['accuracy']:.2%} | "
            f"{r['max_over_range']:.3%} | {r['row_mean']:.3%} | {r['row_max']:.3%} | "
            f"{r['top1']:.2%} | {r['greedy_identical']:.0%} | {r['greedy_prefix']:.1f} | "
            f"{r['keras_accuracy']:.2%} |")
    fallbacks = sorted({p for r in results.values() for p in r["int4_fallbacks"]})
    lines += ["", "int4 projections left on Keras' own int4 layout (an input width the block "
              "size does not divide): " + (", ".join(f"`{p}`" for p in fallbacks) if fallbacks
              else "none: every projection takes gemma_keras' grouped layout (the tied "
              "embedding is Keras' grouped int4 table, which is that layout)."), ""]
    seconds = {fmt: ", ".join(f"{k} {v:.0f} s" for k, v in zip(
        ("evaluate", "logits", "generate"), r["seconds_split"])) for fmt, r in results.items()}
    lines += ["Time per format (compilation included): "
              + "; ".join(f"{fmt}: {v}" for fmt, v in seconds.items()) + ".", ""]
    return "\n".join(lines)


def write_atomic(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def log(message):
    print(message, file=sys.stderr, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="jax", choices=("jax", "tensorflow", "torch"))
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS,
                        help="float32 is always measured first (the reference)")
    parser.add_argument("--windows", type=int, default=32,
                        help="held-out windows for the logits error (all of them for the loss)")
    parser.add_argument("--output", default=None,
                        help="markdown file ('-': print only); default bench/results/"
                             "quantized_accuracy.md (jax) or quantized_accuracy_<backend>.md")
    parser.add_argument("--json", default=None, help="also write the measurements as JSON")
    args = parser.parse_args(argv)
    args.formats = ["float32"] + [f for f in args.formats if f != "float32"]
    os.environ["KERAS_BACKEND"] = args.backend  # before Keras is imported
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))

    measurements = measure(args)
    text = report(measurements)
    print(text)
    output = args.output or str(RESULTS / ("quantized_accuracy.md" if args.backend == "jax"
                                           else f"quantized_accuracy_{args.backend}.md"))
    if output != "-":
        write_atomic(pathlib.Path(output), text)
        log(f"wrote {output}")
    if args.json:
        write_atomic(pathlib.Path(args.json), json.dumps(measurements, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
