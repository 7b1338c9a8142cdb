"""Peak memory and wall time of loading a Gemma checkpoint: gemma_keras vs keras-hub vs HF.

    python bench/load_memory.py                     # all backends, ~150M-parameter model
    python bench/load_memory.py --backend jax       # one backend
    python bench/load_memory.py --size small        # ~12M parameters, a quick smoke run
    python bench/load_memory.py --quantize int4,int8 --shape gemma2_2b,gemma2_9b --backend jax
                                                    # quantizing while loading (issue 17)
    python bench/load_memory.py --model gemma3-1b --rounds 2
                                                    # the Gemma 3 1B shape (~1 h)
    python bench/load_memory.py --model gemma3-tiny --backend jax   # its smoke run

What it does:
  1. Once, caches a Gemma-shaped checkpoint with random weights under bench/.cache/: a Hugging
     Face `GemmaForCausalLM` saved as sharded safetensors, and the same weights written as a
     keras-hub preset by gemma_keras' `save_to_preset`.
  2. Runs every measurement in a fresh subprocess, so peaks never mix. Inside it: import the
     libraries, initialise the backend, record the resident set size (the baseline), reset
     the kernel's high-water mark (`/proc/self/clear_refs`), load, then read the high-water
     mark (VmHWM). "Load cost" = peak - baseline: what the load itself needed at its worst
     moment. It includes the loaded model, so an ideal loader costs 1.0x the model's size.
  3. With --rounds N, does all of that N times, the order of the rows rotating each round
     (this machine's speed drifts: a slow minute then falls on every loader alike); a row
     shows the median peak and the best load time (median in parentheses).
  4. Prints a markdown table, the ratios of gemma_keras to keras-hub (loading the same
     keras-hub preset) and to transformers (the same safetensors files), and writes it to
     bench/results/load_memory.md.

--model gemma3-1b / gemma3-tiny measure the Gemma 3 shapes of bench/_common.py MODELS
(checkpoints shared with the other scripts under bench/.cache/models/; --size is then unused)
with keras-hub's `Gemma3CausalLM` and transformers' `Gemma3ForCausalLM`, and every loader in
both float32 and bfloat16 (the default model keeps its rows: keras-hub and transformers in
float32 only). Results: load_memory_<model>.md. One load at a time, so even the 1B model's
float32 loads (~4 GB of weights, peaks up to ~2-3x that) fit in this machine's 24 GiB.

With --quantize, it measures `gk.GemmaCausalLM.from_preset(dir, dtype=..., quantize=...)` on
full-size Gemma 2 shapes instead (--shape): the checkpoint is a Hugging Face one in bfloat16
(the published checkpoints' dtype), written once tensor by tensor with random values (no
model object ever exists whole, so a 9B checkpoint is written on a machine that could not
hold it in float32), and the table compares the peak with the quantized model's own size:
quantizing while loading should cost about the quantized model plus one float tensor (the
embedding table, the largest), never the float model. Results: load_memory_quantized.md.

Resident memory counts file pages a process has mapped and touched (mmap'd safetensors), as
well as anonymous memory; a loader that mmaps pays for both while both are resident. The
"anon" column (sampled every few ms, so approximate) separates the two.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
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
# The Gemma 3 models also load the peers (and our keras-hub reader) in bfloat16.
BFLOAT16_PEERS = [
    ("gk_kh_bf16", "(d) gemma_keras `from_preset` keras-hub preset", True, "keras_hub",
     "bfloat16"),
    ("kh_kh_bf16", "(e) keras-hub `Gemma3CausalLM.from_preset`", True, "keras_hub",
     "bfloat16"),
    ("hf_hf_bf16", "(f) transformers `from_pretrained`", False, "hf", "bfloat16"),
]
# The default model, --size picks its shape; the others are common.MODELS.
MODELS = {"gemma": None, **common.MODELS}


def model_cases(model) -> list:
    """CASES (keras-hub's label naming Gemma3CausalLM for Gemma 3), plus BFLOAT16_PEERS for
    the Gemma 3 models, each dtype's rows together."""
    if model.architecture == "gemma":
        return CASES
    cases = [(c, label.replace("GemmaCausalLM", "Gemma3CausalLM"), *rest)
             for c, label, *rest in CASES] + BFLOAT16_PEERS
    order = ["baseline", "gk_hf_f32", "gk_kh_f32", "kh_kh_f32", "hf_hf_f32",
             "gk_hf_bf16", "gk_kh_bf16", "kh_kh_bf16", "hf_hf_bf16"]
    return sorted(cases, key=lambda c: order.index(c[0]))


def bench_model_of(name: str, size: str) -> common.BenchModel:
    """--model's model; for 'gemma', the Gemma-1-shaped one of --size."""
    if name != "gemma":
        return common.MODELS[name]
    return common.BenchModel("gemma", "gemma", SIZES[size], None,
                             "Gemma-shaped" if size == "default" else f"Gemma-shaped ({size})")


# ---- quantizing while loading (--quantize) -----------------------------------------------
# HF Gemma2Config fields of the real models (DESIGN.md section 2); "tiny" for a smoke run.
SHAPES = {
    "gemma2_2b": dict(vocab_size=256000, hidden_size=2304, num_hidden_layers=26,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                      intermediate_size=9216),
    "gemma2_9b": dict(vocab_size=256000, hidden_size=3584, num_hidden_layers=42,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                      intermediate_size=14336),
    "tiny": dict(vocab_size=4096, hidden_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                 intermediate_size=1024),
}
QUANTIZED_OUTPUT = common.RESULTS / "load_memory_quantized.md"


def _hf_tensors(shape: dict):
    """(name, shape) of a Gemma 2 HF checkpoint, in file order."""
    h, n, k, d, f = (shape["hidden_size"], shape["num_attention_heads"],
                     shape["num_key_value_heads"], shape["head_dim"], shape["intermediate_size"])
    yield "model.embed_tokens.weight", (shape["vocab_size"], h)
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", (n * d, h)
        yield p + "self_attn.k_proj.weight", (k * d, h)
        yield p + "self_attn.v_proj.weight", (k * d, h)
        yield p + "self_attn.o_proj.weight", (h, n * d)
        yield p + "mlp.gate_proj.weight", (f, h)
        yield p + "mlp.up_proj.weight", (f, h)
        yield p + "mlp.down_proj.weight", (h, f)
        for norm in ("input_layernorm", "post_attention_layernorm",
                     "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            yield p + norm + ".weight", (h,)
    yield "model.norm.weight", (h,)


def write_random_hf(directory: pathlib.Path, shape: dict, shard_bytes=2 << 30):
    """A bfloat16 Gemma 2 safetensors checkpoint with random weights, one tensor in memory at
    a time (the file format written by hand: an 8-byte header length, a JSON header, the
    raw little-endian bytes)."""
    import ml_dtypes
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    block = (rng.standard_normal(1 << 22) * 0.02).astype(ml_dtypes.bfloat16)  # 4M values
    tensors = list(_hf_tensors(shape))
    shards, current, size = [], [], 0
    for name, dims in tensors:
        nbytes = 2 * int(np.prod(dims))
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, dims))
        size += nbytes
    shards.append(current)
    weight_map = {}
    for number, shard in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, dims in shard:
            nbytes = 2 * int(np.prod(dims))
            header[name] = {"dtype": "BF16", "shape": list(dims),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(directory / file, "wb") as out:
            out.write(len(raw).to_bytes(8, "little") + raw)
            for t, (name, dims) in enumerate(shard):
                count = int(np.prod(dims))
                if len(dims) == 1:  # norm scales
                    out.write(np.full(count, 0.1 * (t % 5), ml_dtypes.bfloat16).tobytes())
                    continue
                # The block, rotated per tensor and per 4M-value chunk: cheap, varied values.
                for start in range(0, count, block.size):
                    piece = np.roll(block, (start // block.size) * 7919 + t * 104729)
                    out.write(piece[: min(block.size, count - start)].tobytes())
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(2 * int(np.prod(d)) for _, d in tensors)},
         "weight_map": weight_map}, indent=2))
    config = dict(shape, model_type="gemma2", architectures=["Gemma2ForCausalLM"],
                  hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
                  rms_norm_eps=1e-6, rope_theta=10000.0, query_pre_attn_scalar=shape["head_dim"],
                  sliding_window=4096, attn_logit_softcapping=50.0,
                  final_logit_softcapping=30.0, tie_word_embeddings=True, bos_token_id=2,
                  eos_token_id=1, pad_token_id=0, torch_dtype="bfloat16")
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def ensure_quantized_checkpoint(cache: pathlib.Path, shape_name: str) -> pathlib.Path:
    directory = cache / "quantized" / f"{shape_name}_bf16"
    key = json.dumps(SHAPES[shape_name], sort_keys=True)
    stamp = directory / "shape.stamp"
    if not (stamp.is_file() and stamp.read_text() == key):
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
        log(f"writing a random {shape_name} bfloat16 checkpoint under {directory} (once) ...")
        start = time.perf_counter()
        write_random_hf(directory, SHAPES[shape_name])
        stamp.write_text(key)
        log(f"  done in {time.perf_counter() - start:.0f} s")
    return directory


