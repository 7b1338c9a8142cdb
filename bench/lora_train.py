"""LoRA training step: throughput and memory, gemma_keras vs keras-hub, on each Keras backend.

    python bench/lora_train.py                # default config + 2B shape, all backends (~35 min)
    python bench/lora_train.py --skip-2b      # the ~152M default config only (~15 min)
    python bench/lora_train.py --backend jax  # one backend
    python bench/lora_train.py --size 2b      # only the Gemma 1 2B shape (~20 min, ~20 GB RAM)
    python bench/lora_train.py --size small   # a tiny config: a smoke run (~3 min)
    python bench/lora_train.py --only 'default:gk-*,*:kh-jax'   # case ids / globs (--help)

What it does:
  1. Builds every model directly from its configuration with random weights (no checkpoint):
     "default" is the project's Gemma-shaped ~152M-parameter benchmark model in float32
     (vocab 32000, hidden 1024, 8 layers, 8 query heads / 1 kv head, head_dim 128, GeGLU
     intermediate_dim 8192 counting both branches), batch 2 x 256 tokens; "2b" is Gemma 1 2B's
     shape in bfloat16, batch 1 x 256 tokens.
  2. Per case, in a fresh subprocess (so peaks and compile caches never mix): build the
     causal LM (optionally `quantize("int8")` first: QLoRA; or with a filter that keeps the
     tied embedding / output head in float), `backbone.enable_lora(rank=4)`
     on query and value, compile both libraries identically (Adam, learning rate 1e-4,
     sparse cross-entropy from logits averaged over the weighted labels, no metrics) and
     `fit` one epoch of identical arrays: random token ids (one fixed batch repeated, so the
     loss must fall step after step if gradients reach the adapters), next-token labels,
     and sample weights that drop the last column. Variants: gemma_keras with
     `gradient_checkpointing = True` (rematerialised decoder blocks).
  3. A Keras callback timestamps each step. It reads the step's loss as a Python float
     at the end of every batch, which waits for the step to finish (JAX and TensorFlow
     dispatch asynchronously), so timings are completed work. First step = its own
     begin-to-end time (tracing and XLA compilation included); the measured steps after the
     warm-up are end-to-end intervals (data feeding and Keras' loop included):
       tokens/s = batch x sequence / median step time.
  4. Memory, from the kernel's resident-set high-water mark (VmHWM in /proc/self/status,
     reset by writing "5" to /proc/self/clear_refs): the RSS just before `fit` (model,
     data, libraries; read after glibc's malloc_trim, so freed heap blocks do not count)
     is the reference; the mark is reset there, read and reset again when
     the warm-up is over, and read after the last step:
       step memory, first  = peak during the warm-up step(s) - RSS before fit (compilation,
                             optimizer state, activations and gradients at their worst);
       step memory, steady = peak during the measured steps - RSS before fit;
       process peak        = the process's highest RSS over its whole life.
  5. Compares the trainable parameter counts (they differ by construction: keras-hub's
     query kernel is [heads, hidden, head_dim] and Keras' LoRA gives it one input-side
     factor per head; the table's note has the arithmetic), checks that the adapters moved
     and the loss fell, prints a markdown table plus gemma_keras / keras-hub ratios, and
     writes them to bench/results/lora_train.md (lora_train_small.md, lora_train_2b.md for
     those sizes).

Resident memory includes what allocators keep cached after freeing it (the JAX/XLA and torch
CPU allocators do), so "steady" is what the process holds while stepping, not the minimum
a step could need. Timings need an otherwise idle machine: each row records how many cores
other processes kept busy during its fit (/proc/stat); on 2 cores, one busy core makes
torch's 2-thread OpenMP steps several times slower (measured: 13.6 s instead of ~4.5 s
single-threaded for the default config), XLA's less so.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as common  # noqa: E402
from _common import log, mib as _mib  # noqa: E402

DEFAULT_OUTPUT = common.RESULTS / "lora_train.md"
BACKENDS = common.BACKENDS

# keras-hub GemmaBackbone arguments (gemma_keras' GemmaConfig uses the same names and
# meanings: intermediate_dim counts both GeGLU branches).
CONFIGS = {
    "small": dict(vocabulary_size=4096, hidden_dim=256, num_layers=2, num_query_heads=4,
                  num_key_value_heads=1, head_dim=64, intermediate_dim=1024),
    "default": dict(vocabulary_size=32000, hidden_dim=1024, num_layers=8, num_query_heads=8,
                    num_key_value_heads=1, head_dim=128, intermediate_dim=8192),
    "2b": dict(vocabulary_size=256000, hidden_dim=2048, num_layers=18, num_query_heads=8,
               num_key_value_heads=1, head_dim=256, intermediate_dim=32768),
}
# Per config: dtype, batch, sequence, warm-up steps, measured steps, subprocess timeout (s).
RUNS = {
    "small": dict(dtype="float32", batch=2, seq=64, warmup=1, steps=5, timeout=600),
    "default": dict(dtype="float32", batch=2, seq=256, warmup=1, steps=5, timeout=1800),
    # A 2B step takes 15-60 s on 2 CPU cores (TF fastest, JAX slowest): 1 warm-up + 2
    # measured.
    "2b": dict(dtype="bfloat16", batch=1, seq=256, warmup=1, steps=2, timeout=3600),
}
RANK = 4
LEARNING_RATE = 1e-4
SEED = 1234

# (variant id, library, int8 weights: None / "all" / "decoder", gradient checkpointing, label).
# "decoder" keeps the tied embedding / output head in float: keras-hub's int8 head passes no
# useful gradient (see the notes), so that pair is the QLoRA comparison where both libraries
# train and do the same work.
VARIANTS = [
    ("gk", "gemma_keras", None, False, "gemma_keras LoRA"),
    ("kh", "keras_hub", None, False, "keras-hub LoRA"),
    ("gk-remat", "gemma_keras", None, True, "gemma_keras LoRA + gradient checkpointing"),
    ("gk-int8", "gemma_keras", "all", False, "gemma_keras QLoRA (int8 base)"),
    ("kh-int8", "keras_hub", "all", False, "keras-hub QLoRA (int8 base)"),
    ("gk-int8dec", "gemma_keras", "decoder", False,
     "gemma_keras QLoRA (int8 decoder, float head)"),
    ("kh-int8dec", "keras_hub", "decoder", False, "keras-hub QLoRA (int8 decoder, float head)"),
]
# Which variants run for each config (the 2B shape: plain LoRA only; each of its cases takes
# 2-5 minutes here).
CONFIG_VARIANTS = {"small": [v[0] for v in VARIANTS], "default": [v[0] for v in VARIANTS],
                   "2b": ["gk", "kh"]}
# gemma_keras variant -> the keras-hub variant it is compared with.
PEERS = {"gk": "kh", "gk-int8": "kh-int8", "gk-int8dec": "kh-int8dec", "gk-remat": "kh"}


# ---- the worker: one case in a fresh process ----------------------------------------------
def cpu_counters() -> dict:
    """This process's CPU seconds, faults and involuntary switches, and the whole machine's
    busy and steal seconds (steal: time the hypervisor gave our virtual CPUs to someone
    else): to tell a slow library from a machine busy with other work."""
    import os
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    with open("/proc/stat") as f:
        # "cpu user nice system idle iowait irq softirq steal ..." in clock ticks
        fields = [int(v) for v in f.readline().split()[1:9]]
    tick = os.sysconf("SC_CLK_TCK")
    return {"cpu_s": usage.ru_utime + usage.ru_stime, "major_faults": usage.ru_majflt,
            "involuntary_switches": usage.ru_nivcsw,
            "machine_busy_s": sum(fields[i] for i in (0, 1, 2, 5, 6)) / tick,
            "steal_s": fields[7] / tick, "wall_s": time.perf_counter()}


def make_data(config: dict, batch: int, seq: int, steps: int):
    """(x, y, sample_weight) for `steps` batches: one random batch repeated, so every step
    sees the same tokens and a working gradient shows as a falling loss."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    ids = rng.integers(3, config["vocabulary_size"], size=(batch, seq)).astype("int32")
    ids[:, 0] = 2  # <bos>
    labels = np.zeros_like(ids)
    labels[:, :-1] = ids[:, 1:]  # next token
    weights = np.ones(ids.shape, "float32")
    weights[:, -1] = 0.0  # the last column has no next token
    tile = lambda a: np.tile(a, (steps, 1))  # noqa: E731
    x = {"token_ids": tile(ids), "padding_mask": tile(np.ones(ids.shape, bool))}
    return x, tile(labels), tile(weights)


