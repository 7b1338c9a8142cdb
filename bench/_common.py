"""What the benchmarks share: running a case in a fresh subprocess, and the random
Gemma-shaped checkpoints (HF safetensors + the keras-hub preset written from it) that each
benchmark builds once under its cache folder."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
CASE_TIMEOUT_S = 600
# Quiet, CPU-only, offline children.
_CHILD_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "",
              "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_VERBOSITY": "error"}


def run(argv, env=None, timeout=CASE_TIMEOUT_S) -> str:
    """Runs `python *argv` from the repository root; its stdout, or an error with its tail."""
    proc = subprocess.run([sys.executable, *map(str, argv)],
                          env={**os.environ, **_CHILD_ENV, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout


class Worker:
    """A benchmark case kept alive in its own process, answering one JSON request per line.

    Benchmarks whose ratios matter start every case's worker first and then ask them for
    timed rounds in turn (only one works at a time), so a slow minute of this shared machine
    lands on every implementation alike instead of on whichever ran then."""

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

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def serve(handle):
    """The worker side of `Worker`: answers each request line with handle(request)."""
    for line in sys.stdin:
        print("RESULT " + json.dumps(handle(json.loads(line))), flush=True)


def result_line(stdout: str) -> dict:
    """The JSON a worker printed after 'RESULT '."""
    line = [s for s in stdout.splitlines() if s.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def make_hf(directory: pathlib.Path, model: dict, embedding_std=None, max_shard_size=None):
    """A random transformers GemmaForCausalLM of `model`'s shape, saved as safetensors."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GemmaConfig(
        **model, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
        pad_token_id=0)
    hf = transformers.GemmaForCausalLM(config).to(torch.float32)
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


def ensure_checkpoints(root: pathlib.Path, key: str, script, make_args, log) -> dict:
    """{'hf': dir, 'keras_hub': dir} under `root`, built once by `script --make hf|keras_hub
    *make_args` (each in a fresh process) and rebuilt when `key` (the model's description)
    changes."""
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


def machine_lines(args_line: str) -> list:
    """The report's closing lines: machine, library versions, date and command."""
    import datetime
    import importlib.metadata as md
    import platform

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "-"
    return [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1024 ** 3:.0f} GiB RAM, "
        f"Linux {platform.release()}, Python {platform.python_version()}. "
        + ", ".join(f"{p} {version(p)}" for p in ("keras", "jax", "tensorflow", "torch",
                                                  "keras-hub", "transformers", "numpy")) + ".",
        f"Run {datetime.date.today().isoformat()}: `{args_line}`.",
        "",
    ]


# ---- memory probes (inside the workers) ---------------------------------------------------
def proc_status() -> dict:
    """Memory fields of /proc/self/status, in bytes."""
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