def quantized_bytes(lm) -> int:
    """Bytes of every variable of the loaded model, as stored (int8 / packed int4 / float)."""
    import numpy as np

    return int(sum(np.dtype(v.dtype).itemsize * int(np.prod(v.shape))
                   for v in lm.backbone.weights))


def quantized_worker(directory: str, dtype: str, quantize: str, block_size: int) -> dict:
    import gc

    common.start_backend()
    import gemma_keras as gk

    gc.collect()
    before = common.proc_status()
    reset = common.reset_peak()
    sampler = Sampler(0.02)
    sampler.start()
    start = time.perf_counter()
    lm = gk.GemmaCausalLM.from_preset(directory, dtype=dtype, quantize=quantize or None,
                                      block_size=block_size, load_tokenizer=False)
    seconds = time.perf_counter() - start
    sampler.stop()
    after = common.proc_status()
    config = lm.config
    largest = config.vocabulary_size * config.hidden_dim * _bytes_per_param(dtype)
    return {"baseline": before["VmRSS"],
            "peak": after["VmHWM"] if reset else max(after["VmHWM"], sampler.peak(1)),
            "peak_anon_sampled": sampler.peak(2), "baseline_anon": before["RssAnon"],
            "kept": after["VmRSS"], "seconds": seconds, "model_bytes": quantized_bytes(lm),
            "float_bytes": config.parameter_count() * _bytes_per_param(dtype),
            "largest_tensor_bytes": largest, "params": config.parameter_count()}