def build(library: str, config: dict, dtype: str, int8: str | None, remat: bool):
    """The causal LM with LoRA enabled (on int8 weights: every layer with `int8="all"`, all
    but the tied embedding with "decoder")."""
    if library == "keras_hub":
        import keras_hub

        backbone = keras_hub.models.GemmaBackbone(**config, dtype=dtype)
        lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    else:
        import gemma_keras as gk

        backbone = gk.GemmaBackbone(**config, dtype=dtype)
        lm = gk.GemmaCausalLM(backbone)
        backbone.gradient_checkpointing = remat
    if int8:
        import keras

        def decoder_only(layer):
            return not isinstance(layer, keras.layers.Embedding)

        # Before enable_lora: adapters stay in the float dtype.
        lm.quantize("int8", filters=decoder_only if int8 == "decoder" else None)
    backbone.enable_lora(rank=RANK)
    return lm


def _weight_bytes(variables) -> int:
    """Bytes the variables hold (numpy has no bfloat16, so sizes come from this table)."""
    import math

    import keras

    sizes = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "int4": 1, "uint8": 1}
    return sum(math.prod(v.shape) * sizes.get(keras.backend.standardize_dtype(v.dtype), 4)
               for v in variables)


def worker(library: str, config_name: str, int8: str | None, remat: bool) -> dict:
    import gc

    import keras
    import numpy as np

    run = RUNS[config_name]
    config = CONFIGS[config_name]
    common.start_backend()
    if library == "keras_hub":
        import keras_hub  # noqa: F401  (imported before the clock starts, like gemma_keras)
    else:
        import gemma_keras  # noqa: F401
    keras.utils.set_random_seed(SEED)
    start = time.perf_counter()
    lm = build(library, config, run["dtype"], int8, remat)
    build_s = time.perf_counter() - start
    # Both libraries get the same optimizer, loss and (no) metrics: the step is what differs.
    lm.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE),
               loss=keras.losses.SparseCategoricalCrossentropy(
                   from_logits=True, reduction="mean_with_sample_weight"),
               weighted_metrics=[])
    total_steps = run["warmup"] + run["steps"]
    x, y, sample_weight = make_data(config, run["batch"], run["seq"], total_steps)
    trainable = lm.trainable_variables
    before_values = [np.array(keras.ops.convert_to_numpy(v), np.float32) for v in trainable]

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.begin, self.end, self.running = [], [], []
            self.warmup_hwm = None

        def on_train_batch_begin(self, batch, logs=None):
            if batch == run["warmup"]:  # the warm-up is over: split its peak off
                self.warmup_hwm = common.proc_status()["VmHWM"]
                common.reset_peak()
            self.begin.append(time.perf_counter())

        def on_train_batch_end(self, batch, logs=None):
            # float() blocks until the step's loss exists, i.e. until the step ran; it is
            # Keras' running mean of the epoch's losses.
            self.running.append(float(logs["loss"]))
            self.end.append(time.perf_counter())

    timer = StepTimer()
    gc.collect()
    # Freed heap blocks (build temporaries) would otherwise count in the reference RSS and
    # then be reused by the step unseen: keras-hub's build leaves ~400 MB of them on torch.
    common.release_free_memory()
    before = common.proc_status()
    reset = common.reset_peak()
    counters = cpu_counters()
    lm.fit(x, y, sample_weight=sample_weight, batch_size=run["batch"], epochs=1,
           shuffle=False, verbose=0, callbacks=[timer])
    counters = {k: v - counters[k] for k, v in cpu_counters().items()}
    after = common.proc_status()
    # Each step's own loss, from the running means.
    losses = [timer.running[0]] + [(k + 1) * timer.running[k] - k * timer.running[k - 1]
                                   for k in range(1, len(timer.running))]
    moved = sum(float(np.abs(np.asarray(keras.ops.convert_to_numpy(v), np.float32) - b).sum())
                for v, b in zip(lm.trainable_variables, before_values))
    warm = run["warmup"]
    return {
        "build_s": build_s,
        "first_s": timer.end[0] - timer.begin[0],
        "warmup_s": timer.end[warm - 1] - timer.begin[0],
        "step_s": [timer.end[k] - timer.end[k - 1] for k in range(warm, total_steps)],
        "losses": losses,
        "adapter_change": moved,
        "trainable": int(sum(int(np.prod(v.shape)) for v in trainable)),
        "params": int(sum(int(np.prod(v.shape)) for v in lm.weights)),
        "weight_bytes": _weight_bytes(lm.weights),
        "rss_before_fit": before["VmRSS"],
        "peak_before_fit": before["VmHWM"],
        "peak_warmup": timer.warmup_hwm,
        "peak_steady": after["VmHWM"],
        "rss_after_fit": after["VmRSS"],
        "peak_is_exact": reset,
        "fit_counters": counters,
    }


