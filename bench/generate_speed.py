"""Generation speed: gemma_keras vs keras-hub vs Hugging Face transformers, on CPU.

    python bench/generate_speed.py                      # everything (~15 min on 2 cores)
    python bench/generate_speed.py --quick              # 32 new tokens, batch 1 only
    python bench/generate_speed.py --only gk-jax,hf-eager
    python bench/generate_speed.py --only 'gk-*' --batch-sizes 1

What it does:
  1. Once, caches a Gemma-shaped checkpoint with random weights under bench/.cache/: a Hugging
     Face `GemmaForCausalLM` (seed 0) saved as safetensors, and the same weights written as a
     keras-hub preset by gemma_keras' `save_to_preset`. Every implementation loads these, so
     all of them run the identical model.
  2. Measures this machine's memory read bandwidth (NumPy sums and maxes over a 1.5 GB
     array, one and two threads, best of several) in a fresh process, at the start, after
     every timed round and at the end; the bound takes the best. Decoding one token reads every weight
     once (the embedding once, as the output head), so bandwidth / (parameters x 4 bytes) is
     an upper bound on batch-1 decode tokens/s in float32.
  3. Runs each implementation in its own subprocess, all of them alive together: each loads
     (one at a time), makes its first `generate` call (timed: the first-call latency,
     compilation included; also the warm-up; one worker at a time), then `--runs` rounds in
     which every implementation in turn times one (full generate of N new tokens, prefill
     only), the order rotating each round. Interleaving matters on this shared machine:
     its speed drifts by 20-30% over minutes, which sequential runs turned into false
     ratios. All greedy, no stop tokens, float32.
       decode tokens/s  = batch x decode steps / (generate time - prefill time)
       prefill tokens/s = batch x prompt length / prefill time
     "best" uses the fastest run of each, "median" the medians. Prefill only is, per library:
       gemma_keras   `GenerationSession(lm, prompts, P + N)` (the prefill `generate` runs,
                     same compiled function and cache size) + argmax of the last logits;
       keras-hub     `generate` with the padding mask covering all P + N columns (its
                     compiled generate_step then runs the cache-seeding forward pass over
                     P + N columns and zero loop iterations);
       transformers  `generate(max_new_tokens=1)`.
     Decode steps: N - 1 for gemma_keras and transformers (prefill yields the first token),
     N for keras-hub (its loop re-feeds the last prompt token, then one step per token).
  4. Checks that every implementation produced the same greedy tokens as transformers eager,
     prints a markdown table and writes it to bench/results/generate_speed.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as common  # noqa: E402
from _common import log  # noqa: E402

DEFAULT_CACHE = common.CACHE / "generate_speed"
DEFAULT_OUTPUT = common.RESULTS / "generate_speed.md"

# Hugging Face GemmaConfig: ~152M parameters, ~608 MB in float32. Gemma 1 style (no soft caps,
# no sliding window); intermediate_size is one GeGLU branch (keras-hub's intermediate_dim / 2).
MODEL = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=1, head_dim=128, intermediate_size=4096)
SEED = 0
# Standard deviation of the (tied) embedding. HF's default 0.02 makes every greedy row repeat
# one token forever (the scaled input embedding dominates the residual stream, so the last
# token's own logit wins), which would make the token check vacuous; at 0.002 rows vary
# (3-45 distinct tokens per 128) while the top-2 logit gap stays >= 1e-5, far above float32
# disagreements between implementations.
EMBEDDING_STD = 0.002

# (case id, library, keras backend or None, label)
CASES = [
    ("gk-jax", "gemma_keras", "jax", "gemma_keras"),
    ("gk-tensorflow", "gemma_keras", "tensorflow", "gemma_keras"),
    ("gk-torch", "gemma_keras", "torch", "gemma_keras"),
    ("kh-jax", "keras_hub", "jax", "keras-hub"),
    ("kh-tensorflow", "keras_hub", "tensorflow", "keras-hub"),
    ("kh-torch", "keras_hub", "torch", "keras-hub"),
    ("hf-eager", "hf_eager", None, "transformers eager (DynamicCache, sdpa)"),
    ("hf-static", "hf_static", None, "transformers static cache (eager)"),
    # Off unless asked for with --only hf-compile: see HF_COMPILE_NOTE.
    ("hf-compile", "hf_compile", None, "transformers static cache + torch.compile"),
]
DEFAULT_OFF = ("hf-compile",)
HF_COMPILE_NOTE = (
    "transformers with torch.compile (static cache, inductor, `compile_config` forced on "
    "CPU) is left out of the default run: on this 2-core CPU, when this benchmark was "
    "written, its first 128-token generate took 122 s and the next ones ~60 s each (eager: "
    "~13 s), so it does not pay off here; measure it with `--only hf-compile`.")
REFERENCE = "hf-eager"


# ---- inside the worker subprocesses ------------------------------------------------------
def _prompts(batch: int, length: int, vocab: int):
    """Random prompts (fixed seed), each starting with <bos> (id 2); rows differ."""
    import numpy as np

    rng = np.random.default_rng(1234)
    ids = rng.integers(3, vocab, size=(max(batch, 8), length), dtype=np.int64).astype("int32")
    ids[:, 0] = 2
    return ids[:batch]


def _setup(library: str, dirs: dict, prompt_len: int, new_tokens: int):
    """Loads the model; returns (generate(ids) -> new ids [batch, N], prefill(ids), decode
    steps per generate, parameter count)."""
    import numpy as np

    total = prompt_len + new_tokens
    if library.startswith("hf_"):
        import torch
        import transformers

        torch.manual_seed(0)
        model = transformers.GemmaForCausalLM.from_pretrained(dirs["hf"], dtype=torch.float32)
        model.eval()
        gen_config = model.generation_config
        gen_config.eos_token_id = None  # never stop early: always N tokens
        gen_config.pad_token_id = 0
        gen_config.do_sample = False
        extra = {}
        if library in ("hf_static", "hf_compile"):
            extra["cache_implementation"] = "static"
        if library == "hf_compile":
            compile_config = transformers.CompileConfig(fullgraph=True, dynamic=False,
                                                        mode="default")
            compile_config._compile_all_devices = True  # CPU is excluded by default
            extra["compile_config"] = compile_config

        def run(ids, n):
            ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=n, min_new_tokens=n,
                                     generation_config=gen_config, **extra)
            return out[:, ids.shape[1]:].numpy()

        count = sum(p.numel() for p in model.parameters())
        return (lambda ids: run(ids, new_tokens)), (lambda ids: run(ids, 1)), \
            new_tokens - 1, count

    import keras

    common.start_backend()
    if library == "keras_hub":
        import keras_hub

        backbone = keras_hub.models.GemmaBackbone.from_preset(str(dirs["keras_hub"]),
                                                              dtype="float32")
        lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
        lm.compile(sampler="greedy")

        def run(ids, prompt_only):
            batch = ids.shape[0]
            token_ids = np.zeros((batch, total), "int32")
            token_ids[:, :prompt_len] = ids
            mask = np.zeros((batch, total), bool)
            mask[:, : total if prompt_only else prompt_len] = True
            out = lm.generate({"token_ids": token_ids, "padding_mask": mask},
                              stop_token_ids=None)
            return np.asarray(keras.ops.convert_to_numpy(out["token_ids"]))[:, prompt_len:]

        return (lambda ids: run(ids, False)), (lambda ids: run(ids, True)), new_tokens, \
            backbone.count_params()

    import gemma_keras as gk
    from gemma_keras.generation.session import GenerationSession

    lm = gk.GemmaCausalLM.from_preset(str(dirs["hf"]), dtype="float32")

    def generate(ids):
        out = lm.generate({"token_ids": ids, "padding_mask": np.ones_like(ids)},
                          max_new_tokens=new_tokens, stop_token_ids=None)
        return np.asarray(out["token_ids"])[:, prompt_len:]

    def prefill(ids):
        session = GenerationSession(lm, [list(row) for row in ids], total)
        return np.argmax(session.logits, axis=-1)

    return generate, prefill, new_tokens - 1, lm.backbone.count_params()


def _timed(fn, *args):
    return common.timed(fn, *args, collect=True)


def serve_worker(library: str, dirs: dict, prompt_len, new_tokens, warmups):
    """One implementation, loaded once, answering the coordinator's requests in turn:
    load (the model's size), first (the first generate of a batch size: compilation /
    tracing included; it is also the warm-up), round (one timed generate and prefill)."""
    start = time.perf_counter()
    generate, prefill, steps, params = _setup(library, dirs, prompt_len, new_tokens)
    loaded = {"load_s": time.perf_counter() - start, "params": int(params), "steps": steps}
    first_tokens = {}

    def handle(request):
        if request["cmd"] == "load":
            return loaded
        batch = request["batch"]
        ids = _prompts(batch, prompt_len, MODEL["vocab_size"])
        if request["cmd"] == "first":
            first_s, tokens = _timed(generate, ids)
            warm_prefill_s, _ = _timed(prefill, ids)  # compiles what prefill alone needs
            for _ in range(warmups):
                _timed(generate, ids)
            first_tokens[batch] = tokens
            return {"first_s": first_s, "first_prefill_s": warm_prefill_s,
                    "tokens": tokens.tolist(), **_choices(library)}
        t, again = _timed(generate, ids)
        return {"generate_s": t, "prefill_s": _timed(prefill, ids)[0],
                "same": bool((again == first_tokens[batch]).all())}

    common.serve(handle)


def _choices(library) -> dict:
    """What gemma_keras picked by timing at first use (torch: the one-row product)."""
    if library != "gemma_keras" or "torch" not in sys.modules:
        return {}
    from gemma_keras.backends import torch as backend

    if backend._one_row_linear.cache_info().currsize == 0:
        return {}
    product = backend._one_row_linear()
    return {"one_row_product": "F.linear" if product is sys.modules["torch"].nn.functional.linear
            else "oneDNN" if product is not None else "none"}


def measure(cases, dirs, args, after_round=None) -> list:
    """Every case's worker is started (one loading at a time), then each batch size gets its
    first calls one worker at a time and `--runs` rounds in which every worker times one
    generate + prefill in turn, the order rotating each round (`common.Workers`).
    `after_round(batch, round)` runs after each round (the bandwidth probe, so the bound is
    measured through the same minutes as the decoding)."""
    worker_args = ["--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
                   "--warmups", str(args.warmups)]
    rows = {}

    def failed(case, error):
        log(f"  {case} FAILED: {str(error)[-2000:]}")
        rows[case].pop("batches", None)
        rows[case]["error"] = common.error_line(str(error))

    workers = common.Workers(on_error=failed)
    for case, library, backend, label in cases:
        shown = backend or "torch"
        rows[case] = {"case": case, "label": label, "backend": shown}
        log(f"{case}: {label} [{shown}] loading ...")
        loaded = workers.start(case, [__file__, "--worker", library, "--dir", json.dumps(dirs),
                                      *worker_args],
                               {"KERAS_BACKEND": backend} if backend else {}, {"cmd": "load"})
        if loaded:
            rows[case].update(loaded, batches={})
    for batch in args.batch_sizes:
        for case, row in rows.items():
            if case in workers.live:
                log(f"{case}: B={batch} first call ...")
                first = workers.ask(case, {"cmd": "first", "batch": batch})
                if first:
                    if "one_row_product" in first:
                        log(f"  one-row product: {first['one_row_product']}")
                    row["batches"][str(batch)] = {**first, "generate_s": [], "prefill_s": [],
                                                  "deterministic": True}
        for round_, order in workers.rounds(list(rows), args.runs):
            log(f"B={batch} round {round_ + 1}/{args.runs}: " + ", ".join(order))
            for case in order:
                got = workers.ask(case, {"cmd": "round", "batch": batch}, settle_s=0.3)
                if got:
                    b = rows[case]["batches"][str(batch)]
                    b["generate_s"].append(got["generate_s"])
                    b["prefill_s"].append(got["prefill_s"])
                    b["deterministic"] &= got["same"]
            if after_round:
                after_round(batch, round_)
    workers.close()
    for row in rows.values():
        for batch in args.batch_sizes:
            m = metrics(row, batch, args.prompt_len) if "batches" in row else {}
            if m:
                log(f"{row['case']} B={batch}: decode {m['decode_best']:.1f} tok/s (median "
                    f"{m['decode_median']:.1f}), prefill {m['prefill_best']:.0f} tok/s, first "
                    f"call {m['first_s']:.1f} s")
    return list(rows.values())


def ensure_checkpoints(cache: pathlib.Path) -> dict:
    key = json.dumps({**MODEL, "seed": SEED, "embedding_std": EMBEDDING_STD}, sort_keys=True)
    return common.ensure_checkpoints(cache, key, __file__, [])


# ---- metrics and the report --------------------------------------------------------------
def metrics(r: dict, batch: int, prompt_len: int) -> dict:
    b = r["batches"].get(str(batch))
    if not b:
        return {}
    gen, pre = b["generate_s"], b["prefill_s"]
    steps = r["steps"]
    best_decode_s = min(gen) - min(pre)
    median_decode_s = statistics.median(gen) - statistics.median(pre)
    return {
        "decode_best": batch * steps / best_decode_s if best_decode_s > 0 else float("nan"),
        "decode_median": (batch * steps / median_decode_s if median_decode_s > 0
                          else float("nan")),
        "ms_per_step": 1e3 * best_decode_s / steps,
        "prefill_best": batch * prompt_len / min(pre),
        "prefill_median": batch * prompt_len / statistics.median(pre),
        "prefill_ms": 1e3 * min(pre),
        "first_s": b["first_s"],
        # What the first call costs beyond a steady-state call: compilation / tracing.
        "first_overhead_s": b["first_s"] - statistics.median(gen),
        "generate_best": min(gen),
        "generate_median": statistics.median(gen),
    }


def check_tokens(rows, log) -> dict:
    """{case: description} of greedy-token agreement with the reference."""
    ref = next((r for r in rows if r["case"] == REFERENCE and "batches" in r), None)
    ref = ref or next((r for r in rows if "batches" in r), None)
    verdict = {}
    for r in rows:
        if "batches" not in r:
            continue
        parts = []
        for batch, b in r["batches"].items():
            want = ref["batches"].get(batch, {}).get("tokens")
            if want is None:
                continue
            got = b["tokens"]
            bad = [(i, next(j for j, (x, y) in enumerate(zip(g, w)) if x != y))
                   for i, (g, w) in enumerate(zip(got, want)) if g != w]
            if bad:
                parts.append(f"B={batch}: {len(bad)}/{len(got)} rows differ (first at "
                             + ", ".join(f"row {i} token {j}" for i, j in bad[:3]) + ")")
                log(f"WARNING: {r['case']} greedy tokens differ from {ref['case']}: "
                    f"{parts[-1]}")
        if r is ref:
            verdict[r["case"]] = "reference"
        else:
            verdict[r["case"]] = "; ".join(parts) if parts else "yes"
    return verdict


def render(rows, bandwidth, args, args_line) -> str:

    P, N = args.prompt_len, args.new_tokens
    batches = args.batch_sizes
    params = next((r["params"] for r in rows if "params" in r), None)
    weight_bytes = params * 4 if params else None
    bw = common.fastest(bandwidth) if bandwidth else None
    bound = bw / weight_bytes if bw and weight_bytes else None
    agree = check_tokens(rows, lambda m: None)
    big = max(batches)
    lines = [
        "# Generation speed: gemma_keras vs keras-hub vs transformers (CPU, float32)",
        "",
        (f"Model: Gemma-1-shaped, random weights (identical for every implementation), "
         f"{params:,} parameters ({weight_bytes / 1e6:,.0f} MB in float32): vocab "
         f"{MODEL['vocab_size']}, hidden {MODEL['hidden_size']}, "
         f"{MODEL['num_hidden_layers']} layers, {MODEL['num_attention_heads']} query heads / "
         f"{MODEL['num_key_value_heads']} kv head, head_dim {MODEL['head_dim']}, GeGLU "
         f"branches {MODEL['intermediate_size']}. Greedy, no stop tokens, {P}-token prompts, "
         f"{N} new tokens." if params else ""),
        "",
        (f"Memory read bandwidth: {bw / 1e9:.1f} GB/s (NumPy reductions over "
         f"{bandwidth['bytes'] / 1e9:.1f} GB, best of 7 in each of "
         f"{bandwidth.get('probes', 2)} probes: at the start, after every round and at the "
         f"end; sum, one thread "
         f"{bandwidth['one_thread'] / 1e9:.1f}, two threads "
         f"{bandwidth['two_threads'] / 1e9:.1f}; NumPy max, two threads "
         f"{bandwidth.get('two_threads_max', float('nan')) / 1e9:.1f}; the bound takes the "
         f"fastest). Decoding a token reads every weight once, so "
         f"batch-1 decode is bounded by {bw / 1e9:.1f} GB/s / {weight_bytes / 1e6:.0f} MB = "
         f"**{bound:.1f} tokens/s** ({1e3 / bound:.1f} ms/token)."
         if bound else "Memory bandwidth: not measured."),
        "",
        f"Each implementation runs in its own process, all alive together: load, first call "
        f"(timed, compilation included; also the warm-up), then {args.runs} rounds in which "
        f"each implementation in turn times (generate {N} tokens, prefill only), the order "
        "rotating, so the machine's drift falls on all of them alike. *Decode* = batch x decode steps / (generate - prefill), steady state; "
        "**best** of the rounds, median in parentheses. *Prefill* = batch x prompt tokens / "
        "prefill time. *% bound* = batch-1 decode / the bandwidth bound. *First call* = the "
        f"very first generate (batch 1, {N} tokens) in a fresh process, compilation "
        "included; *first - steady* = that minus the median timed generate, i.e. roughly "
        "the compilation / tracing cost.",
        "",
    ]
    columns = ["implementation", "backend", "B=1 decode tok/s", "ms/token", "% bound",
               "B=1 prefill tok/s", "first call (s)", "first - steady call (s)"]
    if big != 1:
        columns += [f"B={big} decode tok/s", f"B={big} prefill tok/s"]
    columns.append("same greedy tokens")
    lines += common.table_head(columns, "ll" + "r" * (len(columns) - 3) + "l")
    fmt = common.fmt

    def speeds(m, key):  # best (median)
        digits = 0 if key == "prefill" else 1
        best = fmt(m.get(f"{key}_best"), digits)
        return (f"**{best}**" if key == "decode" else best) \
            + f" ({fmt(m.get(f'{key}_median'), digits)})"
    for r in rows:
        if "error" in r:
            lines.append(common.failed_row([r["label"], r["backend"]], r["error"], len(columns)))
            continue
        m1 = metrics(r, 1, P) if 1 in batches else {}
        cells = [r["label"], r["backend"], speeds(m1, "decode"), fmt(m1.get("ms_per_step")),
                 fmt(100 * m1["decode_best"] / bound, 0) + "%" if bound and m1 else "-",
                 speeds(m1, "prefill"), fmt(m1.get("first_s")),
                 fmt(m1.get("first_overhead_s"))]
        if big != 1:
            mb = metrics(r, big, P)
            cells += [speeds(mb, "decode"), speeds(mb, "prefill")]
        lines.append(common.table_row(cells + [agree.get(r["case"], "-")]))

    # Ratios: gemma_keras on each backend against each peer.
    by_case = {r["case"]: r for r in rows if "batches" in r}
    gk_cases = [c for c in ("gk-jax", "gk-tensorflow", "gk-torch") if c in by_case]
    if gk_cases:
        lines += ["", "Ratios, gemma_keras / peer (higher is better; first call: peer / "
                  "gemma_keras, so higher is better there too). Targets: >= 1.25x keras-hub "
                  "on JAX, >= 1.5x on TensorFlow, >= 2.5x on torch, >= 1.15x transformers "
                  "eager (batch-1 decode), >= 85% of the bandwidth bound on the best backend.",
                  ""]
        cols = [("B=1 decode", 1, "decode_best"), ("B=1 prefill", 1, "prefill_best")]
        if big != 1:
            cols.insert(1, (f"B={big} decode", big, "decode_best"))
        cols.append(("first call", 1, "first_s"))
        lines += common.table_head(["gemma_keras", "vs", *(c[0] for c in cols), "target"],
                                   "ll" + "r" * len(cols) + "l")
        targets = {"kh-jax": 1.25, "kh-tensorflow": 1.5, "kh-torch": 2.5, "hf-eager": 1.15}
        for g in gk_cases:
            backend = g.split("-", 1)[1]
            for peer in (f"kh-{backend}", "hf-eager", "hf-static", "hf-compile"):
                if peer not in by_case:
                    continue
                cells = []
                for _, batch, key in cols:
                    mine, theirs = (metrics(by_case[g], batch, P).get(key),
                                    metrics(by_case[peer], batch, P).get(key))
                    cells.append(common.ratio(theirs, mine) if key == "first_s"
                                 else common.ratio(mine, theirs))
                target = targets.get(peer)
                verdict = ""
                if target:
                    d = (metrics(by_case[g], 1, P).get("decode_best"),
                         metrics(by_case[peer], 1, P).get("decode_best"))
                    met = d[0] and d[1] and d[0] / d[1] >= target
                    verdict = f">= {target}x: " + ("met" if met else "**not met**")
                peer_name = f"{by_case[peer]['label']} ({by_case[peer]['backend']})"
                lines.append(common.table_row([backend, peer_name, *cells, verdict]))
        paired_lines = []
        for g in gk_cases:
            for peer in (f"kh-{g.split('-', 1)[1]}", "hf-eager"):
                ratios = [a / b for a, b in zip(_round_decodes(by_case[g]),
                                                _round_decodes(by_case.get(peer))) if b]
                if ratios:
                    paired_lines.append(
                        f"- {g.split('-', 1)[1]} vs {by_case[peer]['label']}: "
                        + ", ".join(f"{r:.2f}x" for r in ratios)
                        + f" (median {statistics.median(ratios):.2f}x)")
        if paired_lines:
            lines += ["", "Batch-1 decode ratios round by round (both sides timed in the same "
                      "round, minutes apart at most):", ""] + paired_lines
        if bound:
            best = max(gk_cases, key=lambda c: metrics(by_case[c], 1, P).get("decode_best", 0))
            frac = metrics(by_case[best], 1, P)["decode_best"] / bound
            lines += ["", f"Best gemma_keras backend at batch 1: {best.split('-', 1)[1]}, "
                      f"{100 * frac:.0f}% of the bandwidth bound (target 85%: "
                      f"{'met' if frac >= 0.85 else '**not met**'})."]
            paired = _paired_fractions(by_case[best], weight_bytes,
                                       bandwidth.get("batch1_rounds"))
            if paired:
                lines += ["", "The same, paired by round (each round's decode against the "
                          "faster of the probes just before and after that round, instead of "
                          f"the fastest of all {bandwidth.get('probes')} probes): "
                          + ", ".join(f"{100 * f:.0f}%" for f in paired)
                          + f"; median {100 * statistics.median(paired):.0f}%."]
    notes = [
        "",
        "Notes: keras-hub's prefill is its cache-seeding forward pass over all prompt + new "
        f"columns ({P + N} here, with logits for every column), its whole generate is one "
        "compiled function on JAX/TensorFlow (XLA while loop) and a Python loop of eager "
        "ops on torch. transformers uses its default attention (sdpa) under "
        "`torch.inference_mode`; *static* means `cache_implementation=\"static\"` without "
        "compilation (transformers does not auto-compile on CPU). "
        + (HF_COMPILE_NOTE if "hf-compile" not in by_case else ""),
        "",
    ] + common.machine_lines(args_line)
    return "\n".join(lines + notes)


def select_cases(only):
    if not only:
        return [c for c in CASES if c[0] not in DEFAULT_OFF]
    chosen = common.pick([c[0] for c in CASES], only, prefixes=True)
    return [c for c in CASES if c[0] in chosen]


def _round_bandwidths(probes) -> list:
    """Read bandwidth around each batch-1 round: the faster of the probes just before and
    just after it (bytes/s), so each round's decode can be set against its own minutes."""
    fastest = [common.fastest(p) for p in probes]
    after = [i for i, p in enumerate(probes) if p["after"] and p["after"][0] == 1]
    return [max(fastest[i - 1], fastest[i]) for i in after]