def render_quantized(rows, args_line) -> str:
    lines = [
        "# Quantizing while loading: peak memory",
        "",
        "`gk.GemmaCausalLM.from_preset(dir, dtype=..., quantize=...)` on a random Hugging Face "
        "checkpoint in bfloat16 of the real Gemma 2 shapes (written once tensor by tensor by "
        "this script), each row a fresh process. *Peak cost* = the high-water mark of RSS "
        "during the load minus the RSS before it (imports and backend done). *Quantized "
        "model* = the bytes of the loaded model's variables (int8 kernels, packed int4, "
        "scales, float norms); *float model* = the same model unquantized in `dtype`; "
        "*largest tensor* = the embedding table in `dtype`. Loading quantized should cost "
        "about quantized model + a few times the largest tensor (it is read, cast and "
        "quantized), never the float model. MiB = 2^20 bytes.",
        "",
    ]
    columns = ["shape", "backend", "dtype", "quantize", "params", "float model (MiB)",
               "quantized model (MiB)", "largest tensor (MiB)", "peak cost (MiB)",
               "peak / float model", "(peak - quantized) / largest tensor", "load time (s)"]
    lines += common.table_head(columns, "llll" + "r" * 8)
    for r in rows:
        cells = [r["shape"], r["backend"], r["dtype"], r["quantize"] or "(float)"]
        if r.get("error"):
            lines.append(common.failed_row(cells, r["error"], len(columns)))
            continue
        cost = r["peak"] - r["baseline"]
        lines.append(common.table_row(cells + [
            f"{r['params'] / 1e9:.2f} B", _mib(r["float_bytes"]), _mib(r["model_bytes"]),
            _mib(r["largest_tensor_bytes"]), f"**{_mib(cost)}**",
            f"{cost / r['float_bytes']:.2f}x",
            f"{(cost - r['model_bytes']) / r['largest_tensor_bytes']:.2f}",
            f"{r['seconds']:.0f}"]))
    return "\n".join(lines + [""] + common.machine_lines(args_line))


