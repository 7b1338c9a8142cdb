"""Where one gemma_keras decode step spends its time, per Keras backend (CPU).

    python bench/decode_profile.py                          # jax, tensorflow, torch; batch 1
    python bench/decode_profile.py --backend torch --py-spy # + py-spy sampling of the loop
    python bench/decode_profile.py --batch 8

Uses the model and checkpoint of bench/generate_speed.py (built there once, under
bench/.cache/generate_speed). Each backend runs in a fresh subprocess that:
  1. prefills a session (`GenerationSession`, 32-token prompt, 160 columns, as `generate`
     does for 128 new tokens), then times, per decode step (median and min over --steps):
       loop       greedy `session.decode(...)`: what `generate` does per token (on jax and
                  tensorflow one compiled loop for all tokens; on torch sample, bookkeeping,
                  step per token);
       step       `session.step(tokens)`: host input arrays, compiled call, logits to NumPy;
       compiled   the compiled step function alone (`CompiledSteps`), waited for;
       to_numpy   `keras.ops.convert_to_numpy(logits)` + `np.asarray(float32)`;
       argmax     the greedy sampler on [batch, vocab] host logits;
  2. backend extras: JAX: the jitted function called with the weights list fetched once, and
     the AOT-compiled executable alone (how much is jit dispatch / `v.value` gathering), plus
     the optimized HLO's copies/transposes and XLA's own bytes-accessed estimate.
     TensorFlow: the tf.function's tracing count, its concrete function called directly, and
     the optimized HLO. torch: `torch.profiler` operator table (ops per step, self time) and,
     with --py-spy, a py-spy profile of the step loop grouped by source.
  3. floors: the same backend reading the same 609 MB of weights as matrix-vector products
     in one compiled/eager function, both orientations (x @ W[in, out] and W[out, in] @ x).
Writes bench/results/decode_profile.md (or _b{batch}.md).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as common  # noqa: E402
import generate_speed as gs  # noqa: E402  (the model, checkpoint and prompts)
from _common import log  # noqa: E402

CACHE = common.CACHE / "decode_profile"  # raw results, HLO dumps, py-spy samples


def _stats(times):
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "n": len(times)}


def _per_call(fn, n, warm=3):
    for _ in range(warm):
        fn()
    return _stats(common.times(fn, n))


def hlo_summary(text: str) -> dict:
    """Weight-sized data movement in an optimized HLO module: `copy` instructions (after
    layout assignment a physical transpose is a copy) of at least 1 MB, anywhere, fusion
    bodies included (activations of a decode step are KBs), with the largest ones, and the
    number of dots / fusions / while loops."""
    moves = []
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+ = (\w+)\[([\d,]*)\]\{[\d,]*\} copy\(", line)
        if not m:
            continue
        dtype, shape = m.groups()
        n = 1
        for dim in (int(x) for x in shape.split(",") if x):
            n *= dim
        size = n * (2 if dtype in ("bf16", "f16") else 4)
        if size >= 1 << 20:
            moves.append((size, f"{dtype}[{shape}]"))
    moves.sort(reverse=True)
    shapes = collections.Counter(shape for _, shape in moves)
    return {"weight_sized_copies": len(moves),
            "copied_MB_per_call": round(sum(m[0] for m in moves) / 1e6, 1),
            "copies_by_shape": dict(shapes.most_common(6)),
            "dots": len(re.findall(r" dot\(", text)),
            "fusions": len(re.findall(r" fusion\(", text)),
            "while_loops": len(re.findall(r" while\(", text))}


# ---- the worker ---------------------------------------------------------------------------
def worker(backend: str, hf_dir: str, batch: int, steps: int, use_py_spy: bool) -> dict:
    import keras
    import numpy as np

    import gemma_keras as gk
    from gemma_keras.layers.kv_cache import Mode
    from gemma_keras.generation.samplers import GreedySampler
    from gemma_keras.generation.session import GenerationSession

    P, N = 32, 128
    lm = gk.GemmaCausalLM.from_preset(hf_dir, dtype="float32")
    ids = gs._prompts(batch, P, gs.MODEL["vocab_size"])
    rows = [list(r) for r in ids]
    sampler, rng = GreedySampler(), np.random.default_rng(0)
    out = {"backend": backend, "batch": batch}

    def new_session():
        return GenerationSession(lm, rows, P + N)

    # Compile everything once.
    s = new_session()
    s.decode(4, sampler, rng)

    # loop: session.decode, as generate runs it (one more select than steps).
    per_loop = []
    for _ in range(3):
        s = new_session()
        per_loop.append(common.timed(s.decode, steps + 1, sampler, rng)[0] / steps)
    out["loop"] = _stats(per_loop)

    # step: session.step alone.
    s = new_session()
    tokens = sampler.select(s.logits, rng)
    out["step"] = _per_call(lambda: s.step(tokens), steps)

    # compiled: the compiled step alone, on prepared host inputs, waited for.
    s = new_session()
    compiled = s.steps
    step_ids = np.asarray(tokens, "int32").reshape(batch, 1)
    positions = np.full((batch, 1), P, "int32")
    start = np.asarray(s.column, "int32")
    state = {"cache": s.cache, "logits": None}
    if backend == "jax":
        import jax

        def wait(x):
            return jax.block_until_ready(x)
    else:
        def wait(x):
            return x

    def call_compiled():
        logits, state["cache"] = compiled(Mode.DECODE, step_ids, positions, state["cache"],
                                          start)
        state["logits"] = wait(logits)
    out["compiled"] = _per_call(call_compiled, steps)
    logits = state["logits"]
    out["to_numpy"] = _per_call(
        lambda: np.asarray(keras.ops.convert_to_numpy(logits), "float32"), steps)
    host_logits = np.asarray(keras.ops.convert_to_numpy(logits), "float32")
    out["argmax"] = _per_call(lambda: sampler.select(host_logits, rng), steps)

    weights = [v for v in lm.backbone.weights]
    out["weight_bytes"] = int(sum(int(np.prod(v.shape)) * 4 for v in weights))
    out["n_variables"] = len(lm.variables)

    if backend == "jax":
        out.update(_jax_extras(lm, compiled, step_ids, positions, state, start, steps))
    elif backend == "tensorflow":
        out.update(_tf_extras(compiled, step_ids, positions, state, start, steps))
    else:
        out.update(_torch_extras(s, tokens, steps, use_py_spy))
    out["floors"] = _floors(backend, lm, batch)
    return out


def _jax_extras(lm, compiled, ids, positions, state, start, steps):
    import jax

    variables = list(lm.variables)
    values = [v.value for v in variables]
    from gemma_keras.layers.kv_cache import Mode
    from gemma_keras.generation.steps import model_step

    def fn(token_ids, positions, cache, start):
        return model_step(lm.backbone, token_ids, positions, cache, start, Mode.DECODE)

    def pure(values, *args):
        with keras_stateless(variables, values):
            return fn(*args)

    jitted = jax.jit(pure)
    cache = state["cache"]
    res = {}
    res["gather_values"] = _per_call(lambda: [v.value for v in variables], steps)

    def call_jitted():
        logits, _ = jitted(values, ids, positions, cache, start)
        jax.block_until_ready(logits)
    res["jitted_prefetched_values"] = _per_call(call_jitted, steps)
    exe = jitted.lower(values, ids, positions, cache, start).compile()

    def call_exe():
        logits, _ = exe(values, ids, positions, cache, start)
        jax.block_until_ready(logits)
    res["aot_executable"] = _per_call(call_exe, steps)
    # Device-resident inputs: no host->device conversion of ids / positions / start.
    dev = [jax.device_put(x) for x in (ids, positions, start)]

    def call_exe_dev():
        logits, _ = exe(values, dev[0], dev[1], cache, dev[2])
        jax.block_until_ready(logits)
    res["aot_executable_device_inputs"] = _per_call(call_exe_dev, steps)
    text = exe.as_text()
    res["hlo"] = hlo_summary(text)
    try:
        cost = exe.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        res["xla_bytes_accessed"] = float(cost.get("bytes accessed", float("nan")))
        res["xla_flops"] = float(cost.get("flops", float("nan")))
    except Exception as e:  # cost analysis is best-effort
        res["xla_cost_error"] = repr(e)[:200]
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "jax_decode_step.hlo.txt").write_text(text)
    return res


def keras_stateless(variables, values):
    import keras

    return keras.StatelessScope(state_mapping=list(zip(variables, values)))


def _tf_extras(compiled, ids, positions, state, start, steps):
    import tensorflow as tf

    from gemma_keras.layers.kv_cache import Mode

    fn = compiled._steps[Mode.DECODE]
    res = {"tracing_count": int(fn.experimental_get_tracing_count())}
    cache = state["cache"]
    t_ids, t_pos, t_start = (tf.constant(x) for x in (ids, positions, start))
    res["tf_function_tensor_inputs"] = _per_call(lambda: fn(t_ids, t_pos, cache, t_start), steps)
    concrete = fn.get_concrete_function(t_ids, t_pos, cache, t_start)
    res["concrete_function"] = _per_call(lambda: concrete(t_ids, t_pos, cache, t_start), steps)
    res["tracing_count_after"] = int(fn.experimental_get_tracing_count())
    try:
        text = fn.experimental_get_compiler_ir(t_ids, t_pos, cache, t_start)(
            stage="optimized_hlo")
        res["hlo"] = hlo_summary(text)
        CACHE.mkdir(parents=True, exist_ok=True)
        (CACHE / "tf_decode_step.hlo.txt").write_text(text)
    except Exception as e:
        res["hlo_error"] = repr(e)[:300]
    return res


def _torch_extras(session, tokens, steps, use_py_spy):
    import torch
    from torch.profiler import ProfilerActivity, profile

    res = {"torch_threads": torch.get_num_threads()}
    n = 16
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            session.step(tokens)
    table = []
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events)
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:14]:
        table.append((e.key, e.count / n, e.self_cpu_time_total / n / 1e3))
    res["torch_ops_per_step"] = sum(e.count for e in events if e.key.startswith("aten::")) / n
    res["torch_self_ms_per_step"] = total_self / n / 1e3
    res["torch_top_ops"] = table
    # Same steps without the profiler, to compare wall time against op time.
    t = time.perf_counter()
    for _ in range(n):
        session.step(tokens)
    res["torch_wall_ms_per_step"] = (time.perf_counter() - t) / n * 1e3
    if use_py_spy:
        res["py_spy"] = _py_spy(session, tokens, steps)
    return res


def _py_spy(session, tokens, steps):
    """Samples this process with py-spy while it runs decode steps; groups by source."""
    import shutil

    exe = shutil.which("py-spy") or str(pathlib.Path(sys.executable).parent / "py-spy")
    raw = CACHE / "torch_py_spy.txt"
    raw.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([exe, "record", "--pid", str(os.getpid()), "--rate", "250",
                             "--format", "raw", "--output", str(raw),
                             "--native"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2.0)  # let it attach
    t = time.perf_counter()
    while time.perf_counter() - t < 12:
        session.step(tokens)
    proc.send_signal(2)
    proc.wait(timeout=60)
    return summarise_py_spy(raw.read_text())


def summarise_py_spy(text: str) -> dict:
    """Shares of samples: by the innermost Python frame's package (self time) and inclusive
    shares of a few functions of interest."""
    self_by = collections.Counter()
    incl = collections.Counter()
    total = 0
    marks = {
        "keras Layer.__call__": "__call__ (keras/src/layers/layer.py",
        "keras Operation.__call__": "__call__ (keras/src/ops/operation.py",
        "keras ops dispatch (keras/src/ops/*)": "keras/src/ops/",
        "keras torch backend (keras/src/backend/torch/*)": "keras/src/backend/torch/",
        "keras convert_to_tensor": "convert_to_tensor (keras/src/backend/torch/core.py",
        "EinsumDense.call": "call (keras/src/layers/core/einsum_dense.py",
        "gemma_keras attention": "gemma_keras/layers/attention.py",
        "gemma_keras rotary": "gemma_keras/layers/rotary.py",
        "gemma_keras rms_norm": "gemma_keras/layers/rms_norm.py",
        "gemma_keras cache.write": "write (gemma_keras/layers/kv_cache.py",
        "torch.einsum": "einsum (torch/functional.py",
        "native aten/mkl (any native frame)": "libtorch",
    }
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        count = int(count)
        total += count
        frames = stack.split(";")
        py = [f for f in frames if ".py:" in f]
        leaf_native = frames[-1] if frames else ""
        if ".py:" not in leaf_native and ("libtorch" in leaf_native or "mkl" in leaf_native
                                          or "dnnl" in leaf_native or "omp" in leaf_native):
            self_by["native: torch/MKL kernels (leaf in libtorch/mkl/omp)"] += count
        elif py:
            m = re.search(r"\((.*?):\d+\)", py[-1])
            path = m.group(1) if m else py[-1]
            key = path.split("site-packages/")[-1]
            key = "/".join(key.split("/")[:3])
            self_by[key] += count
        else:
            self_by["native: other"] += count
        for label, needle in marks.items():
            if any(needle in f for f in frames):
                incl[label] += count
    return {"samples": total,
            "self_share": [(k, round(100 * v / total, 1)) for k, v in self_by.most_common(14)],
            "inclusive_share": [(k, round(100 * incl[k] / total, 1)) for k in marks]}


def _floors(backend, lm, batch):
    """ms to read every weight once as matrix-vector products, in both orientations."""
    import numpy as np

    import keras

    mats = [np.asarray(keras.ops.convert_to_numpy(v), "float32")
            for v in lm.backbone.weights if len(v.shape) >= 2]  # every kernel has a 1024 axis
    # xW: x[batch, 1024] @ W[1024, cols] (keras' [in, out] kernels);
    # Wx: W[rows, 1024] . x (torch Linear / the tied head's [vocab, hidden] layout).
    xw = [m.reshape(1024, -1) for m in mats]
    wx = [m.reshape(-1, 1024) for m in mats]
    res = {}
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        x = jnp.ones((batch, 1024), jnp.float32)
        dxw, dwx = [jnp.asarray(m) for m in xw], [jnp.asarray(m) for m in wx]
        f1 = jax.jit(lambda ms, x: [x @ m for m in ms])
        f2 = jax.jit(lambda ms, x: [x @ m.T for m in ms])
        res["xW"] = _per_call(lambda: jax.block_until_ready(f1(dxw, x)), 10)
        res["Wx"] = _per_call(lambda: jax.block_until_ready(f2(dwx, x)), 10)
    elif backend == "tensorflow":
        import tensorflow as tf

        x = tf.ones((batch, 1024))
        dxw, dwx = [tf.constant(m) for m in xw], [tf.constant(m) for m in wx]
        f1 = tf.function(lambda ms, x: [tf.matmul(x, m) for m in ms], jit_compile=True)
        f2 = tf.function(lambda ms, x: [tf.matmul(x, m, transpose_b=True) for m in ms],
                         jit_compile=True)
        res["xW"] = _per_call(lambda: f1(dxw, x), 10)
        res["Wx"] = _per_call(lambda: f2(dwx, x), 10)
    else:
        import torch

        x = torch.ones((batch, 1024))
        dxw, dwx = [torch.from_numpy(m) for m in xw], [torch.from_numpy(m) for m in wx]
        with torch.inference_mode():
            res["xW"] = _per_call(lambda: [x @ m for m in dxw], 10)
            from gemma_keras.backends.torch import linear  # oneDNN, as the model runs it

            res["Wx"] = _per_call(lambda: [linear(x, m) for m in dwx], 10)
            res["Wx_F_linear"] = _per_call(
                lambda: [torch.nn.functional.linear(x, m) for m in dwx], 10)
            res["xW_einsum"] = _per_call(lambda: [torch.einsum("bd,df->bf", x, m) for m in dxw],
                                         10)
    return res


# ---- the driver --------------------------------------------------------------------------
def render(results, batch, bound_ms) -> str:
    L = [f"# gemma_keras decode step profile (batch {batch}, f32, CPU)", ""]
    if bound_ms:
        L += [f"Bandwidth bound for one step: {bound_ms:.1f} ms (weights / measured read "
              "bandwidth).", ""]
    L += ["Per decode step, ms: median (min).", "",
          *common.table_head(["component", *(r["backend"] for r in results)],
                             "l" + "r" * len(results))]

    def cell(r, key):
        v = r
        for k in key.split("."):
            v = v.get(k) if isinstance(v, dict) else None
        return f"{v['median_ms']:.2f} ({v['min_ms']:.2f})" if v else "-"
    for key, label in [
            ("loop", "greedy `session.decode` per token (one compiled loop on jax/tf)"),
            ("step", "`session.step`"), ("compiled", "compiled step alone"),
            ("to_numpy", "logits -> NumPy"), ("argmax", "greedy sampler (argmax)"),
            ("gather_values", "JAX: `[v.value for v in variables]`"),
            ("jitted_prefetched_values", "JAX: jitted fn, weights list prefetched"),
            ("aot_executable", "JAX: AOT executable alone"),
            ("aot_executable_device_inputs", "JAX: AOT executable, device inputs"),
            ("tf_function_tensor_inputs", "TF: tf.function, tensor inputs"),
            ("concrete_function", "TF: concrete function direct"),
            ("floors.xW", "floor: all weights as x @ W[in,out]"),
            ("floors.Wx", "floor: all weights as W[out,in] . x (as the model; torch: oneDNN)"),
            ("floors.Wx_F_linear", "floor: all weights as torch F.linear(x, W[out,in])"),
            ("floors.xW_einsum", "floor: all weights as einsum x,W[in,out]")]:
        if any(cell(r, key) != "-" for r in results):
            L.append(common.table_row([label, *(cell(r, key) for r in results)]))
    for r in results:
        L += ["", f"## {r['backend']}", ""]
        for k in ("hlo", "xla_bytes_accessed", "xla_flops", "tracing_count",
                  "tracing_count_after", "torch_threads", "torch_ops_per_step",
                  "torch_self_ms_per_step", "torch_wall_ms_per_step", "hlo_error",
                  "xla_cost_error"):
            if k in r:
                L.append(f"- {k}: {json.dumps(r[k])}")
        if "torch_top_ops" in r:
            L += ["", *common.table_head(["op", "calls/step", "self ms/step"], "lrr")]
            L += [common.table_row([k, f"{c:.0f}", f"{t:.2f}"]) for k, c, t in r["torch_top_ops"]]
        if "py_spy" in r:
            ps = r["py_spy"]
            L += ["", f"py-spy ({ps['samples']} samples), self time by innermost Python "
                  "frame's file (native leaf frames separated):", ""]
            L += [f"- {k}: {v}%" for k, v in ps["self_share"]]
            L += ["", "inclusive shares:", ""]
            L += [f"- {k}: {v}%" for k, v in ps["inclusive_share"]]
    return "\n".join(L) + "\n"


def main(argv=None):
    p = common.parser(__doc__)
    common.add_backend_arg(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=48, help="Decode steps timed per component.")
    p.add_argument("--py-spy", action="store_true", help="py-spy the torch step loop.")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="GB/s for the bound line (default: measure it).")
    p.add_argument("--worker", choices=common.BACKENDS, help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        common.reply(worker(args.worker, args.dir, args.batch, args.steps, args.py_spy))
        return 0

    def measure_all():
        dirs = gs.ensure_checkpoints(gs.DEFAULT_CACHE)
        bw = args.bandwidth * 1e9 if args.bandwidth else common.fastest(common.probe_bandwidth())
        results = []
        for backend in common.backends(args):
            log(f"{backend} ...")
            argv_ = [__file__, "--worker", backend, "--dir", dirs["hf"], "--batch",
                     str(args.batch), "--steps", str(args.steps)]
            r = common.result_line(common.run(argv_ + (["--py-spy"] if args.py_spy else []),
                                              env={"KERAS_BACKEND": backend}))
            results.append(r)
            log(f"  step {r['step']['median_ms']:.1f} ms, compiled "
                f"{r['compiled']['median_ms']:.1f} ms")
        return {"rows": results, "bandwidth": bw}

    def render_raw(raw):
        results = raw["rows"]
        bound_ms = 1e3 * results[0]["weight_bytes"] / raw["bandwidth"] if results else None
        return render(results, args.batch, bound_ms)

    name = "decode_profile.md" if args.batch == 1 else f"decode_profile_b{args.batch}.md"
    return common.report(common.RESULTS / name, measure_all, render_raw,
                         json_path=CACHE / f"raw_b{args.batch}.json")


if __name__ == "__main__":
    sys.exit(main())
