"""Peak memory and wall time of loading a Gemma checkpoint: gemma_keras vs keras-hub vs HF.

    python bench/load_memory.py                     # all backends, ~150M-parameter model
    python bench/load_memory.py --backend jax       # one backend
    python bench/load_memory.py --size small        # ~12M parameters, a quick smoke run

What it does:
  1. Once, caches a Gemma-shaped checkpoint with random weights under bench/.cache/: a Hugging
     Face `GemmaForCausalLM` saved as sharded safetensors, and the same weights written as a
     keras-hub preset by gemma_keras' `save_to_preset`.
  2. Runs every measurement in a fresh subprocess, so peaks never mix. Inside it: import the
     libraries, initialise the backend, record the resident set size (the baseline), reset
     the kernel's high-water mark (`/proc/self/clear_refs`), load, then read the high-water
     mark (VmHWM). "Load cost" = peak - baseline: what the load itself needed at its worst
     moment. It includes the loaded model, so an ideal loader costs 1.0x the model's size.
  3. Prints a markdown table and writes it to bench/results/load_memory.md.

Resident memory counts file pages a process has mapped and touched (mmap'd safetensors), as
well as anonymous memory; a loader that mmaps pays for both while both are resident. The
"anon" column (sampled every few ms, so approximate) separates the two.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as common  # noqa: E402
from _common import log, mib as _mib  # noqa: E402

DEFAULT_CACHE = common.CACHE / "load_memory"
DEFAULT_OUTPUT = common.RESULTS / "load_memory.md"

# Hugging Face GemmaConfig fields. "default" is ~153M parameters (~610 MB in float32).
SIZES = {
    "default": dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=1, head_dim=128,
                    intermediate_size=4096),
    "small": dict(vocab_size=8192, hidden_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=128,
                  intermediate_size=2048),
}

# (case id, human label, needs a keras backend, checkpoint, dtype)
CASES = [
    ("baseline", "(a) baseline: imports + backend init", True, None, None),
    ("gk_hf_f32", "(b) gemma_keras `from_preset` HF safetensors", True, "hf", "float32"),
    ("gk_hf_bf16", "(c) gemma_keras `from_preset` HF safetensors", True, "hf", "bfloat16"),
    ("gk_kh_f32", "(d) gemma_keras `from_preset` keras-hub preset", True, "keras_hub",
     "float32"),
    ("kh_kh_f32", "(e) keras-hub `GemmaCausalLM.from_preset`", True, "keras_hub", "float32"),
    ("hf_hf_f32", "(f) transformers `from_pretrained`", False, "hf", "float32"),
]


# ---- memory probes (used inside the worker subprocesses) ----------------------------------


class Sampler(threading.Thread):
    """Samples RSS / anon / file RSS every `interval` s; keeps the maxima and a timeline."""

    def __init__(self, interval=0.005):
        super().__init__(daemon=True)
        self.interval = interval
        self.timeline = []
        self._stop_event = threading.Event()
        self.t0 = time.perf_counter()

    def run(self):
        while not self._stop_event.is_set():
            s = common.proc_status()
            self.timeline.append((time.perf_counter() - self.t0, s["VmRSS"], s["RssAnon"],
                                  s["RssFile"]))
            time.sleep(self.interval)

    def stop(self):
        self._stop_event.set()
        self.join()
        return self

    def peak(self, column):
        return max((row[column] for row in self.timeline), default=0)


# ---- the worker: one measurement in a fresh process --------------------------------------
def _bytes_per_param(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def _mean_abs(array) -> float:
    import numpy as np
    return float(np.abs(np.asarray(array, dtype=np.float32)).mean())


def _touch(model):
    """Reads every weight once (a reduction: no copy), as using the model would."""
    import keras

    for variable in model.weights:
        # The scalar is cast: TF cannot hand numpy a bfloat16 scalar (keras 3.15).
        keras.ops.convert_to_numpy(keras.ops.cast(keras.ops.sum(variable), "float32"))


def _import(case: str):
    """Imports what `case` needs and initialises the backend; returns the load function."""
    if case == "hf_hf_f32":
        import torch
        import transformers

        torch.zeros(1)

        def load(directory, dtype):
            model = transformers.GemmaForCausalLM.from_pretrained(
                directory, dtype=getattr(torch, dtype))
            return model

        def describe(model):
            with torch.no_grad():  # reads every weight, so lazily mapped pages are resident
                for p in model.parameters():
                    p.sum()
            count = sum(p.numel() for p in model.parameters())
            inner = model.model
            return count, [_mean_abs(inner.embed_tokens.weight.detach().float().numpy()),
                           _mean_abs(inner.layers[-1].mlp.down_proj.weight.detach()
                                     .float().numpy())]
        return load, describe

    common.start_backend()
    if case.startswith("kh_"):
        import keras_hub

        def load(directory, dtype):
            return keras_hub.models.GemmaCausalLM.from_preset(
                str(directory), preprocessor=None, dtype=dtype)

        return load, lambda lm: _describe(lm, lambda block: block.ffw_linear)

    import gemma_keras as gk

    def load(directory, dtype):
        return gk.GemmaCausalLM.from_preset(str(directory), dtype=dtype)

    return load, lambda lm: _describe(lm, lambda block: block.ffw.linear)


def _describe(lm, ffw_linear):
    """Parameter count and two weight checksums, after reading every weight once."""
    import keras

    backbone = lm.backbone
    _touch(backbone)
    return backbone.count_params(), [
        _mean_abs(keras.ops.convert_to_numpy(backbone.token_embedding.embeddings)),
        _mean_abs(keras.ops.convert_to_numpy(ffw_linear(backbone.transformer_layers[-1]).kernel))]


def worker(case: str, directory: str, dtype: str, trace: str = None) -> dict:
    import gc

    load, describe = _import(case)
    gc.collect()
    before = common.proc_status()
    import_peak = before["VmHWM"]
    result = {"case": case, "baseline": before["VmRSS"], "import_peak": import_peak,
              "baseline_anon": before["RssAnon"]}
    if case == "baseline":
        return result
    reset = common.reset_peak()
    sampler = Sampler()
    sampler.start()
    start = time.perf_counter()
    model = load(directory, dtype)
    seconds = time.perf_counter() - start
    sampler.stop()
    after = common.proc_status()
    gc.collect()
    settled = common.proc_status()
    count, checksums = describe(model)
    gc.collect()
    in_use = common.proc_status()
    result.update(
        seconds=seconds,
        peak=after["VmHWM"] if reset else max(after["VmHWM"], sampler.peak(1)),
        peak_is_exact=reset,
        peak_anon_sampled=sampler.peak(2),
        peak_file_sampled=sampler.peak(3),
        retained=settled["VmRSS"],
        in_use=in_use["VmRSS"],
        in_use_file=in_use["RssFile"] - before["RssFile"],
        params=int(count),
        model_bytes=int(count) * _bytes_per_param(dtype),
        checksums=checksums,
    )
    if trace:
        with open(trace, "w") as f:
            json.dump({"case": case, "baseline": before["VmRSS"],
                       "timeline": sampler.timeline}, f)
    return result


def ensure_checkpoints(cache: pathlib.Path, size: str) -> dict:
    """{'hf': dir, 'keras_hub': dir}, built on the first run and reused afterwards."""
    return common.ensure_checkpoints(cache / size, json.dumps(SIZES[size], sort_keys=True),
                                     __file__, ["--size", size])


# ---- the driver -------------------------------------------------------------------------
def measure(case, backend, directory, dtype, trace_dir=None) -> dict:
    """The case's results, or {"error": ...} (`common.run_case`)."""
    argv = [__file__, "--worker", case, "--dir", str(directory or ""), "--dtype", dtype or ""]
    if trace_dir:
        argv += ["--trace-file", str(trace_dir / f"{case}_{backend or 'torch'}.json")]
    return common.run_case(argv, env={"KERAS_BACKEND": backend} if backend else {})