def measure_quantized(args, argv) -> dict:
    rows = []
    for shape_name in [s.strip() for s in args.shape.split(",") if s.strip()]:
        directory = ensure_quantized_checkpoint(args.cache_dir, shape_name)
        for backend in common.backends(args):
            for dtype in [d.strip() for d in args.load_dtype.split(",") if d.strip()]:
                for quantize in [q.strip() for q in args.quantize.split(",") if q.strip()]:
                    quantize = "" if quantize == "none" else quantize
                    log(f"{shape_name} {backend} {dtype} {quantize or 'float'} ...")
                    r = common.run_case(
                        [__file__, "--quantized-worker", "--dir", directory, "--dtype", dtype,
                         "--quantize", quantize, "--block-size", str(args.block_size)],
                        env={"KERAS_BACKEND": backend}, timeout=args.timeout)
                    r.update(shape=shape_name, backend=backend, dtype=dtype, quantize=quantize)
                    rows.append(r)
                    if "peak" in r:
                        log(f"  peak cost {_mib(r['peak'] - r['baseline'])} MiB "
                            f"(quantized model {_mib(r['model_bytes'])} MiB), "
                            f"{r['seconds']:.0f} s")
    return {"rows": rows, "args_line": common.args_line(__file__, argv)}


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


def _import(case: str, bench_model):
    """Imports what `case` needs and initialises the backend; returns the load function."""
    if case.startswith("hf_"):
        import torch

        hf_class = bench_model.hf_class()  # imports transformers
        torch.zeros(1)

        def load(directory, dtype):
            model = hf_class.from_pretrained(directory, dtype=getattr(torch, dtype))
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
        _, causal_lm_class = bench_model.keras_hub_classes()

        def load(directory, dtype):
            return causal_lm_class.from_preset(str(directory), preprocessor=None, dtype=dtype)

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


def worker(case: str, directory: str, dtype: str, trace: str = None, bench_model=None) -> dict:
    import gc

    load, describe = _import(case, bench_model or bench_model_of("gemma", "default"))
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


def ensure_checkpoints(cache: pathlib.Path, size: str, model=None) -> dict:
    """{'hf': dir, 'keras_hub': dir}, built on the first run and reused afterwards (a Gemma 3
    model's where every script shares them, `common.model_checkpoints`)."""
    if model is not None and model.name != "gemma":
        return common.model_checkpoints(model)
    return common.ensure_checkpoints(cache / size, json.dumps(SIZES[size], sort_keys=True),
                                     __file__, ["--size", size])


# ---- the driver -------------------------------------------------------------------------
def measure(case, backend, directory, dtype, trace_dir=None, model_args=()) -> dict:
    """The case's results, or {"error": ...} (`common.run_case`). model_args: --model and
    --size, so the worker knows the model's classes."""
    argv = [__file__, "--worker", case, "--dir", str(directory or ""), "--dtype", dtype or "",
            *model_args]
    if trace_dir:
        argv += ["--trace-file", str(trace_dir / f"{case}_{backend or 'torch'}.json")]
    return common.run_case(argv, env={"KERAS_BACKEND": backend} if backend else {})


