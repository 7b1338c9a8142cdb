"""The benchmarks' shared harness. Each bench/*.py script is a driver that runs its cases in
fresh worker processes of itself and renders a markdown report; what they share is here:
processes (run / run_case, Worker and Workers, the worker side serve / reply), measuring
(timed / times, the memory-bandwidth probe, RSS and its peak), the benchmark models and their
random checkpoints (MODELS: the Gemma 3 shapes every script's `--model` offers), which workers
live together (live_groups), the command line (parser, --only, --output / --json /
--from-json) and the report (report, machine_lines, tables, number formats, error lines).
`python bench/_common.py --bandwidth` is the bandwidth probe's own process; `--make` builds a
MODELS checkpoint (see `model_checkpoints`)."""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import time
from typing import NamedTuple

REPO = pathlib.Path(__file__).resolve().parent.parent
CACHE = REPO / "bench" / ".cache"  # git-ignored
RESULTS = REPO / "bench" / "results"
CASE_TIMEOUT_S = 600
MIB = 1024 ** 2
BACKENDS = ("jax", "tensorflow", "torch")
# Quiet, CPU-only, offline children.
_CHILD_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "",
              "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_VERBOSITY": "error"}


# ---- processes ----------------------------------------------------------------------------
def run(argv, env=None, timeout=CASE_TIMEOUT_S) -> str:
    """Runs `python *argv` from the repository root; its stdout, or an error with its tail."""
    proc = subprocess.run([sys.executable, *map(str, argv)],
                          env={**os.environ, **_CHILD_ENV, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout


def run_case(argv, env=None, timeout=CASE_TIMEOUT_S) -> dict:
    """One case in a fresh process: the dict its worker replied, or {"error": one line} when
    it failed or timed out (the whole failure is logged)."""
    try:
        return result_line(run(argv, env=env, timeout=timeout))
    except RuntimeError as e:
        log(f"  FAILED: {str(e)[-3000:]}")
        return {"error": error_line(str(e))}
    except subprocess.TimeoutExpired as e:
        log(f"  TIMED OUT after {e.timeout:.0f} s")
        return {"error": f"timed out after {e.timeout:.0f} s"}


class Worker:
    """A benchmark case kept alive in its own process, answering one JSON request per line."""

    def __init__(self, argv, env=None):
        import tempfile

        self._log = tempfile.TemporaryFile("w+")  # stderr: a pipe nobody reads could fill
        self.proc = subprocess.Popen([sys.executable, *map(str, argv)],
                                     env={**os.environ, **_CHILD_ENV, **(env or {})},
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, cwd=REPO)
        self.argv = argv

    def ask(self, request: dict, timeout=CASE_TIMEOUT_S) -> dict:
        """Sends a request; the worker's 'RESULT ' reply (other output is skipped)."""
        import select

        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [],
                                        max(0.0, deadline - time.monotonic()))
            line = self.proc.stdout.readline() if ready else ""
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
            if not ready or (not line and self.proc.poll() is not None):
                self.close()
                self._log.seek(0)
                why = "timed out" if not ready else f"exited ({self.proc.returncode})"
                raise RuntimeError(f"{' '.join(map(str, self.argv))} {why}:\n"
                                   f"{self._log.read()[-5000:]}")

    def rss(self) -> int:
        """The process' resident memory now, bytes (0 once it has exited)."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


class Workers:
    """Every case's `Worker`, alive together and asked in turn, so that only one computes at
    a time while the others wait on their stdin. Benchmarks whose ratios matter start them
    all first, then run timed rounds in which each case takes its turn, the order rotating
    each round: a slow minute of this shared machine then lands on every implementation
    alike instead of on whichever ran then. A worker that fails is closed, left out of later
    rounds, and reported to `on_error(case, error)`."""

    def __init__(self, on_error, timeout=CASE_TIMEOUT_S):
        self.live = {}
        self.on_error = on_error
        self.timeout = timeout  # seconds a worker may take to answer one request

    def start(self, case, argv, env, request: dict):
        """Starts `case`'s worker and returns its reply to `request` (None if it failed);
        waiting for that reply means one worker loads at a time."""
        self.live[case] = Worker(argv, env=env)
        return self.ask(case, request)

    def ask(self, case, request: dict, settle_s=0.0):
        """`case`'s reply, after `settle_s` (the previous worker's threads go idle); None if
        its worker failed (or had failed before)."""
        if case not in self.live:
            return None
        time.sleep(settle_s)
        try:
            return self.live[case].ask(request, timeout=self.timeout)
        except RuntimeError as e:
            del self.live[case]
            self.on_error(case, e)
            return None

    def rounds(self, cases, n):
        """(round, the live cases in that round's order) for n rounds; the order is `cases`
        rotated by one more each round."""
        for round_ in range(n):
            live = [c for c in cases if c in self.live]
            shift = round_ % max(len(live), 1)
            yield round_, live[shift:] + live[:shift]

    def stop(self, case):
        """Closes `case`'s worker (its results stay wherever they were recorded)."""
        worker = self.live.pop(case, None)
        if worker:
            worker.close()

    def rss(self) -> dict:
        """{case: resident bytes} of the live workers, read now."""
        return {case: worker.rss() for case, worker in self.live.items()}

    def close(self):
        for worker in self.live.values():
            worker.close()


def live_groups(cases, key) -> list:
    """`cases` as groups whose workers live together, one group after another, for models
    too big for every case's process to be alive at once. `key(case)` is a tuple: cases with
    the same key form a group (groups in the order their first case comes); a case whose key
    has None in some places (a reference every implementation is set against, such as
    transformers) joins every group that matches it in the others, so it is interleaved with
    each of them, and stays alive from the first of them to the last when they are
    consecutive. Cases that join no group form a last one."""
    keys = []
    for case in cases:
        k = key(case)
        if None not in k and k not in keys:
            keys.append(k)

    def joins(case, k):
        return all(mine is None or mine == theirs for mine, theirs in zip(key(case), k))
    groups = [[c for c in cases if joins(c, k)] for k in keys]
    left = [c for c in cases if not any(c in g for g in groups)]
    return groups + ([left] if left else [])


def reply(result: dict):
    """The worker side: prints `result` as the 'RESULT ' line its driver reads."""
    print("RESULT " + json.dumps(result), flush=True)


def serve(handle):
    """The worker side of `Worker`: answers each request line with handle(request)."""
    for line in sys.stdin:
        reply(handle(json.loads(line)))


def result_line(stdout: str) -> dict:
    """The JSON a worker printed after 'RESULT '."""
    line = [s for s in stdout.splitlines() if s.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


# ---- measuring ----------------------------------------------------------------------------
def timed(fn, *args, collect=False):
    """(seconds, fn(*args)); with `collect`, Python's garbage is collected first, so a
    collection of earlier garbage does not land inside the timing."""
    if collect:
        import gc

        gc.collect()
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def times(fn, n) -> list:
    """Seconds of each of n calls of fn()."""
    return [timed(fn)[0] for _ in range(n)]


def start_backend():
    """Starts the Keras backend's runtime (so that it is not counted in what follows)."""
    import keras

    keras.ops.convert_to_numpy(keras.ops.zeros((1,)) + 1)


BANDWIDTH_KEYS = ("one_thread", "two_threads", "two_threads_max")


def read_bandwidth(gigabytes: float = 1.5, repeats: int = 7) -> dict:
    """Memory read bandwidth (bytes/s): NumPy float32 sums and maxes streaming a `gigabytes`
    array, one and two threads, best of `repeats` each."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    array = np.ones(int(gigabytes * 1e9) // 4, np.float32)
    halves = np.array_split(array, 2)
    pool = ThreadPoolExecutor(2)

    def best(fn):
        return array.nbytes / min(times(fn, repeats))

    one = best(lambda: array.sum())
    two = best(lambda: list(pool.map(np.sum, halves)))  # np.sum releases the GIL
    # A float32 sum is compute-bound on some CPUs (2026-12-01: 15.3 GB/s where decoding read
    # the weights at 25); a max is one SIMD compare per element, so it streams at the
    # memory's pace (26.4 GB/s there). The bound is the fastest read measured.
    two_max = best(lambda: list(pool.map(np.max, halves)))
    return {"one_thread": one, "two_threads": two, "two_threads_max": two_max,
            "bytes": array.nbytes}


def probe_bandwidth() -> dict:
    """`read_bandwidth()` in a fresh process (no benchmark's memory or threads around)."""
    return result_line(run([__file__, "--bandwidth"]))


def fastest(bandwidth: dict) -> float:
    """The fastest read of a probe (or of the best of several), bytes/s."""
    return max(bandwidth[k] for k in BANDWIDTH_KEYS if k in bandwidth)


def proc_status() -> dict:
    """Memory fields of /proc/self/status, in bytes (VmHWM: the peak RSS)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024  # reported in kB
    return out


def release_free_memory() -> bool:
    """Hands memory the C heap holds but no longer uses back to the OS (glibc's malloc_trim),
    so that an RSS reading counts live data, not freed blocks kept for reuse; False where
    there is no glibc."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) or True)
    except (OSError, AttributeError):
        return False


def reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---- the benchmark models -----------------------------------------------------------------
class BenchModel(NamedTuple):
    """A random benchmark model: the fields of its transformers config (`hf`), which
    transformers / keras-hub classes hold it (`architecture`), and the standard deviation of its
    tied embedding (None: transformers' initialisation)."""
    name: str
    architecture: str  # "gemma": GemmaForCausalLM / GemmaBackbone; "gemma3": Gemma3*
    hf: dict
    embedding_std: float | None
    label: str  # how reports name it, e.g. "Gemma-3-1B-shaped"

    def params(self) -> int:
        """The parameter count, from the shape (the embedding tied with the head)."""
        m = self.hf
        h, d, inner = m["hidden_size"], m["head_dim"], m["intermediate_size"]
        gemma3 = self.architecture == "gemma3"
        per_layer = (h * d * (2 * m["num_attention_heads"] + 2 * m["num_key_value_heads"])
                     + 3 * h * inner + (4 if gemma3 else 2) * h  # pre (and post) norms
                     + (2 * d if gemma3 else 0))  # QK-norm scales
        return m["vocab_size"] * h + m["num_hidden_layers"] * per_layer + h

    def big(self) -> bool:
        """Whether a process holding it in float32 is too big (> 2 GB of weights) for all of a
        benchmark's cases to be alive at once on this 24 GiB machine (`live_groups`)."""
        return self.params() * 4 > 2e9

    def hf_class(self):
        import transformers

        return getattr(transformers, {"gemma": "GemmaForCausalLM",
                                      "gemma3": "Gemma3ForCausalLM"}[self.architecture])

    def keras_hub_classes(self) -> tuple:
        """(Backbone, CausalLM) of keras-hub."""
        import keras_hub

        prefix = {"gemma": "Gemma", "gemma3": "Gemma3"}[self.architecture]
        return (getattr(keras_hub.models, f"{prefix}Backbone"),
                getattr(keras_hub.models, f"{prefix}CausalLM"))

    def layer_kinds(self) -> list:
        """'local' / 'global' per layer: Gemma 3's five sliding-window layers, then one global
        (transformers' default layer_types); every layer global for Gemma 1."""
        n = self.hf["num_hidden_layers"]
        if self.architecture != "gemma3":
            return ["global"] * n
        return ["global" if (i + 1) % 6 == 0 else "local" for i in range(n)]

    def description(self, params=None) -> str:
        """'Model: ...' for a report."""
        m = self.hf
        params = params or self.params()
        text = (f"Model: {self.label}, random weights (identical for every implementation), "
                f"{params:,} parameters ({params * 4 / 1e6:,.0f} MB in float32): vocab "
                f"{m['vocab_size']}, hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
                f"{m['num_attention_heads']} query heads / {m['num_key_value_heads']} kv head, "
                f"head_dim {m['head_dim']}, GeGLU branches {m['intermediate_size']}")
        if self.architecture == "gemma3":
            kinds = self.layer_kinds()
            rope = m["rope_parameters"]
            text += (f"; Gemma 3: QK-norm, {kinds.count('local')} sliding-window layers "
                     f"(window {m['sliding_window']}) and {kinds.count('global')} global (every "
                     f"6th), RoPE base {rope['sliding_attention']['rope_theta']:,.0f} local / "
                     f"{rope['full_attention']['rope_theta']:,.0f} global, query scale "
                     f"{m['query_pre_attn_scalar']}^-0.5, max positions "
                     f"{m['max_position_embeddings']}")
        return text + "."


GEMMA3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
               "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}}
# The `--model` choices the benchmarks share (each script also keeps its own Gemma-1-shaped
# default). query_pre_attn_scalar = head_dim, as in the real 1B: keras-hub's Gemma3Backbone
# can only scale queries by head_dim ** -0.5.
MODELS = {
    # Gemma 3 1B's text model (DESIGN.md section 2), ~1.0B parameters, ~4.0 GB in float32.
    # Embedding std: at transformers' 0.02 every greedy row repeats 1-3 tokens (the last
    # token's own embedding wins the tied head); measured on this shape with a 1152-wide FFN
    # (the post-FFN norm makes the width irrelevant), 8 rows x 48 greedy tokens: 0.02 gave 1-3
    # distinct tokens per row, 0.006 gave 4-27 with the smallest top-2 logit gap 2e-4, 0.002
    # gave 21-42 but gaps down to 7e-6, as small as float32 differences between libraries.
    "gemma3-1b": BenchModel(
        "gemma3-1b", "gemma3",
        dict(vocab_size=262144, hidden_size=1152, num_hidden_layers=26, num_attention_heads=4,
             num_key_value_heads=1, head_dim=256, intermediate_size=6912, sliding_window=512,
             query_pre_attn_scalar=256, max_position_embeddings=32768,
             rope_parameters=GEMMA3_ROPE),
        0.006, "Gemma-3-1B-shaped"),
    # For smoke runs: seven layers (five local, one global, one local) and a window of 32, so
    # a prompt of a few hundred tokens already fills the rings. Embedding std 0.02: 8 rows x
    # 128 greedy tokens had 26-51 distinct tokens per row, smallest top-2 gap 3e-4 (0.1: 1-3).
    "gemma3-tiny": BenchModel(
        "gemma3-tiny", "gemma3",
        dict(vocab_size=2048, hidden_size=128, num_hidden_layers=7, num_attention_heads=4,
             num_key_value_heads=1, head_dim=64, intermediate_size=256, sliding_window=32,
             query_pre_attn_scalar=64, max_position_embeddings=2048,
             rope_parameters=GEMMA3_ROPE),
        0.02, "tiny Gemma-3-shaped"),
}
MODEL_SHARD_SIZE = "200MB"  # the safetensors shards of MODELS' HF checkpoints


def model_checkpoints(model: BenchModel) -> dict:
    """{'hf': dir, 'keras_hub': dir} of one of MODELS, built once under bench/.cache/models/
    and shared by every benchmark script (a 1B checkpoint takes minutes and 8 GB to build)."""
    key = json.dumps({"architecture": model.architecture, **model.hf, "seed": 0,
                      "embedding_std": model.embedding_std, "shards": MODEL_SHARD_SIZE},
                     sort_keys=True)
    return ensure_checkpoints(CACHE / "models" / model.name, key, __file__,
                              ["--model", model.name])


# ---- checkpoints --------------------------------------------------------------------------
def make_hf(directory: pathlib.Path, model: dict, embedding_std=None, max_shard_size=None,
            architecture="gemma"):
    """A random transformers GemmaForCausalLM (Gemma3ForCausalLM for "gemma3") of `model`'s
    shape, saved as safetensors."""
    import torch
    import transformers

    torch.manual_seed(0)
    special = dict(rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
                   pad_token_id=0, hidden_activation="gelu_pytorch_tanh")
    if architecture == "gemma3":
        hf = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**model, **special))
    else:
        hf = transformers.GemmaForCausalLM(transformers.GemmaConfig(
            **model, **special, max_position_embeddings=8192))
    hf = hf.to(torch.float32)
    with torch.no_grad():  # non-trivial norm scales, so a norm mix-up would show
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
        if embedding_std is not None:
            hf.model.embed_tokens.weight.normal_(0.0, embedding_std)
    shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    hf.save_pretrained(directory, **shards)


def make_keras_hub(hf_dir: pathlib.Path, directory: pathlib.Path):
    """The same weights as a keras-hub preset, written by gemma_keras."""
    import gemma_keras as gk

    lm = gk.GemmaCausalLM.from_preset(str(hf_dir), dtype="float32")
    lm.save_to_preset(str(directory))


def ensure_checkpoints(root: pathlib.Path, key: str, script, make_args) -> dict:
    """{'hf': dir, 'keras_hub': dir} under `root`, built once by `script --make hf|keras_hub
    *make_args` (each in a fresh process; see `make_checkpoint`) and rebuilt when `key` (the
    model's description) changes."""
    stamp = root / "config.stamp"
    hf_dir, kh_dir = root / "hf", root / "keras_hub"
    if not (stamp.is_file() and stamp.read_text() == key and (hf_dir / "config.json").is_file()
            and (kh_dir / "config.json").is_file()):
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        log(f"building the checkpoint under {root} (once) ...")
        t = time.perf_counter()
        run([script, "--make", "hf", *make_args, "--dir", hf_dir])
        run([script, "--make", "keras_hub", *make_args, "--dir", kh_dir, "--source", hf_dir],
            env={"KERAS_BACKEND": "jax"})
        stamp.write_text(key)
        log(f"  done in {time.perf_counter() - t:.0f} s")
    return {"hf": str(hf_dir), "keras_hub": str(kh_dir)}


# ---- the command line ---------------------------------------------------------------------
def parser(doc: str) -> argparse.ArgumentParser:
    """A script's parser: its docstring's first paragraph as the description."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_backend_arg(p: argparse.ArgumentParser):
    p.add_argument("--backend", choices=BACKENDS + ("all",), default="all",
                   help="Keras backend(s) to measure (default: all, each in subprocesses).")


def backends(args) -> tuple:
    """The Keras backends --backend names."""
    return BACKENDS if args.backend == "all" else (args.backend,)


def add_backends_list_arg(p: argparse.ArgumentParser):
    """--backends: a comma-separated list, each measured in its own process, in a row."""
    p.add_argument("--backends", default=os.environ.get("KERAS_BACKEND", "jax"),
                   help="Comma-separated Keras backends, each in its own process, one after "
                   "another (default: $KERAS_BACKEND, else jax).")


def report_backends(args, default_output: pathlib.Path, measure, render) -> int:
    """The driver's end for scripts with --backends and --quick: checks the backends (into
    args.backends), then `report` to --output (default `default_output`, or its `_quick`
    sibling with --quick) and --json (default: the output as .json)."""
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.backends or any(b not in BACKENDS for b in args.backends):
        raise SystemExit(f"--backends takes {','.join(BACKENDS)}")
    output = args.output or (default_output if not args.quick else default_output.with_name(
        f"{default_output.stem}_quick.md"))
    json_path = args.json or output.with_suffix(".json")
    return report(output, lambda: measure(args), render, json_path=json_path,
                  from_json=args.from_json)


def add_checkpoint_args(p: argparse.ArgumentParser):
    """The internal flags of `ensure_checkpoints`' builder processes (and --dir)."""
    p.add_argument("--make", choices=("hf", "keras_hub"), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)


def add_report_args(p: argparse.ArgumentParser, output_help: str, json_help=None,
                    from_json_help=None):
    """--output (the markdown), and where given their help, --json (the raw results) and
    --from-json (re-render an earlier run's); for `report`."""
    p.add_argument("--output", type=pathlib.Path, default=None, help=output_help)
    if json_help:
        p.add_argument("--json", type=pathlib.Path, default=None, help=json_help)
    if from_json_help:
        p.add_argument("--from-json", type=pathlib.Path, default=None, help=from_json_help)


def make_checkpoint(args, model: dict, **hf_options) -> bool:
    """In a builder process (`--make`): writes its checkpoint and says True."""
    if args.make == "hf":
        make_hf(pathlib.Path(args.dir), model, **hf_options)
    elif args.make == "keras_hub":
        make_keras_hub(pathlib.Path(args.source), pathlib.Path(args.dir))
    return bool(args.make)


def pick(ids, only: str, prefixes=False) -> list:
    """The ids matching `--only`: comma-separated globs (and, with `prefixes`, prefixes)."""
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    chosen = [i for i in ids if any(fnmatch.fnmatch(i, p) or (prefixes and i.startswith(p))
                                    for p in patterns)]
    if not chosen:
        raise SystemExit(f"--only {only!r} matches none of {list(ids)}")
    return chosen


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def args_line(script, argv=None) -> str:
    """The command as typed: `python bench/<script> <arguments>`."""
    return f"python bench/{pathlib.Path(script).name}" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv))