# ---- the driver ---------------------------------------------------------------------------
def plan_cases(size: str, backends, skip_2b: bool, only):
    """[(case id, config, variant, backend)], case id = 'config:variant-backend'."""
    configs = {"small": ["small"], "2b": ["2b"], "default": ["default"] + ([] if skip_2b
                                                                         else ["2b"])}[size]
    cases = [(f"{c}:{v}-{b}", c, v, b) for c in configs for b in backends
             for v in CONFIG_VARIANTS[c]]
    if only:
        chosen = common.pick([case[0] for case in cases], only)
        cases = [case for case in cases if case[0] in chosen]
    return cases


def measure(config_name, variant, backend) -> dict:
    """The case's results, or {"error": ...} (`common.run_case`)."""
    _, library, int8, remat, _ = next(v for v in VARIANTS if v[0] == variant)
    argv = [__file__, "--worker", library, "--config", config_name]
    argv += ["--int8", int8] if int8 else []
    argv += ["--remat"] if remat else []
    return common.run_case(argv, env={"KERAS_BACKEND": backend},
                           timeout=RUNS[config_name]["timeout"])


def metrics(r: dict, config_name: str) -> dict:
    run = RUNS[config_name]
    step = statistics.median(r["step_s"])
    before = r["rss_before_fit"]
    return {
        "step_s": step,
        "tokens_s": run["batch"] * run["seq"] / step,
        "first_s": r["first_s"],
        "mem_first": r["peak_warmup"] - before,
        "mem_steady": r["peak_steady"] - before,
        "process_peak": max(r["peak_before_fit"], r["peak_warmup"], r["peak_steady"]),
    }