def merge_runs(row: dict) -> dict:
    """A row measured in several rounds (`row["runs"]`, one result or error each): the fields
    of its median-peak run, the best load time with the median beside it, and every
    round's load time (None where it failed) for paired ratios."""
    runs = row["runs"]
    ok = [r for r in runs if "error" not in r]
    if not ok:
        row["error"] = runs[0]["error"]
        return row
    if "peak" not in ok[0]:  # the baseline row
        row.update(ok[0])
        return row
    row.update(sorted(ok, key=lambda r: r["peak"] - r["baseline"])[(len(ok) - 1) // 2])
    times = [r["seconds"] for r in ok]
    row.update(seconds=min(times), seconds_median=statistics.median(times),
               round_seconds=[r.get("seconds") for r in runs], failed_rounds=len(runs) - len(ok))
    return row


def _header(model, params, preset_files) -> str:
    if model.architecture == "gemma":
        cfg = model.hf
        return (f"Model: Gemma-shaped, random weights, {params:,} parameters "
                f"(vocab {cfg['vocab_size']}, hidden {cfg['hidden_size']}, "
                f"{cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} heads / "
                f"{cfg['num_key_value_heads']} kv head, head_dim {cfg['head_dim']}, "
                f"FFN {cfg['intermediate_size']}); HF checkpoint as safetensors shards of <= "
                "200 MB, keras-hub preset as one `model.weights.h5`.")
    files = preset_files or []
    return (model.description(params).replace(" (identical for every implementation)", "")
            + " HF checkpoint as safetensors shards of <= 200 MB (a bigger tensor, such as "
            "the embedding, in a shard of its own), keras-hub preset (written by gemma_keras' "
            "`save_to_preset`) as " + (", ".join(f"`{f}`" for f in files) or "-") + ".")


def render(rows, model, args_line, rounds=1, preset_files=None) -> str:
    params = next((r["params"] for r in rows if "params" in r), None)
    lines = [
        "# Checkpoint load: peak memory and time" + ("" if model.architecture == "gemma"
                                                     else f", {model.label}"),
        "",
        _header(model, params, preset_files) if params else "",
        "",
        "Each row is a fresh process. *Baseline* = RSS after imports and backend start-up. "
        "*Peak cost* = the kernel's high-water mark of RSS during the load (VmHWM, reset after "
        "the baseline) minus the baseline: it includes the loaded model itself, so an ideal "
        "loader scores 1.0x the model's size (parameters x bytes per parameter). *Anon* = the "
        "same for anonymous memory only (sampled every 5 ms, so approximate; it leaves out "
        "mmap'd file pages). *Kept* = RSS minus baseline right after the load; *in use* = the "
        "same after reading every weight once (a lazily mmap'd checkpoint becomes resident "
        "then). MiB = 2^20 bytes."
        + (f" {rounds} rounds, each loading every row once in a fresh process, the order "
           "rotating by one row per round; a row shows the round with its median peak cost, "
           "and the best load time with the median in parentheses." if rounds > 1 else ""),
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
            seconds = f"{r['seconds']:.1f}" + (f" ({r['seconds_median']:.1f})"
                                               if rounds > 1 else "")
            lines.append(
                f"| {r['label']} | {r['backend']} | {r['dtype']} | {_mib(r['model_bytes'])} | "
                f"{_mib(r['baseline'])} | {_mib(cost)} | **{cost / r['model_bytes']:.2f}x** | "
                f"{anon / r['model_bytes']:.2f}x | {_mib(r['retained'] - r['baseline'])} | "
                f"{_mib(r['in_use'] - r['baseline'])} | {seconds} |")
    lines += _ratio_lines(rows, rounds)
    lines += [
        "",
    ] + common.machine_lines(args_line)
    return "\n".join(lines)


# (our case, the peer's case, what the peer loads): each peer loads the very files we do.
PEERS = [("gk_kh", "kh_kh", "keras-hub (same keras-hub preset)"),
         ("gk_hf", "hf_hf", "transformers (same safetensors)")]


def _ratio_lines(rows, rounds) -> list:
    """gemma_keras against keras-hub and transformers loading the same files, per backend and
    dtype: peer / gemma_keras of the peak cost and of the load time (higher: gemma_keras
    needs less), and with several rounds the median of the round-by-round time ratios."""
    by = {(r["case"], r["backend"]): r for r in rows if "peak" in r}
    keras_backends = list(dict.fromkeys(r["backend"] for r in rows if r["case"] == "baseline"))
    out = []
    for backend in keras_backends:
        for suffix, dtype in (("f32", "float32"), ("bf16", "bfloat16")):
            for mine_prefix, peer_prefix, vs in PEERS:
                mine = by.get((f"{mine_prefix}_{suffix}", backend))
                peer = by.get((f"{peer_prefix}_{suffix}",
                               backend if peer_prefix == "kh_kh" else "torch (HF)"))
                if not mine or not peer:
                    continue
                cost, peer_cost = (mine["peak"] - mine["baseline"],
                                   peer["peak"] - peer["baseline"])
                paired = [b / a for a, b in zip(mine.get("round_seconds") or [],
                                                peer.get("round_seconds") or []) if a and b]
                out.append(common.table_row(
                    [backend, dtype, vs, _mib(cost), _mib(peer_cost),
                     common.ratio(peer_cost, cost), common.ratio(peer["seconds"],
                                                                 mine["seconds"]),
                     f"{statistics.median(paired):.2f}x" if rounds > 1 and paired else "-"]))
    if not out:
        return []
    return ["", "gemma_keras against the peers loading the same files (peer / gemma_keras: "
            "higher means gemma_keras needs less memory or time; *paired* = the median over "
            "rounds of that round's load-time ratio).", ""] + common.table_head(
        ["gemma_keras", "dtype", "vs", "our peak cost (MiB)", "peer's peak cost (MiB)",
         "peak cost", "load time (best)", "load time, paired rounds (median)"],
        "lll" + "r" * 5) + out


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
    p.add_argument("--model", choices=list(MODELS), default="gemma",
                   help="'gemma' (default): the Gemma-1-shaped model of --size; 'gemma3-1b': "
                   "the Gemma 3 1B shape (~1.0B parameters, ~4 GB in float32); 'gemma3-tiny': "
                   "a 7-layer Gemma 3 for smoke runs.")
    p.add_argument("--size", choices=sorted(SIZES), default="default",
                   help="With --model gemma: 'default' ~153M params (~610 MB f32); 'small' "
                   "~12M for a smoke run.")
    p.add_argument("--rounds", type=int, default=1,
                   help="Load every row this many times, the order rotating each round "
                   "(default 1).")
    p.add_argument("--cache-dir", type=pathlib.Path, default=DEFAULT_CACHE,
                   help="Where the default model's random checkpoints are built once "
                   "(git-ignored; the Gemma 3 models' are shared under bench/.cache/models/).")
    common.add_report_args(
        p, "Markdown file for the table (default: bench/results/load_memory.md for the "
        "default size, load_memory_small.md for --size small, load_memory_<model>.md for a "
        "Gemma 3 --model).")
    p.add_argument("--no-hf", action="store_true", help="Skip the transformers row.")
    p.add_argument("--trace", action="store_true",
                   help="Also save each load's RSS timeline (JSON) next to the checkpoints.")
    # Internal: one measurement / one checkpoint build in this process.
    p.add_argument("--worker", help=argparse.SUPPRESS)
    common.add_checkpoint_args(p)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--trace-file", help=argparse.SUPPRESS)
    p.add_argument("--quantize", help="comma-separated int8,int4,none: measure quantizing "
                   "while loading full-size Gemma 2 shapes instead (see --shape)")
    p.add_argument("--shape", default="gemma2_2b", help=f"with --quantize: comma-separated "
                   f"{', '.join(SHAPES)} (default gemma2_2b)")
    p.add_argument("--load-dtype", default="bfloat16",
                   help="with --quantize: comma-separated dtypes to load in (default bfloat16)")
    p.add_argument("--block-size", type=int, default=128, help="with --quantize: int4 groups")
    p.add_argument("--timeout", type=int, default=3600, help="with --quantize: per case (s)")
    p.add_argument("--quantized-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.quantized_worker:
        common.reply(quantized_worker(args.dir, args.dtype, args.quantize, args.block_size))
        return 0
    if args.quantize is not None:
        return common.report(args.output or QUANTIZED_OUTPUT,
                             lambda: measure_quantized(args, argv),
                             lambda raw: render_quantized(raw["rows"], raw["args_line"]))
    model = bench_model_of(args.model, args.size)
    model_args = ["--model", args.model, "--size", args.size]
    if args.worker:
        common.reply(worker(args.worker, args.dir, args.dtype, args.trace_file, model))
        return 0
    if common.make_checkpoint(args, SIZES[args.size], max_shard_size="200MB"):
        return 0

    def measure_all():
        dirs = ensure_checkpoints(args.cache_dir, args.size, model)
        trace_root = args.cache_dir / (args.size if args.model == "gemma" else args.model)
        trace_dir = trace_root / "traces" if args.trace else None
        if trace_dir:
            trace_dir.mkdir(parents=True, exist_ok=True)
        backends = common.backends(args)
        cases = model_cases(model)
        plan = [(case, label, b, ckpt, dtype)
                for b in backends for case, label, keras_case, ckpt, dtype in cases if keras_case]
        if not args.no_hf:
            plan += [(case, label, None, ckpt, dtype)
                     for case, label, keras_case, ckpt, dtype in cases if not keras_case]
        rows = [{"case": case, "label": label, "backend": backend or "torch (HF)",
                 "dtype": dtype, "runs": []} for case, label, backend, _, dtype in plan]
        for round_ in range(args.rounds):
            shift = round_ % len(plan)
            order = list(range(len(plan)))[shift:] + list(range(len(plan)))[:shift]
            for i in order:
                case, label, backend, ckpt, dtype = plan[i]
                shown = rows[i]["backend"]
                log((f"round {round_ + 1}/{args.rounds}: " if args.rounds > 1 else "")
                    + f"{label} [{shown}{', ' + dtype if dtype else ''}] ...")
                r = measure(case, backend, dirs.get(ckpt), dtype, trace_dir, model_args)
                rows[i]["runs"].append(r)
                if "peak" in r:
                    log(f"  cost {_mib(r['peak'] - r['baseline'])} MiB = "
                        f"{(r['peak'] - r['baseline']) / r['model_bytes']:.2f}x model, "
                        f"{r['seconds']:.1f} s")
        rows = [merge_runs(row) for row in rows]
        check_weights(rows, log)
        preset = pathlib.Path(dirs["keras_hub"])
        return {"rows": rows, "args_line": common.args_line(__file__, argv),
                "model": args.model, "rounds": args.rounds,
                "preset_files": sorted(f.name for f in preset.glob("*.weights.*"))}

    name = args.size if args.model == "gemma" else args.model
    output = args.output or (DEFAULT_OUTPUT if name == "default"
                             else DEFAULT_OUTPUT.with_name(f"load_memory_{name}.md"))
    return common.report(output, measure_all,
                         lambda raw: render(raw["rows"], model, raw["args_line"],
                                            raw.get("rounds", 1), raw.get("preset_files")))


if __name__ == "__main__":
    sys.exit(main())