def report(output: pathlib.Path, measure, render, json_path=None, from_json=None) -> int:
    """A driver's end. The raw results (a dict with 'rows') are measured now, `measure()`,
    and also saved to `json_path`, or read back from an earlier run's `from_json`; the
    markdown `render(raw)` is printed and written to `output`. 1 if a row failed, else 0."""
    start = time.perf_counter()
    if from_json:
        raw = json.loads(pathlib.Path(from_json).read_text())
    else:
        raw = measure()
        if json_path:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(raw, indent=1))
    text = render(raw)
    print(text)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    log(f"wrote {output}" + ("" if from_json
                             else f" ({time.perf_counter() - start:.0f} s in all)"))
    return 1 if any(r.get("error") for r in raw["rows"]) else 0


# ---- the report ---------------------------------------------------------------------------
def closing_lines(raw: dict, extra_packages=()) -> list:
    """The report's end: the load average the run recorded (`raw["load_average"]`), then
    `machine_lines` for `raw["args_line"]`."""
    return ["", f"Load average (1 min) at the end: {raw['load_average']:.1f} (2 cores; this "
            "machine is shared).", ""] + machine_lines(raw["args_line"], extra_packages)


def machine_lines(args_line: str, extra_packages=()) -> list:
    """The report's closing lines: machine, library versions (the usual ones and
    `extra_packages`), date and command."""
    import datetime
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "-"
    return [
        f"Machine: {platform.machine()}, {cpu_model()}, {os.cpu_count()} CPU cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1024 ** 3:.0f} GiB RAM, "
        f"Linux {platform.release()}, Python {platform.python_version()}. "
        + ", ".join(f"{p} {version(p)}" for p in ("keras", "jax", "tensorflow", "torch",
                                                  "keras-hub", "transformers", "numpy",
                                                  *extra_packages)) + ".",
        f"Run {datetime.date.today().isoformat()}: `{args_line}`.",
        "",
    ]


