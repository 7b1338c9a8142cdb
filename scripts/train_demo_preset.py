"""Trains the bundled demo preset, `gemma_demo`: a 4M-parameter Gemma 2 that writes and answers
questions about Python's standard library, from its docstrings.

    python scripts/train_demo_preset.py                    # the committed preset (~25 min, 2 cores)
    python scripts/train_demo_preset.py --steps 30 --max-docs 2000 --output /tmp/demo  # smoke run

Data: the docstrings of the standard library that ships with the Python running this script,
read from its source files with `ast` (nothing is imported or executed). They are the Python
Software Foundation's, under the PSF license, which allows redistribution of derived work; the
trained weights are such work. Each public module, class, function and method with a
docstring becomes two examples:
  - a document: `json.dumps(obj, *, skipkeys=False, ...)` then the docstring;
  - a chat turn in Gemma's format: "What does json.dumps do?" answered by the docstring's
    first paragraph, ended by <end_of_turn>, so `generate` and `chat` both have something
    to show.
The same Python version gives the same corpus; the script records which it used.

Model: a Gemma 2 (the architecture of every Gemma 2 preset: GQA, sliding-window layers,
post-norms, soft-caps) of 4 layers, hidden 256, 4 query / 2 kv heads of 64, GeGLU 2 x 768, a
4,096-piece SentencePiece vocabulary trained here with Gemma's special pieces at Gemma's ids.
Full-parameter training with `GemmaCausalLM.fit` on packed 256-token windows (AdamW, warm-up
then cosine decay), seeded. Saved with `save_to_preset` in bfloat16 (8 MB), next to a loss
curve (loss_curve.svg) and a training record (TRAINING.md).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
import os
import pathlib
import platform
import random
import sys
import sysconfig
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402  (after the backend is chosen)

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "presets" / "gemma_demo"
# Parts of the standard library whose docstrings are tests, generated tables or GUI code.
SKIP_PACKAGES = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "pydoc_data",
                 "site-packages", "dist-packages", "encodings", "__phello__", "tkinter",
                 "msilib", "venv"}
QUESTIONS = ("What does {name} do?", "What is {name} for?", "Explain {name}.",
             "Tell me about {name}.")
MODULE_QUESTIONS = ("What is the {name} module?", "What is {name} for?",
                    "Tell me about the {name} module.")
ARCHITECTURE = dict(
    num_layers=4, num_query_heads=4, num_key_value_heads=2, hidden_dim=256,
    intermediate_dim=1536, head_dim=64, layer_norm_epsilon=1e-6, dropout=0.0,
    query_head_dim_normalize=True, use_post_ffw_norm=True, use_post_attention_norm=True,
    attention_logit_soft_cap=50.0, final_logit_soft_cap=30.0,
    use_sliding_window_attention=True, sliding_window_size=128)
VOCABULARY_SIZE = 4096
SEQUENCE_LENGTH = 256


# ---- the corpus ---------------------------------------------------------------------------
def docstrings(max_docs=None):
    """(kind, qualified name, signature or "", cleaned docstring) for the public modules,
    classes, functions and methods of the standard library, in a fixed order."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    out, seen = [], set()
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if any(p in SKIP_PACKAGES or p.startswith("_") and p != "__init__" for p in parts):
            continue
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for kind, name, signature, doc in _walk(tree, module):
            doc = inspect.cleandoc(doc).strip()
            if not _keep(doc, seen):
                continue
            out.append((kind, name, signature, doc))
            if max_docs and len(out) >= max_docs:
                return out
    return out + compiled_docstrings(seen) + language_reference(root)


# Modules written in C, whose docstrings live in the interpreter, not in .py files. Importing
# them runs no Python code.
COMPILED_MODULES = ("builtins", "math", "cmath", "itertools", "operator", "time", "sys", "gc",
                    "array", "binascii", "zlib", "select", "errno", "marshal", "atexit",
                    "unicodedata", "posix")


def compiled_docstrings(seen):
    import importlib

    out = []
    for module_name in COMPILED_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        prefix = "" if module_name == "builtins" else f"{module_name}."
        entries = [("module", module_name, module)]
        for name in sorted(vars(module)):
            value = vars(module)[name]
            if name.startswith("_") or not callable(value):
                continue
            entries.append(("class" if isinstance(value, type) else "function",
                            prefix + name, value))
            if isinstance(value, type):
                entries += [("function", f"{prefix}{name}.{attr}", member)
                            for attr, member in sorted(vars(value).items())
                            if not attr.startswith("_") and callable(member)]
        for kind, name, value in entries:
            doc = inspect.getdoc(value) or ""
            doc = doc.strip()
            if not _keep(doc, seen):
                continue
            try:
                signature = str(inspect.signature(value))[1:-1] if kind != "module" else ""
            except (TypeError, ValueError):  # no text signature (its docstring may have one)
                signature = "..."
            out.append((kind, name, signature, doc))
    return out


