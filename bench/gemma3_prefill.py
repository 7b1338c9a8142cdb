"""Gemma 3 prefill of a long prompt and the KV cache it leaves: gemma_keras vs transformers, CPU.

    python bench/gemma3_prefill.py                              # 4096 tokens, float32 (~45 min)
    python bench/gemma3_prefill.py --formats float32,bfloat16   # both formats (longer)
    python bench/gemma3_prefill.py --model gemma3-tiny --prompt-len 256 --runs 1 \\
        --only gk-jax,hf --output /tmp/gemma3_prefill.md        # a smoke run

Case ids: gk-<backend>-<format> (gemma_keras on a Keras backend) and hf-<format>
(transformers); `--only` takes comma-separated globs or prefixes of them.

What it does:
  1. The model: `--model` (default gemma3-1b: Gemma 3 1B's text model, 26 layers, 22 of them
     sliding-window layers with a 512-token window and 4 global; gemma3-tiny for smoke runs),
     random weights, the checkpoint of bench/_common.py MODELS (built once under
     bench/.cache/models/ and shared with generate_speed.py and load_memory.py).
  2. One batch-1 prompt of `--prompt-len` random tokens (default 4096, <bos> first). Prefill,
     per library:
       gemma_keras   `GenerationSession(lm, [prompt], P + N)`, what `generate` runs before
                     its first decode step (the same compiled prefill function and cache
                     size, N = --new-tokens columns of room, default 1), + argmax of the
                     last logits;
       transformers  `Gemma3ForCausalLM.generate(max_new_tokens=1)` (its prefill forward,
                     sdpa, into its default DynamicCache, + the argmax), under
                     `torch.inference_mode`.
  3. Each case runs in its own process: load, first prefill (timed: compilation / tracing
     included; also the warm-up), then `--runs` rounds in which every live case in turn times
     one prefill, the order rotating each round, so this machine's drift (20-30% over
     minutes) falls on every case alike. Memory: a 1B process holds ~5 GiB in float32 plus
     the prefill's activations, so for gemma3-1b `--groups auto` runs one gemma_keras backend
     at a time per format, each beside the transformers case of that format, which stays
     alive through those groups and takes part in every one of their rounds (2 processes,
     ~10-12 GiB, alive at a time); small models run all alive together.
  4. After the first prefill, each case reports the KV cache it then holds, split into the
     sliding-window ("local") and global layers: *tensors* = the bytes of the key and value
     tensors' shapes; *held* = the bytes of the memory behind them, each buffer once (a
     PyTorch slice of a bigger tensor keeps all of it alive). gemma_keras: the session's
     cache arrays (gemma_keras/layers/kv_cache.py: a local layer keeps a ring of `window`
     slots, a global layer one slot per column of the session, bucketed to 128 columns; the
     int32 position arrays are left out). transformers: its DynamicCache's layers' `keys` /
     `values` (transformers 5 keeps the last window - 1 tokens of a sliding layer as a view
     of the prefill's full-length tensor). Also the next token (argmax), checked against
     transformers in the same format.
  5. Prints a markdown table with ratios to transformers and writes it to
     bench/results/gemma3_prefill.md (gemma3_prefill_<model>.md for other models).
No timing is asserted anywhere; the numbers are reported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import time
from typing import NamedTuple

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as common  # noqa: E402
from _common import log  # noqa: E402

DEFAULT_OUTPUT = common.RESULTS / "gemma3_prefill.md"
DEFAULT_MODEL = "gemma3-1b"
FORMATS = ("float32", "bfloat16")
CASE_TIMEOUT_S = 1800  # a 4096-token prefill of the 1B model takes minutes on 2 cores
_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4}


class Case(NamedTuple):
    id: str
    library: str  # "gemma_keras" or "transformers"
    backend: str | None  # the Keras backend, None for transformers
    format: str


def all_cases(formats=FORMATS) -> list:
    cases = []
    for fmt in formats:
        cases += [Case(f"gk-{b}-{fmt}", "gemma_keras", b, fmt) for b in common.BACKENDS]
        cases.append(Case(f"hf-{fmt}", "transformers", None, fmt))
    return cases


# ---- inside the worker subprocesses ------------------------------------------------------
def _prompt(length: int, vocab: int):
    """One random prompt (fixed seed) starting with <bos> (id 2): [1, length] int32."""
    import numpy as np

    ids = np.random.default_rng(1234).integers(3, vocab, size=(1, length)).astype("int32")
    ids[:, 0] = 2
    return ids


def _tensor_bytes(tensors) -> tuple:
    """(bytes of the tensors' shapes, bytes of the buffers behind them, each counted once).
    A PyTorch tensor may be a view: its storage is what it keeps alive. JAX / TensorFlow /
    NumPy arrays here own their buffers."""
    logical, held, seen = 0, 0, set()
    for t in tensors:
        if type(t).__module__.startswith("torch"):
            logical += t.numel() * t.element_size()
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                held += storage.nbytes()
            continue
        dtype = getattr(t.dtype, "name", None) or str(t.dtype)
        size = math.prod(int(d) for d in t.shape) * _BYTES[dtype.replace("torch.", "")]
        logical += size
        if id(t) not in seen:
            seen.add(id(t))
            held += size
    return logical, held


def _kinds(parts: dict) -> dict:
    """{kind: {layers, slots, tensors, held}} from {kind: (slots per layer, [tensors])}."""
    out = {}
    for kind, (layers, slots, tensors) in parts.items():
        logical, held = _tensor_bytes(tensors)
        out[kind] = {"layers": layers, "slots": slots, "tensors": logical, "held": held}
    return out


def _setup(case: Case, dirs: dict, model, prompt_len: int, new_tokens: int):
    """Loads the model; returns (prefill(ids) -> (next token, state holding the cache),
    cache(state) -> `_kinds`, parameter count, weight bytes)."""
    import numpy as np

    if case.library == "transformers":
        import torch

        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[case.format]
        hf = model.hf_class().from_pretrained(dirs["hf"], dtype=dtype)
        hf.eval()
        config = hf.generation_config
        config.eos_token_id, config.pad_token_id, config.do_sample = None, 0, False

        def prefill(ids):
            ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
            with torch.inference_mode():
                out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=1, min_new_tokens=1, generation_config=config,
                                  return_dict_in_generate=True)
            return int(out.sequences[0, -1]), out

        def cache(out):
            held = getattr(out, "cache", None) or out.past_key_values
            parts = {}
            for layer in held.layers:
                kind = "local" if getattr(layer, "is_sliding", False) else "global"
                layers, slots, tensors = parts.get(kind, (0, 0, []))
                parts[kind] = (layers + 1, max(slots, int(layer.keys.shape[-2])),
                               tensors + [layer.keys, layer.values])
            return _kinds(parts)

        params = sum(p.numel() for p in hf.parameters())
        weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
        return prefill, cache, params, weight_bytes

    import keras

    common.start_backend()
    import gemma_keras as gk
    from gemma_keras.generation.session import GenerationSession

    lm = gk.GemmaCausalLM.from_preset(str(dirs["hf"]), dtype=case.format)

    def prefill(ids):
        session = GenerationSession(lm, [list(row) for row in ids], prompt_len + new_tokens)
        return int(np.argmax(np.asarray(session.logits)[0])), session

    def cache(session):
        return _kinds({kind: (len(part["kv"]), int(part["positions"].shape[1]),
                              [t for pair in part["kv"] for t in pair])
                       for kind, part in session.cache.items()})

    weight_bytes = sum(math.prod(v.shape) * _BYTES[keras.backend.standardize_dtype(v.dtype)]
                       for v in lm.backbone.weights)
    return prefill, cache, lm.backbone.count_params(), weight_bytes


def serve_worker(case: Case, dirs: dict, model, prompt_len: int, new_tokens: int):
    """One case, loaded once, answering: load, first (the first prefill, timed, with the
    cache it leaves and the next token), round (one timed prefill)."""
    import gc

    start = time.perf_counter()
    prefill, cache, params, weight_bytes = _setup(case, dirs, model, prompt_len, new_tokens)
    loaded = {"load_s": time.perf_counter() - start, "params": int(params),
              "weight_bytes": int(weight_bytes), "rss": common.proc_status().get("VmRSS")}
    ids = _prompt(prompt_len, model.hf["vocab_size"])
    first = {}

    def handle(request):
        if request["cmd"] == "load":
            return loaded
        gc.collect()  # the previous prefill's cache, before this one allocates its own
        if request["cmd"] == "first":  # its peak, not the load's
            before = common.proc_status().get("VmRSS")
            reset = common.reset_peak()
        seconds, (token, state) = common.timed(prefill, ids, collect=True)
        if request["cmd"] == "first":
            first["token"] = token
            status = common.proc_status()
            return {"first_s": seconds, "token": token, "cache": cache(state),
                    "rss_before": before, "rss": status.get("VmRSS"),
                    "rss_peak": status.get("VmHWM") if reset else None}
        return {"seconds": seconds, "same": token == first["token"]}

    common.serve(handle)


# ---- the driver ---------------------------------------------------------------------------
def plan_groups(cases, how: str, model) -> list:
    """Groups of cases alive together, one after another (`common.live_groups`): 'none' all
    at once; 'backend' one gemma_keras backend per format at a time, beside that format's
    transformers case; 'auto' = 'backend' for a model too big for more (`BenchModel.big`)."""
    if how == "auto":
        how = "backend" if model.big() else "none"
    if how == "none":
        return [list(cases)]
    return common.live_groups(cases, lambda c: (c.format, c.backend))


def measure(cases, dirs, args) -> dict:
    rows = {c.id: {"case": c.id, "library": c.library, "backend": c.backend or "torch",
                   "format": c.format, "seconds": [], "rounds": [], "deterministic": True}
            for c in cases}

    def failed(case_id, error):
        log(f"  {case_id} FAILED: {str(error)[-2000:]}")
        rows[case_id]["error"] = common.error_line(str(error))

    workers = common.Workers(on_error=failed, timeout=args.timeout)
    groups = plan_groups(cases, args.groups, args.bench_model)
    shared = [c.id for c in cases if sum(c in g for g in groups) > 1]
    if len(groups) > 1:
        log(f"{len(groups)} groups, one after another: "
            + "; ".join(", ".join(c.id for c in g) for g in groups))
    started, number = set(), 0
    try:
        for index, group in enumerate(groups):
            for case in group:
                if case.id in started:
                    continue
                started.add(case.id)
                log(f"{case.id}: loading ...")
                loaded = workers.start(
                    case.id, [__file__, "--worker", json.dumps(case._asdict()), "--dir",
                              json.dumps(dirs), "--model", args.model, "--prompt-len",
                              str(args.prompt_len), "--new-tokens", str(args.new_tokens)],
                    {"KERAS_BACKEND": case.backend} if case.backend else {}, {"cmd": "load"})
                if not loaded:
                    continue
                rows[case.id].update(loaded)
                log(f"  loaded in {loaded['load_s']:.1f} s; RSS {common.mib(loaded['rss'])} "
                    "MiB")
                log(f"{case.id}: first prefill ...")
                first = workers.ask(case.id, {"cmd": "first"})
                if first:
                    rows[case.id].update(first)
                    log(f"  {first['first_s']:.1f} s; KV cache " + ", ".join(
                        f"{k} {v['layers']} x {v['slots']} slots {common.mib(v['held'])} MiB "
                        "held" for k, v in first["cache"].items()))
            for round_, order in workers.rounds([c.id for c in group], args.runs):
                log(f"group {index + 1}/{len(groups)}, round {round_ + 1}/{args.runs}: "
                    + ", ".join(order))
                for case_id in order:
                    got = workers.ask(case_id, {"cmd": "round"}, settle_s=0.3)
                    if got:
                        rows[case_id]["seconds"].append(got["seconds"])
                        rows[case_id]["rounds"].append(number)
                        rows[case_id]["deterministic"] &= got["same"]
                        log(f"  {case_id}: {got['seconds']:.2f} s")
                number += 1
            following = groups[index + 1] if index + 1 < len(groups) else []
            for case in group:
                if case not in following:
                    workers.stop(case.id)
    finally:
        workers.close()
    return {"rows": list(rows.values()), "shared": shared,
            "groups": [[c.id for c in g] for g in groups]}


# ---- the report ---------------------------------------------------------------------------
def _best(row):
    return min(row["seconds"]) if row.get("seconds") else None


def _paired(mine, theirs) -> list:
    """theirs / mine of the prefill time, round by round (the rounds both ran in)."""
    a = dict(zip(mine.get("rounds", []), mine.get("seconds", [])))
    b = dict(zip(theirs.get("rounds", []), theirs.get("seconds", [])))
    return [b[n] / a[n] for n in a if n in b and a[n]]


def _kv(row, kind, key):
    return (row.get("cache") or {}).get(kind, {}).get(key)


def _total(row, key):
    cache = row.get("cache")
    return sum(v[key] for v in cache.values()) if cache else None


def _slots(row, kind) -> str:
    part = (row.get("cache") or {}).get(kind)
    return f"{part['layers']} x {part['slots']}" if part else "-"


def render(raw) -> str:
    model = common.MODELS[raw["model"]]
    rows, P, N = raw["rows"], raw["prompt_len"], raw["new_tokens"]
    m = model.hf
    kinds = model.layer_kinds()
    fmt = common.fmt
    refs = {r["format"]: r for r in rows if r["library"] == "transformers" and "token" in r}
    lines = [
        f"# Gemma 3 prefill of a {P}-token prompt and its KV cache: gemma_keras vs "
        "transformers (CPU)",
        "",
        f"{model.description(next((r['params'] for r in rows if 'params' in r), None))} "
        f"Batch 1, one random prompt of {P} tokens; gemma_keras's session has room for {N} "
        "more column(s).",
        "",
        "*Prefill*: gemma_keras `GenerationSession(lm, [prompt], P + N)` (what `generate` runs "
        "before its first decode step) + argmax; transformers `generate(max_new_tokens=1)` "
        "(sdpa, its default DynamicCache) under `torch.inference_mode`. Each case runs in its "
        f"own process: load, a first prefill (timed, compilation included; also the warm-up), "
        f"then {raw['runs']} rounds in which each live case in turn times one prefill, the "
        "order rotating" + (f"; in {len(raw['groups'])} groups one after another for memory "
                            "(" + "; ".join(", ".join(g) for g in raw["groups"]) + "), "
                            + ", ".join(raw["shared"]) + " alive through all groups of its "
                            "format and timed in every one of their rounds"
                            if len(raw["groups"]) > 1 else ", all alive together") + ". "
        "**Best** of the rounds, median in parentheses; *paired* = the median over the rounds "
        "both ran in of that round's ratio.",
        "",
        "*KV cache* after the prefill, keys and values of every layer: *tensors* = the bytes "
        "of their shapes, *held* = the bytes of the buffers behind them, each once (a PyTorch "
        "slice keeps its whole storage alive). *Slots*: layers x positions per layer. "
        "gemma_keras keeps a ring of `window` slots in each sliding-window (local) layer and "
        "one slot per session column (bucketed to 128) in each global layer "
        "(gemma_keras/layers/kv_cache.py); transformers 5 keeps the last window - 1 tokens "
        "of a sliding layer, as a view of the prefill's full-length tensor, and all tokens of "
        f"a global one. Window {m['sliding_window']}; {kinds.count('local')} local and "
        f"{kinds.count('global')} global layers; {m['num_key_value_heads']} kv head(s) x "
        f"head_dim {m['head_dim']}. *RSS peak - before*: the process' resident memory at its "
        "highest during the first prefill (compilation included) minus just before it: the "
        "prefill's working memory, its cache included.",
        "",
    ]
    columns = ["implementation", "backend", "format", "prefill (s)", "prompt tokens/s",
               "first call (s)", "KV tensors (MiB)", "KV held (MiB)", "local: slots",
               "local held (MiB)", "global: slots", "global held (MiB)",
               "first prefill: RSS peak - before (MiB)", "next token"]
    lines += common.table_head(columns, "lll" + "r" * 10 + "l")
    for r in rows:
        head = ["gemma_keras" if r["library"] == "gemma_keras" else "transformers",
                r["backend"], r["format"]]
        if "error" in r and not r.get("seconds"):
            lines.append(common.failed_row(head, r["error"], len(columns)))
            continue
        best = _best(r)
        median = statistics.median(r["seconds"]) if r["seconds"] else None
        ref = refs.get(r["format"])
        token = ("-" if "token" not in r else "reference" if r is ref else
                 "same" if ref and ref["token"] == r["token"] else
                 f"differs ({r['token']} vs {ref['token']})" if ref else str(r["token"]))
        if not r.get("deterministic", True):
            token += "; changed between rounds"
        lines.append(common.table_row(head + [
            f"**{fmt(best, 2)}** ({fmt(median, 2)})", fmt(P / best if best else None, 0),
            fmt(r.get("first_s")), _mib(_total(r, "tensors")), _mib(_total(r, "held")),
            _slots(r, "local"), _mib(_kv(r, "local", "held")), _slots(r, "global"),
            _mib(_kv(r, "global", "held")),
            common.mib(r["rss_peak"] - r["rss_before"]) if r.get("rss_peak") else "-",
            token]))
    lines += _ratio_lines(rows, refs)
    width = {f: _BYTES[f] for f in {r["format"] for r in rows}}
    no_ring = {f: m["num_hidden_layers"] * 2 * P * m["num_key_value_heads"] * m["head_dim"] * b
               for f, b in width.items()}
    lines += ["", "For scale: with no ring (every layer one slot per prompt token, keras-hub's "
              "Gemma 3 layout), the prompt's keys and values would take "
              + ", ".join(f"{_mib(b)} MiB in {f}" for f, b in sorted(no_ring.items()))
              + "."]
    return "\n".join(lines + common.closing_lines(raw))


def _mib(n) -> str:
    return "-" if n is None else f"{n / common.MIB:,.1f}"


def _ratio_lines(rows, refs) -> list:
    out = []
    for r in rows:
        ref = refs.get(r["format"])
        if r["library"] != "gemma_keras" or not ref or not r.get("seconds") \
                or not ref.get("seconds"):
            continue
        paired = _paired(r, ref)
        out.append(common.table_row(
            [r["backend"], r["format"], common.ratio(_best(ref), _best(r)),
             f"{statistics.median(paired):.2f}x" if paired else "-",
             common.ratio(ref.get("first_s"), r.get("first_s")),
             common.ratio(_total(ref, "held"), _total(r, "held")),
             common.ratio(_total(ref, "tensors"), _total(r, "tensors"))]))
    if not out:
        return []
    return ["", "gemma_keras against transformers in the same format (transformers / "
            "gemma_keras: higher means gemma_keras is faster or holds less).", ""] \
        + common.table_head(["gemma_keras", "format", "prefill (best)",
                             "prefill, paired rounds (median)", "first call", "KV held",
                             "KV tensors"], "ll" + "r" * 5) + out


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--model", choices=sorted(common.MODELS), default=DEFAULT_MODEL,
                   help=f"Which Gemma 3 shape (default {DEFAULT_MODEL}; gemma3-tiny for a "
                   "smoke run).")
    p.add_argument("--only", help="Comma-separated case ids or globs / prefixes, e.g. "
                   "'gk-jax,hf'; ids: " + ", ".join(c.id for c in all_cases()) + ".")
    p.add_argument("--formats", default="float32",
                   help="Comma-separated: float32, bfloat16 (default float32).")
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=1,
                   help="Columns of room gemma_keras's session gets beyond the prompt "
                   "(default 1, as transformers' max_new_tokens=1).")
    p.add_argument("--runs", type=int, default=3, help="Timed rounds (default 3).")
    p.add_argument("--groups", choices=("auto", "none", "backend"), default="auto",
                   help="'backend': one gemma_keras backend per format alive at a time, beside "
                   "that format's transformers case; 'none': all alive; 'auto' (default): "
                   "'backend' for gemma3-1b (~5 GiB per float32 process), else 'none'.")
    p.add_argument("--timeout", type=float, default=CASE_TIMEOUT_S,
                   help=f"Seconds a case may take to load or answer one request (default "
                   f"{CASE_TIMEOUT_S}); one that takes longer is reported as failed.")
    common.add_report_args(
        p, "Markdown file (default bench/results/gemma3_prefill.md; "
        "gemma3_prefill_<model>.md for a model other than gemma3-1b).",
        json_help="Also save the raw results as JSON here.",
        from_json_help="Re-render the report from a --json file of an earlier run.")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: the case, as JSON
    p.add_argument("--dir", help=argparse.SUPPRESS)  # internal: the checkpoints, as JSON
    args = p.parse_args(argv)
    args.bench_model = common.MODELS[args.model]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not formats or any(f not in FORMATS for f in formats):
        raise SystemExit(f"--formats takes {','.join(FORMATS)}")

    if args.worker:
        serve_worker(Case(**json.loads(args.worker)), json.loads(args.dir), args.bench_model,
                     args.prompt_len, args.new_tokens)
        return 0

    def measure_all():
        cases = all_cases([f for f in FORMATS if f in formats])
        if args.only:
            chosen = common.pick([c.id for c in cases], args.only, prefixes=True)
            cases = [c for c in cases if c.id in chosen]
        dirs = common.model_checkpoints(args.bench_model)
        out = measure(cases, dirs, args)
        for row in out["rows"]:
            if row["library"] == "transformers" and "token" in row:
                for other in out["rows"]:
                    if other["format"] == row["format"] and other.get("token", row["token"]) \
                            != row["token"]:
                        log(f"WARNING: {other['case']}'s next token {other['token']} differs "
                            f"from {row['case']}'s {row['token']}")
        return {**out, "model": args.model, "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens, "runs": args.runs,
                "load_average": os.getloadavg()[0],
                "args_line": common.args_line(__file__, argv)}

    output = args.output or (DEFAULT_OUTPUT if args.model == DEFAULT_MODEL else
                             DEFAULT_OUTPUT.with_name(f"gemma3_prefill_{args.model}.md"))
    return common.report(output, measure_all, render, json_path=args.json,
                         from_json=args.from_json)


if __name__ == "__main__":
    sys.exit(main())