def other_load(r: dict) -> float:
    """Average CPU cores other processes kept busy during this case's fit (0 on an idle
    machine); a few tenths on 2 cores already slow a step down."""
    c = r.get("fit_counters", {})
    if "machine_busy_s" not in c:
        return float("nan")  # not recorded
    return max(0.0, (c["machine_busy_s"] - c["cpu_s"]) / c["wall_s"])


def _describe(config_name: str) -> str:
    c, run = CONFIGS[config_name], RUNS[config_name]
    return (f"vocab {c['vocabulary_size']}, hidden {c['hidden_dim']}, {c['num_layers']} "
            f"layers, {c['num_query_heads']} query heads / {c['num_key_value_heads']} kv head, "
            f"head_dim {c['head_dim']}, intermediate_dim {c['intermediate_dim']} (both GeGLU "
            f"branches); {run['dtype']}, batch {run['batch']} x {run['seq']} tokens, "
            f"{run['warmup']} warm-up + {run['steps']} measured steps")


def render(rows, args_line) -> str:
    lines = [
        "# LoRA training step: gemma_keras vs keras-hub (CPU)",
        "",
        f"LoRA rank {RANK} on query and value (alpha = rank), Adam (learning rate "
        f"{LEARNING_RATE:g}), sparse cross-entropy from logits averaged over weighted labels, "
        "no metrics; both libraries get the same compile arguments and the same arrays "
        "(random token ids, one batch repeated; next-token labels; sample weight 0 on the last "
        "column). Random weights, built from the configuration. QLoRA = `quantize(\"int8\")` "
        "before `enable_lora`; *int8 decoder, float head* = the same with `filters` that leave "
        "the tied embedding (`keras.layers.Embedding`) in float. Each row is a fresh process.",
        "",
        "*Step* = median end-to-end time of the measured steps (after the warm-up); "
        "*tokens/s* = batch x sequence / step. *First step* includes tracing and "
        "compilation (XLA on JAX; a TF graph, which Keras runs without XLA on a machine "
        "without a GPU; torch runs eagerly). *Step memory* = peak "
        "RSS (VmHWM) during the warm-up step / during the measured steps, minus the RSS "
        "just before `fit` (which holds the model and data, read after `malloc_trim` so that "
        "freed heap blocks the step could reuse unseen do not count): the training step's "
        "working memory. *Process peak* = the process's highest RSS. *Loss* = the first and the "
        "last step's loss on the repeated batch: it must fall if useful gradients reach the "
        "adapters. *Other load* = CPU cores that other processes kept busy during the fit "
        "(from /proc/stat): above ~0.2 the row's times are disturbed, torch's most (its "
        "OpenMP threads stall when a core is taken). MiB = 2^20 bytes.",
        "",
    ]
    by_case = {r["case"]: r for r in rows}
    for config_name in [c for c in CONFIGS if any(r["config"] == c for r in rows)]:
        ok = [r for r in rows if r["config"] == config_name and "step_s" in r]
        params = next((r["params"] for r in ok if r["variant"] == "gk"), None)
        lines += [f"## {config_name}: {_describe(config_name)}", ""]
        if params:
            weights = next(r["weight_bytes"] for r in ok if r["variant"] == "gk")
            lines += [f"{params:,} parameters, {_mib(weights)} MiB of weights.", ""]
        columns = ["case", "backend", "trainable params", "tokens/s", "step (s)",
                   "first step (s)", "step memory: first / steady (MiB)", "RSS before fit (MiB)",
                   "process peak (MiB)", "loss first -> last", "other load"]
        lines += common.table_head(columns, "llrrrrrrrlr")
        for r in [r for r in rows if r["config"] == config_name]:
            if "error" in r:
                lines.append(common.failed_row([r["label"], r["backend"]], r["error"],
                                               len(columns)))
                continue
            m = metrics(r, config_name)
            trainable = f"{r['trainable']:,}"
            peer = by_case.get(f"{config_name}:{PEERS.get(r['variant'], '')}-{r['backend']}")
            if peer and "trainable" in peer:
                trainable += (" (= keras-hub)" if peer["trainable"] == r["trainable"]
                              else " (keras-hub: see note)")
            loss = f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}"
            if not r["losses"][-1] < r["losses"][0]:
                loss += " (**not falling**)"
            if not r["adapter_change"] > 0:
                loss += " (**adapters unchanged**)"
            lines.append(
                f"| {r['label']} | {r['backend']} | {trainable} | **{m['tokens_s']:,.0f}** | "
                f"{m['step_s']:.2f} | {m['first_s']:.1f} | {_mib(m['mem_first'])} / "
                f"**{_mib(m['mem_steady'])}** | {_mib(r['rss_before_fit'])} | "
                f"{_mib(m['process_peak'])} | {loss} | {common.fmt(other_load(r), 2)} |")
        lines.append("")
        lines += ratio_lines(rows, config_name)
        lines += notes(ok, config_name)
    lines += common.machine_lines(args_line)
    return "\n".join(lines)