ASCII_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                              "\u2013": "-", "\u2014": "--", "\u2026": "..."})


def language_reference(root):
    """The Python reference's topics as pydoc shows them (`help("with")`): prose that ships
    with the interpreter in pydoc_data/topics.py, read as a literal, not imported."""
    path = root / "pydoc_data" / "topics.py"
    if not path.is_file():
        return []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    topics = next((ast.literal_eval(node.value) for node in tree.body
                   if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "")
                   == "topics"), {})
    out = []
    for name, text in sorted(topics.items()):
        text = text.strip().translate(ASCII_QUOTES)
        if text.isascii():
            # Long topics become several documents of about 3,000 characters.
            parts, chunk = [], ""
            for paragraph in text.split("\n\n"):
                if chunk and len(chunk) + len(paragraph) > 3000:
                    parts.append(chunk)
                    chunk = ""
                chunk += ("\n\n" if chunk else "") + paragraph
            out += [("topic", name, "", part) for part in parts + [chunk] if part.strip()]
    return out


def _keep(doc, seen):
    """Docstrings worth a document: 24-4,000 ASCII characters, each text once (many
    overrides repeat their parent's). Records the kept ones in `seen`."""
    if not (24 <= len(doc) <= 4000) or not doc.isascii() or doc in seen:
        return False
    seen.add(doc)
    return True


def _walk(tree, module):
    doc = ast.get_docstring(tree, clean=False)
    if doc:
        yield "module", module, "", doc
    for node in tree.body:
        yield from _definition(node, module)
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for child in node.body:
                yield from _definition(child, f"{module}.{node.name}")


def _definition(node, prefix):
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return
    if node.name.startswith("_"):
        return
    doc = ast.get_docstring(node, clean=False)
    if not doc:
        return
    if isinstance(node, ast.ClassDef):
        init = next((n for n in node.body if isinstance(n, ast.FunctionDef)
                     and n.name == "__init__"), None)
        signature = _arguments(init.args, drop_self=True) if init else ""
        yield "class", f"{prefix}.{node.name}", signature, doc
    else:
        yield "function", f"{prefix}.{node.name}", _arguments(node.args, drop_self=True), doc


def _arguments(args, drop_self):
    if drop_self and args.args and args.args[0].arg in ("self", "cls"):
        args.args = args.args[1:]
    return ast.unparse(args)


def examples(docs, seed=0):
    """Documents and chat turns, as the strings the tokenizer sees (without <bos>/<eos>)."""
    rng = random.Random(seed)
    out = []
    for kind, name, signature, doc in docs:
        head = {"module": f"Module {name}", "class": f"class {name}({signature})",
                "function": f"{name}({signature})", "topic": f"Topic {name}"}[kind]
        out.append(("text", f"{head}\n\n{doc}"))
        if kind == "topic":
            continue
        summary = " ".join(doc.split("\n\n")[0].split())
        if len(summary) >= 20:
            question = rng.choice(MODULE_QUESTIONS if kind == "module" else QUESTIONS)
            out.append(("chat", (question.format(name=name), summary)))
    rng.shuffle(out)
    return out


def chat_text(question, answer):
    """One exchange in Gemma's turn format, as `lm.chat()` writes it."""
    from gemma_keras.generation.chat import format_chat

    return format_chat([("user", question), ("model", answer)], add_generation_prompt=False)


def train_tokenizer(texts, directory, vocabulary_size):
    """A Gemma-style SentencePiece model: <pad>=0 <eos>=1 <bos>=2 <unk>=3, the turn markers
    as pieces, byte fallback, split digits, no normalisation (as Gemma's own)."""
    import sentencepiece as spm

    corpus = pathlib.Path(directory) / "corpus.txt"
    corpus.write_text("\n".join(texts), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(pathlib.Path(directory) / "tok"),
        vocab_size=vocabulary_size, model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], byte_fallback=True,
        split_digits=True, character_coverage=1.0, add_dummy_prefix=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        input_sentence_size=2_000_000, shuffle_input_sentence=False, num_threads=2,
        minloglevel=2)
    return pathlib.Path(directory) / "tok.model"