def cpu_model() -> str:
    """The CPU's name and the vector extensions the narrow-format kernels depend on (oneDNN's
    bfloat16 product needs AVX512_BF16; the int8 / int4 kernels run faster with AVX512 and
    VNNI), e.g. "AMD EPYC (avx2)": weight-format results differ between such hosts."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16")
    shown = [f for f in wanted if f in flags]
    return f"{name} ({', '.join(shown) or 'no AVX2'})"


def table_row(cells) -> str:
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"


def table_head(columns, align: str) -> list:
    """A markdown table's header and rule; `align` has an 'l' or 'r' per column."""
    return [table_row(columns), "|" + "".join("--:|" if a == "r" else "---|" for a in align)]


def failed_row(cells, error: str, columns: int) -> str:
    """A case that failed: its first cells, then the error, in a row of `columns` cells."""
    return table_row([*cells, f"failed: {error}"] + [""] * (columns - len(cells) - 1))


def fmt(x, digits=1) -> str:
    return "-" if x is None or x != x else f"{x:,.{digits}f}"  # None, NaN: not measured


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def mib(n) -> str:
    return f"{n / MIB:,.0f}"


def error_line(text: str) -> str:
    """The exception line of a failed worker's output (else its last line), shortened."""
    lines = [s.strip() for s in text.strip().splitlines() if s.strip()]
    killed = re.search(r"(?:failed|exited) \((-\d+)\)", lines[0] if lines else "")
    if killed:  # no traceback: the kernel's OOM killer sends signal 9
        signal = -int(killed.group(1))
        return f"killed by signal {signal}" + (" (out of memory?)" if signal == 9 else "")
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Exit|Interrupt)\b.*", line):
            return line[:240].replace("|", "\\|")
    return (lines[-1] if lines else "unknown error")[:240].replace("|", "\\|")


def _main(argv=None) -> int:
    """This file as a process: the bandwidth probe, or a builder of a MODELS checkpoint."""
    p = argparse.ArgumentParser(description="The benchmarks' helper processes (internal).")
    p.add_argument("--bandwidth", action="store_true", help="Measure the read bandwidth.")
    p.add_argument("--model", choices=sorted(MODELS), help="with --make: which checkpoint")
    add_checkpoint_args(p)
    args = p.parse_args(argv)
    if args.bandwidth:
        reply(read_bandwidth())
        return 0
    if not (args.make and args.model):
        p.error("give --bandwidth, or --make with --model")
    model = MODELS[args.model]
    make_checkpoint(args, model.hf, embedding_std=model.embedding_std,
                    max_shard_size=MODEL_SHARD_SIZE, architecture=model.architecture)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