def notes(ok, config_name) -> list:
    """Explanations for what the table shows, only where it shows it."""
    out = []
    trainable = {(r["variant"].split("-")[0], r["backend"]): r["trainable"] for r in ok}
    if any(trainable.get(("gk", b)) not in (None, trainable.get(("kh", b)))
           for b in BACKENDS if ("kh", b) in trainable):
        c = CONFIGS[config_name]
        d, n, k, h = c["hidden_dim"], c["num_query_heads"], c["num_key_value_heads"], \
            c["head_dim"]
        gk_count = RANK * ((d + n * h) + (d + k * h)) * c["num_layers"]
        kh_count = RANK * ((n * d + h) + (k * d + h)) * c["num_layers"]
        out.append(
            f"Trainable parameters differ by construction, not by a bug: keras-hub's query "
            f"kernel is an EinsumDense [heads, hidden, head_dim], and Keras' `enable_lora` "
            f"factors it as A [heads, hidden, rank] x B [rank, head_dim], a separate "
            f"input-side factor per head: rank x (heads x hidden + head_dim) per layer. "
            f"gemma_keras' projections are [out, in] matrices with standard LoRA, rank x (in + "
            f"out). Here: gemma_keras {gk_count:,} = {RANK} x ((({d} + {n * h}) + ({d} + "
            f"{k * h})) x {c['num_layers']}), keras-hub {kh_count:,} = {RANK} x ((({n} x {d} + "
            f"{h}) + ({k} x {d} + {h})) x {c['num_layers']}); the value projections (one kv "
            f"head) match. The adapters' FLOPs are negligible next to the base model's either "
            f"way. How fast the loss falls is not comparable between the libraries (different "
            f"random initialisations and adapter shapes); the loss column checks gradient flow.")
    if any(r["variant"] == "kh-int8" for r in ok):
        out.append(
            "keras-hub QLoRA does not train usefully (keras 3.15.1, keras-hub 0.32): Keras' "
            "int8 `ReversibleEmbedding` reverse call (the tied output head) quantizes the "
            "hidden states to int8 with no custom gradient, so the gradient reaching the "
            "decoder only flows through the per-row abs-max scale. Measured on the small "
            "config (TensorFlow): cosine between the adapters' gradient with keras-hub's int8 "
            "head and with float32 weights -0.04 (norm 3x smaller); with only the decoder "
            "projections in int8, 0.9996. Its loss column moves by noise only. gemma_keras "
            "gives its int8 head a straight-through gradient (cosine 0.9997), which costs the "
            "head's input gradient in the backward pass, a [tokens, vocab] x [vocab, hidden] "
            "product keras-hub skips: " + _head_share(config_name) + " The rows still time a "
            "QLoRA step; the *int8 decoder, float head* pair, where both libraries train and "
            "do the same work, is the like-for-like QLoRA comparison.")
    if any(r["variant"] == "gk-int8" and not r["losses"][-1] < r["losses"][0] for r in ok):
        out.append("gemma_keras QLoRA's loss did not fall: check its int8 gradients.")
    by_variant = {(r["variant"], r["backend"]): r for r in ok}
    plain, remat = by_variant.get(("gk", "jax")), by_variant.get(("gk-remat", "jax"))
    if plain and remat and (metrics(remat, config_name)["mem_steady"]
                            > 0.85 * metrics(plain, config_name)["mem_steady"]):
        out.append(
            "Gradient checkpointing on JAX barely lowers the step's memory: XLA's own plan for "
            "the compiled train step (`memory_analysis()`, default config) holds 52.5 MiB per "
            "decoder block without it and 44.5 MiB with it (temp buffers 606 vs 542 MiB for 8 "
            "blocks), so the recomputed activations are still mostly live at once; TensorFlow "
            "(and torch) keep only the blocks' inputs.")
    remat = by_variant.get(("gk-remat", "torch"))
    if remat and remat["peak_steady"] - remat["rss_before_fit"] > 1.5 * (
            remat["peak_warmup"] - remat["rss_before_fit"]):
        out.append(
            "gemma_keras gradient checkpointing on torch: memory grows step after step (first "
            "step low, later ones higher). Keras' torch `remat` is `torch.utils.checkpoint("
            "use_reentrant=False)`, whose early stop ends each recomputation by raising an "
            "exception; its traceback keeps the recomputation's frames, with their "
            "activations, in reference cycles that only Python's cyclic GC frees (measured "
            "on the default config: +80 MiB of RSS per step over 20 steps; flat at 279 MiB "
            "per step under `torch.utils.checkpoint.set_checkpoint_early_stop(False)`, or "
            "with `gc.collect()` after each step).")
    if RUNS[config_name]["dtype"] == "bfloat16" and any(
            r["backend"] == "jax" and metrics(r, config_name)["mem_steady"]
            > 1.5 * r["weight_bytes"] for r in ok):
        out.append(
            "JAX in bfloat16: XLA's CPU backend runs bfloat16 products in float32, converting "
            "the weights, and keeps those float32 copies from the forward to the backward "
            "pass: the step's working memory is about twice the bfloat16 model, in both "
            "libraries (a 250 MiB bfloat16 matrix's input gradient compiles to 564 MiB of "
            "temp buffers, 62 MiB in float32).")
    return [line for text in out for line in (f"Note: {text}", "")]