def render(rows, size, args_line) -> str:

    params = next((r["params"] for r in rows if "params" in r), None)
    cfg = SIZES[size]
    lines = [
        "# Checkpoint load: peak memory and time",
        "",
        f"Model: Gemma-shaped, random weights, {params:,} parameters "
        f"(vocab {cfg['vocab_size']}, hidden {cfg['hidden_size']}, "
        f"{cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} heads / "
        f"{cfg['num_key_value_heads']} kv head, head_dim {cfg['head_dim']}, "
        f"FFN {cfg['intermediate_size']}); HF checkpoint as safetensors shards of <= 200 MB, "
        "keras-hub preset as one `model.weights.h5`." if params else "",
        "",
        "Each row is a fresh process. *Baseline* = RSS after imports and backend start-up. "
        "*Peak cost* = the kernel's high-water mark of RSS during the load (VmHWM, reset after "
        "the baseline) minus the baseline: it includes the loaded model itself, so an ideal "
        "loader scores 1.0x the model's size (parameters x bytes per parameter). *Anon* = the "
        "same for anonymous memory only (sampled every 5 ms, so approximate; it leaves out "
        "mmap'd file pages). *Kept* = RSS minus baseline right after the load; *in use* = the "
        "same after reading every weight once (a lazily mmap'd checkpoint becomes resident "
        "then). MiB = 2^20 bytes.",
        "",
    ]
    columns = ["loader", "backend", "dtype", "model (MiB)", "baseline RSS (MiB)",
               "peak cost (MiB)", "peak cost / model", "anon / model", "kept (MiB)",
               "in use (MiB)", "load time (s)"]
    lines += common.table_head(columns, "lll" + "r" * 8)
    for r in rows:
        if r.get("error"):
            lines.append(common.failed_row([r["label"], r["backend"], r["dtype"] or ""],
                                           r["error"], len(columns)))
        elif r["case"] == "baseline":
            lines.append(common.table_row(
                [r["label"], r["backend"], "", "", f"{_mib(r['baseline'])} (import peak "
                 f"{_mib(r['import_peak'])})"] + [""] * 6))
        else:
            cost = r["peak"] - r["baseline"]
            anon = r["peak_anon_sampled"] - r["baseline_anon"]
            lines.append(
                f"| {r['label']} | {r['backend']} | {r['dtype']} | {_mib(r['model_bytes'])} | "
                f"{_mib(r['baseline'])} | {_mib(cost)} | **{cost / r['model_bytes']:.2f}x** | "
                f"{anon / r['model_bytes']:.2f}x | {_mib(r['retained'] - r['baseline'])} | "
                f"{_mib(r['in_use'] - r['baseline'])} | {r['seconds']:.1f} |")
    lines += [
        "",
    ] + common.machine_lines(args_line)
    return "\n".join(lines)