def _round_decodes(row) -> list:
    """Batch-1 decode tokens/s of each round (empty for a missing or failed case)."""
    b = (row or {}).get("batches", {}).get("1")
    if not b:
        return []
    return [row["steps"] / (g - p) if g > p else 0.0
            for g, p in zip(b["generate_s"], b["prefill_s"])]


def _paired_fractions(row, weight_bytes, round_bandwidths) -> list:
    """Per batch-1 round: decode tokens/s over that round's bandwidth bound."""
    return [decode / (bw / weight_bytes)
            for decode, bw in zip(_round_decodes(row), round_bandwidths or []) if decode]


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--only", help="Comma-separated case ids or globs/prefixes: "
                   + ", ".join(c[0] for c in CASES) + " (e.g. 'gk', 'kh-jax,hf-eager'). "
                   "Default: all but " + ", ".join(DEFAULT_OFF) + ".")
    p.add_argument("--quick", action="store_true",
                   help="32 new tokens, batch 1 only, 3 runs: a smoke run (~5 min).")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=None, help="Default 128 (32 with --quick).")
    p.add_argument("--batch-sizes", default=None,
                   help="Comma-separated batch sizes (default '1,8'; '1' with --quick).")
    p.add_argument("--runs", type=int, default=3, help="Timed rounds per batch size.")
    p.add_argument("--warmups", type=int, default=0,
                   help="Untimed generate calls after the first one (which already warms up).")
    p.add_argument("--no-bandwidth", action="store_true", help="Skip the bandwidth probe.")
    p.add_argument("--cache-dir", type=pathlib.Path, default=DEFAULT_CACHE,
                   help="Where the random checkpoint is built once (git-ignored).")
    common.add_report_args(
        p, "Markdown file (default bench/results/generate_speed.md; generate_speed_quick.md "
        "with --quick).", json_help="Also save the raw per-run timings as JSON here.",
        from_json_help="Re-render the table from a --json file of an earlier run (no "
        "measuring; pass the same --quick / --new-tokens / --batch-sizes).")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal
    common.add_checkpoint_args(p)
    args = p.parse_args(argv)
    if args.new_tokens is None:
        args.new_tokens = 32 if args.quick else 128
    args.batch_sizes = [int(b) for b in
                        (args.batch_sizes or ("1" if args.quick else "1,8")).split(",")]

    if common.make_checkpoint(args, MODEL, embedding_std=EMBEDDING_STD):
        return 0
    if args.worker:
        serve_worker(args.worker, json.loads(args.dir), args.prompt_len, args.new_tokens,
                     args.warmups)
        return 0

    def measure_all():
        cases = select_cases(args.only)
        dirs = ensure_checkpoints(args.cache_dir)
        probes = []

        def probe_bandwidth(batch=None, round_=None):
            if not args.no_bandwidth:
                log("memory bandwidth ...")
                probe = common.probe_bandwidth()
                probes.append({**probe, "after": None if batch is None else [batch, round_]})
                log(f"  {common.fastest(probe) / 1e9:.1f} GB/s")

        probe_bandwidth()
        rows = measure(cases, dirs, args, after_round=probe_bandwidth)
        probe_bandwidth()  # the machine is shared: the bound takes the best of all probes
        bandwidth = None
        if probes:
            bandwidth = {k: max(b[k] for b in probes) for k in common.BANDWIDTH_KEYS}
            bandwidth.update(bytes=probes[0]["bytes"], probes=len(probes),
                             batch1_rounds=_round_bandwidths(probes))
        check_tokens(rows, log)
        return {"bandwidth": bandwidth, "rows": rows,
                "args_line": common.args_line(__file__, argv)}

    output = args.output or (DEFAULT_OUTPUT if not args.quick
                             else DEFAULT_OUTPUT.with_name("generate_speed_quick.md"))
    return common.report(output, measure_all,
                         lambda raw: render(raw["rows"], raw["bandwidth"], args,
                                            raw["args_line"]),
                         json_path=args.json, from_json=args.from_json)


if __name__ == "__main__":
    sys.exit(main())