def _head_share(config_name) -> str:
    """The head's input gradient as a share of a LoRA step's FLOPs (forward, plus the input
    gradients of every frozen product; attention scores and the adapters left out)."""
    c, run = CONFIGS[config_name], RUNS[config_name]
    tokens = run["batch"] * run["seq"]
    d, h = c["hidden_dim"], c["head_dim"]
    per_layer = d * h * (c["num_query_heads"] * 2 + c["num_key_value_heads"] * 2) \
        + d * c["intermediate_dim"] * 3 // 2
    head = 2 * tokens * c["vocabulary_size"] * d
    step = 2 * 2 * tokens * (per_layer * c["num_layers"] + c["vocabulary_size"] * d)
    return (f"{head / 1e9:.1f} of ~{step / 1e9:.0f} GFLOP per step here "
            f"({100 * head / step:.0f}%).")


def ratio_lines(rows, config_name) -> list:
    """gemma_keras against keras-hub (and gradient checkpointing against plain gemma_keras),
    per backend: throughput (higher is better), first step and memory (lower is better)."""
    by_case = {r["case"]: r for r in rows if "step_s" in r}
    out = []
    for backend in BACKENDS:
        for mine, theirs, name in (("gk", "kh", "LoRA"), ("gk-int8", "kh-int8", "QLoRA"),
                                   ("gk-int8dec", "kh-int8dec", "QLoRA, float head"),
                                   ("gk-remat", "gk", "gemma_keras checkpointing / plain")):
            a = by_case.get(f"{config_name}:{mine}-{backend}")
            b = by_case.get(f"{config_name}:{theirs}-{backend}")
            if not (a and b):
                continue
            ma, mb = metrics(a, config_name), metrics(b, config_name)
            out.append(common.table_row([name, backend, *(
                common.ratio(ma[k], mb[k])
                for k in ("tokens_s", "first_s", "mem_steady", "mem_first", "process_peak"))]))
    if not out:
        return []
    return ["Ratios, gemma_keras / keras-hub unless said (tokens/s: higher is better; the "
            "others: lower is better):", "",
            *common.table_head(["comparison", "backend", "tokens/s", "first step time",
                                "steady step memory", "first step memory", "process peak"],
                               "llrrrrr"), *out, ""]