def check_weights(rows, log):
    """Every load must give the same weights (bfloat16 within rounding): else say so."""
    ref = next((r["checksums"] for r in rows if r.get("case") == "hf_hf_f32"), None)
    ref = ref or next((r["checksums"] for r in rows if "checksums" in r), None)
    ok = True
    for r in rows:
        for got, want in zip(r.get("checksums", []), ref or []):
            tol = 1e-2 if r["dtype"] == "bfloat16" else 1e-5
            if abs(got - want) > tol * abs(want):
                log(f"WARNING: {r['label']} on {r['backend']} loaded different weights "
                    f"(mean |w| {got:.6g} vs {want:.6g})")
                ok = False
    return ok


def main(argv=None):
    p = common.parser(__doc__)
    common.add_backend_arg(p)
    p.add_argument("--size", choices=sorted(SIZES), default="default",
                   help="'default' ~153M params (~610 MB f32); 'small' ~12M for a smoke run.")
    p.add_argument("--cache-dir", type=pathlib.Path, default=DEFAULT_CACHE,
                   help="Where the random checkpoints are built once (git-ignored).")
    common.add_report_args(
        p, "Markdown file for the table (default: bench/results/load_memory.md for the "
        "default size, load_memory_small.md for --size small).")
    p.add_argument("--no-hf", action="store_true", help="Skip the transformers row.")
    p.add_argument("--trace", action="store_true",
                   help="Also save each load's RSS timeline (JSON) next to the checkpoints.")
    # Internal: one measurement / one checkpoint build in this process.
    p.add_argument("--worker", help=argparse.SUPPRESS)
    common.add_checkpoint_args(p)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--trace-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        common.reply(worker(args.worker, args.dir, args.dtype, args.trace_file))
        return 0
    if common.make_checkpoint(args, SIZES[args.size], max_shard_size="200MB"):
        return 0

    def measure_all():
        dirs = ensure_checkpoints(args.cache_dir, args.size)
        trace_dir = args.cache_dir / args.size / "traces" if args.trace else None
        if trace_dir:
            trace_dir.mkdir(parents=True, exist_ok=True)
        backends = common.backends(args)
        plan = [(case, label, b, ckpt, dtype)
                for b in backends for case, label, keras_case, ckpt, dtype in CASES if keras_case]
        if not args.no_hf:
            plan += [(case, label, None, ckpt, dtype)
                     for case, label, keras_case, ckpt, dtype in CASES if not keras_case]
        rows = []
        for case, label, backend, ckpt, dtype in plan:
            shown = backend or "torch (HF)"
            log(f"{label} [{shown}{', ' + dtype if dtype else ''}] ...")
            r = measure(case, backend, dirs.get(ckpt), dtype, trace_dir)
            r.update(case=case, label=label, backend=shown, dtype=dtype)
            rows.append(r)
            if "peak" in r:
                log(f"  cost {_mib(r['peak'] - r['baseline'])} MiB = "
                    f"{(r['peak'] - r['baseline']) / r['model_bytes']:.2f}x model, "
                    f"{r['seconds']:.1f} s")
        check_weights(rows, log)
        return {"rows": rows, "args_line": common.args_line(__file__, argv)}

    output = args.output or (DEFAULT_OUTPUT if args.size == "default"
                             else DEFAULT_OUTPUT.with_name(f"load_memory_{args.size}.md"))
    return common.report(output, measure_all,
                         lambda raw: render(raw["rows"], args.size, raw["args_line"]))


if __name__ == "__main__":
    sys.exit(main())