def pack(tokenizer, items, length):
    """Every example as <bos> ... (<eos> after documents; chat turns end with <end_of_turn>),
    concatenated and cut into [windows, length + 1] rows: no padding, every label real."""
    import numpy as np

    stream = []
    for kind, item in items:
        if kind == "text":
            stream += tokenizer.tokenize(item, add_bos=True) + [tokenizer.eos_token_id]
        else:
            stream += tokenizer.tokenize(chat_text(*item), add_bos=True)
    windows = len(stream) // (length + 1)
    return np.asarray(stream[: windows * (length + 1)], "int32").reshape(windows, length + 1)


# ---- training -----------------------------------------------------------------------------
def train(args):
    import numpy as np

    import gemma_keras as gk

    started = time.time()
    docs = docstrings(args.max_docs)
    items = examples(docs, seed=args.seed)
    print(f"corpus: {len(docs):,} docstrings from Python {platform.python_version()}'s "
          f"standard library -> {len(items):,} examples", flush=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="gemma_demo_"))
    texts = [item if kind == "text" else chat_text(*item) for kind, item in items]
    spm_path = train_tokenizer(texts, work, args.vocabulary_size)
    tokenizer = gk.GemmaTokenizer(spm_path)
    rows = pack(tokenizer, items, SEQUENCE_LENGTH)
    rng = np.random.default_rng(args.seed)
    rng.shuffle(rows)
    held_out = rows[: max(1, len(rows) // 50)]  # 2% of windows, never trained on
    rows = rows[len(held_out):]
    print(f"tokens: {rows.size:,} in {len(rows):,} windows of {SEQUENCE_LENGTH + 1} "
          f"(+{held_out.size:,} held out)", flush=True)

    config = gk.GemmaConfig.from_dict(dict(ARCHITECTURE, vocabulary_size=tokenizer.vocabulary_size),
                                      source="train_demo_preset.py")
    keras.utils.set_random_seed(args.seed)
    lm = gk.GemmaCausalLM(gk.GemmaBackbone(config), tokenizer, instruct=True)
    print(f"model: {config.describe()}", flush=True)

    steps_per_epoch = len(rows) // args.batch_size
    total = args.steps or steps_per_epoch * args.epochs
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, decay_steps=max(1, total - total // 20),
        warmup_target=args.learning_rate, warmup_steps=max(1, total // 20), alpha=0.05)
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=0.01, clipnorm=1.0)
    optimizer.exclude_from_weight_decay(var_names=["scale"])
    lm.compile(optimizer=optimizer)
    order = np.concatenate([rng.permutation(len(rows))
                            for _ in range(math.ceil(total * args.batch_size / len(rows)))])
    data = rows[order[: total * args.batch_size]]
    history = LossHistory(every=max(1, total // 200))
    lm.fit({"token_ids": data, "padding_mask": np.ones_like(data, bool)},
           batch_size=args.batch_size, epochs=1, shuffle=False, verbose=2 if args.verbose else 0,
           callbacks=[history])
    held = lm.evaluate({"token_ids": held_out, "padding_mask": np.ones_like(held_out, bool)},
                       batch_size=args.batch_size, verbose=0, return_dict=True)
    minutes = (time.time() - started) / 60
    print(f"trained {total} steps in {minutes:.1f} min: loss {history.losses[0][1]:.3f} -> "
          f"{history.losses[-1][1]:.3f}; held-out loss {held['loss']:.3f} "
          f"(perplexity {held['perplexity']:.1f})", flush=True)

    lm = cast_model(lm, args.dtype)
    output = pathlib.Path(args.output)
    # Retraining replaces the bundled preset: atomic (a temporary directory, then a rename).
    lm.save_to_preset(output, overwrite=True)
    samples = sample_outputs(lm)
    write_record(output, args, docs, rows, config, history, held, minutes, samples)
    print(f"wrote {output}", flush=True)
    return history, held


class LossHistory(keras.callbacks.Callback):
    """Keeps (step, loss) every `every` steps, for the loss curve."""

    def __init__(self, every):
        super().__init__()
        self.every, self.losses = every, []

    def on_train_batch_end(self, batch, logs=None):
        if batch % self.every == 0 or batch == self.params["steps"] - 1:
            self.losses.append((batch + 1, float(logs["loss"])))
            if len(self.losses) % 20 == 1:
                print(f"  step {batch + 1}/{self.params['steps']}: loss {logs['loss']:.3f}",
                      flush=True)


def cast_model(lm, dtype):
    """The trained model with its weights in `dtype` (the bundled preset: bfloat16)."""
    import gemma_keras as gk

    if dtype == "float32":
        return lm
    copy = gk.GemmaCausalLM(gk.GemmaBackbone(lm.config, dtype=dtype), lm.tokenizer,
                            instruct=True)
    copy.backbone.set_weights(lm.backbone.get_weights())
    return copy


SAMPLE_PROMPTS = ("json.dumps(", "class collections.OrderedDict(", "Module os.path\n\n")
SAMPLE_QUESTIONS = ("What does os.path.join do?", "What is the json module?")


def sample_outputs(lm):
    out = [(p, lm.generate(p, max_new_tokens=40)[len(p):]) for p in SAMPLE_PROMPTS]
    for question in SAMPLE_QUESTIONS:
        out.append((question, lm.chat().send(question, max_new_tokens=40)))
    return out


def write_record(output, args, docs, rows, config, history, held, minutes, samples):
    (output / "loss_curve.svg").write_text(loss_svg(history.losses), encoding="utf-8")
    command = " ".join(["python", "scripts/train_demo_preset.py", *sys.argv[1:]])
    lines = [
        "# gemma_demo: how it was trained", "",
        f"Command: `{command}` (KERAS_BACKEND={os.environ['KERAS_BACKEND']}), "
        f"{time.strftime('%Y-%m-%d')}, {minutes:.1f} min on {os.cpu_count()} CPU cores.", "",
        f"Data: {len(docs):,} docstrings of Python {platform.python_version()}'s standard "
        f"library (PSF license), as documents and as chat turns; {rows.size:,} training "
        f"tokens in {len(rows):,} packed windows.", "",
        f"Model: Gemma 2 architecture, {config.describe()}; saved in "
        f"{args.dtype}.", "",
        f"Training: {len(history.losses) and history.losses[-1][0]} steps of "
        f"{args.batch_size} x {SEQUENCE_LENGTH} tokens, AdamW peak learning rate "
        f"{args.learning_rate:g}, seed {args.seed}. Loss {history.losses[0][1]:.3f} -> "
        f"{history.losses[-1][1]:.3f}; held-out loss {held['loss']:.3f}, perplexity "
        f"{held['perplexity']:.1f}, next-token accuracy {held['accuracy']:.1%}.", "",
        "![loss curve](loss_curve.svg)", "", "Greedy samples from the saved preset:", "",
    ]
    for prompt, text in samples:
        lines += ["```", f"{prompt!r} ->", text.strip(), "```", ""]
    (output / "TRAINING.md").write_text("\n".join(lines), encoding="utf-8")
    (output / "training.json").write_text(json.dumps({
        "python": platform.python_version(), "docstrings": len(docs), "tokens": int(rows.size),
        "steps": history.losses[-1][0], "losses": history.losses, "held_out": held,
        "args": vars(args)}, indent=1), encoding="utf-8")


def loss_svg(points, width=640, height=360, margin=48):
    """The loss curve as a small SVG picture (no plotting library needed)."""
    steps = [s for s, _ in points]
    losses = [v for _, v in points]
    top, bottom = math.ceil(max(losses)), math.floor(min(losses))
    bottom = min(bottom, top - 1)

    def x(step):
        return margin + (width - 2 * margin) * (step - steps[0]) / max(1, steps[-1] - steps[0])

    def y(loss):
        return height - margin - (height - 2 * margin) * (loss - bottom) / (top - bottom)

    path = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
    ticks = "".join(
        f'<text x="{margin - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{v}</text>'
        f'<line x1="{margin}" x2="{width - margin}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
        f'stroke="#ddd"/>' for v in range(bottom, top + 1))
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">'
        f'<rect width="100%" height="100%" fill="white"/>{ticks}'
        f'<polyline fill="none" stroke="#1a73e8" stroke-width="2" points="{path}"/>'
        f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">training step '
        f'(last: {steps[-1]})</text>'
        f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" '
        f'text-anchor="middle">loss (cross-entropy, nats)</text>'
        f'<text x="{width / 2}" y="24" text-anchor="middle">gemma_demo training loss</text>'
        f'</svg>\n')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="overrides --epochs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--max-docs", type=int, default=None, help="a smaller corpus")
    parser.add_argument("--vocabulary-size", type=int, default=VOCABULARY_SIZE)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    history, _ = train(args)
    return 0 if history.losses[-1][1] < history.losses[0][1] else 1


if __name__ == "__main__":
    sys.exit(main())