def main(argv=None):
    p = common.parser(__doc__)
    common.add_backend_arg(p)
    p.add_argument("--size", choices=("default", "2b", "small"), default="default",
                   help="'default': the ~152M config, then the 2B shape (unless --skip-2b); "
                        "'2b': only the 2B shape; 'small': a tiny config for a smoke run.")
    p.add_argument("--skip-2b", action="store_true", help="Leave out the 2B shape.")
    p.add_argument("--only", help="Comma-separated case ids or globs, 'config:variant-backend' "
                   "with config in " + ", ".join(CONFIGS) + " and variant in "
                   + ", ".join(v[0] for v in VARIANTS) + " (e.g. 'default:gk-jax', '*:kh-*').")
    common.add_report_args(
        p, "Markdown file (default bench/results/lora_train.md; lora_train_<size>.md for "
        "--size small / 2b).",
        json_help="Also save the raw results (per-step times, losses, peaks) here.",
        from_json_help="Re-render the table from a --json file of an earlier run.")
    # Internal: one case in this process.
    p.add_argument("--worker", choices=("gemma_keras", "keras_hub"), help=argparse.SUPPRESS)
    p.add_argument("--config", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--int8", choices=("all", "decoder"), help=argparse.SUPPRESS)
    p.add_argument("--remat", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        common.reply(worker(args.worker, args.config, args.int8, args.remat))
        return 0

    def measure_all():
        backends = common.backends(args)
        rows = []
        for case, config_name, variant, backend in plan_cases(args.size, backends,
                                                              args.skip_2b, args.only):
            label = next(v[4] for v in VARIANTS if v[0] == variant)
            log(f"{case}: {label} [{backend}] ...")
            t = time.perf_counter()
            r = measure(config_name, variant, backend)
            r.update(case=case, config=config_name, variant=variant, backend=backend,
                     label=label)
            rows.append(r)
            if "step_s" in r:
                _log_case(r, config_name)
            log(f"  ({time.perf_counter() - t:.0f} s)")
        return {"rows": rows, "args_line": common.args_line(__file__, argv)}

    output = args.output or (DEFAULT_OUTPUT if args.size == "default"
                             else DEFAULT_OUTPUT.with_name(f"lora_train_{args.size}.md"))
    return common.report(output, measure_all, lambda raw: render(raw["rows"], raw["args_line"]),
                         json_path=args.json, from_json=args.from_json)


def _log_case(r, config_name):
    m = metrics(r, config_name)
    log(f"  {m['tokens_s']:,.0f} tokens/s (step {m['step_s']:.2f} s, first "
        f"{m['first_s']:.1f} s), step memory {_mib(m['mem_first'])} / "
        f"{_mib(m['mem_steady'])} MiB, peak {_mib(m['process_peak'])} MiB, loss "
        f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}, {r['trainable']:,} trainable")
    c = r["fit_counters"]
    log(f"  fit: {c['wall_s']:.1f} s wall, this process {c['cpu_s'] / c['wall_s']:.2f} "
        f"cores, other processes {other_load(r):.2f} cores, host steal "
        f"{c['steal_s']:.1f} s, {c['major_faults']} major faults, "
        f"{c['involuntary_switches']} involuntary context switches")


if __name__ == "__main__":
    sys.exit(main())
