"""Seeded mutation fuzzing of the checkpoint readers (issue 22): every load of a mutated
checkpoint must end in success or a GemmaError naming the file, within a few seconds, and
without allocating much more than the checkpoint's files hold.

Used by tests/test_fuzz_readers.py (a fixed budget in CI) and scripts/fuzz_readers.py (a
longer run). What a "load" is here: the config (format detection included), the weight
index of every tensor, every tensor read as float32, and the tokenizer, i.e. everything
`GemmaCausalLM.from_preset` reads from the files before it builds the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import struct
import time
import tracemalloc
from typing import List, Optional

import numpy as np

# Values a hostile JSON file may hold where a reader expects something else.
ODD_VALUES = [None, True, -1, 0, 2 ** 63, -2 ** 63, 1e308, 1.5, "", "x", "../../etc/passwd",
              "/etc/passwd", [], {}, [1, 2], {"a": 1}]


@dataclasses.dataclass
class Finding:
    case: int
    file: str
    mutation: str
    problem: str  # what went wrong: an exception that is not a GemmaError, too slow, ...

    def __str__(self):
        return f"case {self.case}: {self.file} <- {self.mutation}: {self.problem}"


def load_everything(directory: pathlib.Path):
    """What `from_preset` reads from the files, without building the model."""
    from gemma_keras.checkpoints import hf_format, keras_hub_format
    from gemma_keras.checkpoints.loading import read_preset_config
    from gemma_keras.checkpoints.reading import read_json
    from gemma_keras.tokenizer import GemmaTokenizer

    config, _, fmt = read_preset_config(directory)
    if fmt == "keras_hub":
        reader = keras_hub_format.reader(directory, config)
    else:
        reader = hf_format.reader(directory, read_json(directory / "config.json")["model_type"])
    for entry in reader.values():
        entry.read(np.float32)
    GemmaTokenizer.from_preset(str(directory))


# ---- mutations ----------------------------------------------------------------------------
def _json_paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _json_paths(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:8]):
            yield from _json_paths(v, path + (i,))


def _mutate_json(value, rng):
    """A structural mutation of parsed JSON: (new value, what was done)."""
    paths = list(_json_paths(value))
    path = paths[rng.integers(len(paths))]
    choice = rng.integers(4)
    if not path or choice == 0:  # replace the value there
        new = ODD_VALUES[rng.integers(len(ODD_VALUES))]
        if choice == 0 and rng.random() < 0.2:
            new = [[[[[[[[[[[]]]]]]]]]]] * 3  # nesting
        if not path:
            return new, f"whole document -> {new!r}"[:120]
        _set(value, path, new)
        return value, f"{'/'.join(map(str, path))} -> {new!r}"[:120]
    parent = _get(value, path[:-1])
    if choice == 1 and isinstance(parent, dict):  # drop the key
        del parent[path[-1]]
        return value, f"{'/'.join(map(str, path))} deleted"
    if choice == 2:  # a number scaled or negated
        old = _get(value, path)
        if isinstance(old, (int, float)) and not isinstance(old, bool):
            new = [-old, old * 1000003, old + 1, 0][rng.integers(4)]
            _set(value, path, new)
            return value, f"{'/'.join(map(str, path))} {old!r} -> {new!r}"
    new = ODD_VALUES[rng.integers(len(ODD_VALUES))]
    _set(value, path, new)
    return value, f"{'/'.join(map(str, path))} -> {new!r}"[:120]


def _get(value, path):
    for p in path:
        value = value[p]
    return value


def _set(value, path, new):
    _get(value, path[:-1])[path[-1]] = new


def _mutate_bytes(data: bytes, rng):
    data = bytearray(data)
    kind = rng.integers(4)
    if kind == 0 or not data:
        cut = int(rng.integers(len(data) + 1))
        return bytes(data[:cut]), f"truncated to {cut} of {len(data)} bytes"
    if kind == 1:
        flips = int(rng.integers(1, 9))
        for _ in range(flips):
            i = int(rng.integers(len(data)))
            data[i] ^= 1 << int(rng.integers(8))
        return bytes(data), f"{flips} bit flips"
    if kind == 2:  # a huge, negative or zero 8-byte integer somewhere (sizes, offsets)
        i = int(rng.integers(max(len(data) - 8, 1)))
        value = [2 ** 63 - 1, 2 ** 64 - 1, 0, 2 ** 40][rng.integers(4)]
        data[i:i + 8] = struct.pack("<Q", value)[: len(data) - i]
        return bytes(data), f"8 bytes at {i} -> {value}"
    i = int(rng.integers(len(data)))
    n = int(rng.integers(1, 64))
    data[i:i + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    return bytes(data), f"{n} random bytes at {i}"


def _mutate_safetensors(data: bytes, rng):
    """Half the time a mutation of the JSON header (the data kept), else of the bytes."""
    if len(data) >= 8 and rng.random() < 0.5:
        (length,) = struct.unpack("<Q", data[:8])
        try:
            header = json.loads(data[8:8 + length])
        except ValueError:
            return _mutate_bytes(data, rng)
        header, what = _mutate_json(header, rng)
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text + data[8 + length:], "header: " + what
    return _mutate_bytes(data, rng)


def mutate(path: pathlib.Path, rng):
    """Mutates one file in place; returns what was done."""
    data = path.read_bytes()
    if path.suffix == ".json":
        try:
            value = json.loads(data)
        except ValueError:
            value = None
        if value is not None and rng.random() < 0.75:
            value, what = _mutate_json(value, rng)
            path.write_text(json.dumps(value))
            return what
    if path.suffix == ".safetensors":
        data, what = _mutate_safetensors(data, rng)
    else:
        data, what = _mutate_bytes(data, rng)
    path.write_bytes(data)
    return what


# ---- the run ------------------------------------------------------------------------------
def fuzz(bases: List[pathlib.Path], cases: int, seed: int, workdir: pathlib.Path,
         time_limit: float = 5.0, slack_bytes: int = 1 << 20) -> List[Finding]:
    """`cases` seeded mutations spread over the checkpoint directories `bases`: each case
    copies one, mutates one of its files (sometimes two) and loads it. Returns the findings."""
    from gemma_keras.errors import GemmaError

    rng = np.random.default_rng(seed)
    findings = []
    for base in bases:  # unmutated, they load (and the readers' imports are done)
        load_everything(base)
    files = {base: sorted(p for p in base.rglob("*") if p.is_file()) for base in bases}
    for case in range(cases):
        base = bases[case % len(bases)]
        directory = workdir / f"case_{case}"
        shutil.copytree(base, directory, copy_function=os.link)  # files shared until mutated
        size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
        done = []
        for _ in range(1 + int(rng.random() < 0.2)):
            victim = files[base][rng.integers(len(files[base]))].relative_to(base)
            data = (directory / victim).read_bytes()
            (directory / victim).unlink()  # a copy of its own: the base stays as it was
            (directory / victim).write_bytes(data)
            done.append(f"{victim}: {mutate(directory / victim, rng)}")
        problem = _load_problem(directory, size, time_limit, slack_bytes, GemmaError)
        if problem is not None:
            findings.append(Finding(case, base.name, "; ".join(done), problem))
        shutil.rmtree(directory)
    return findings


class _Hung(BaseException):
    """Raised by the alarm inside a load that ran past twice the time limit."""


def _alarm(signum, frame):
    raise _Hung()


def _reset_peak_rss() -> Optional[int]:
    """Resets the process' peak resident size (VmHWM) to its current one (Linux >= 4.0) and
    returns that; None where the kernel does not let it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_bytes("VmRSS")


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0]) * 1024  # in kB there
    raise KeyError(key)


# Resident memory a load may add beyond twice the checkpoint's bytes: the allocator's and
# the libraries' own working memory (measured over 1,000 cases: at most 1 MiB).
RSS_SLACK_BYTES = 32 << 20


def _load_problem(directory, size, time_limit, slack_bytes, GemmaError) -> Optional[str]:
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 2 * time_limit)
    # Two measures of what a load allocates: tracemalloc sees Python's and NumPy's memory
    # (exactly, but not C libraries'); the peak resident size sees everything, h5py's HDF5
    # and SentencePiece's C++ included, with the allocator's noise.
    rss_before = _reset_peak_rss()
    tracemalloc.start()
    start = time.perf_counter()
    problem = None
    try:
        load_everything(directory)
    except _Hung:
        problem = f"still loading after {2 * time_limit:.0f} s (stopped)"
    except GemmaError as e:
        if not _names_a_file(str(e), directory):
            problem = f"GemmaError without the file's name: {e}"[:300]
    except Exception as e:  # noqa: BLE001 (any other exception is the finding)
        problem = f"{type(e).__name__}: {e}"[:300]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    if problem is None and seconds > time_limit:
        problem = f"took {seconds:.1f} s"
    # float32 reads of bfloat16 weights take twice their bytes; the rest is slack.
    if problem is None and peak > 2 * size + slack_bytes:
        problem = f"allocated {peak} bytes for a {size}-byte checkpoint"
    if problem is None and rss_before is not None:
        grown = _status_bytes("VmHWM") - rss_before
        if grown > 2 * size + RSS_SLACK_BYTES:
            problem = f"resident memory grew by {grown} bytes for a {size}-byte checkpoint"
    return problem


def _names_a_file(message: str, directory: pathlib.Path) -> bool:
    return str(directory) in message or any(
        p.name in message for p in directory.rglob("*") if p.is_file())
