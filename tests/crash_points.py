"""Saves killed part-way (issue 22 part 3): after a SIGKILL at any moment of a save, each
target is the complete old version or the complete new one (absent or new when there was
none), nothing but hidden temporaries is left beside it, and the next save removes those.

Used by tests/test_crash_safety.py (a fixed, seeded budget) and scripts/kill_saves.py (more
points, and the exports' real kills). `python tests/crash_points.py --help`.

How, when importing Keras costs ~8 s a process (so: no fresh interpreter per kill point):
- This file, run as a program, is a fork server. It imports gemma_keras on PyTorch with one
  thread (no OpenMP pool exists, so fork is safe), loads the models once, and forks one
  child per kill point. The child writes and is SIGKILLed either at the k-th file-system
  event touching the output folder (a sys.addaudithook counter over open, rename/replace,
  remove, mkdir, rmdir, rmtree, chmod and atomic.py's swap; a hook runs before its
  operation), or at a seeded random time within the write measured on a first, complete
  run (h5py writes in C, where no event fires).
- The command line's writers (finetune, convert) run as `gemma_keras.cli.main` in one child,
  which loads (and trains) once: its first call to a save method becomes the fork point.
- Exports are written by a TensorFlow child process (~20 s each on 2 cores), too slow to
  repeat per point. A sitecustomize.py on that process's PYTHONPATH installs the hook
  there, which at every event in the output folder records what is on disk, i.e. what a
  SIGKILL at that moment would leave (the kernel holds everything written so far and
  nothing runs after a SIGKILL; buffers not yet written are lost either way), and lets the
  export go on. scripts/kill_saves.py can also kill it for real (--export-kills).
Comparisons are byte for byte (sha256 per file), except metadata.json's `date_saved`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import random
import shutil
import signal
import sys
import time
import traceback

HOOK_ENV = "GEMMA_KERAS_CRASH_HOOK"
# The file-system events of a save (CPython's audit events; os.replace raises os.rename).
EVENTS = {"open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.chmod",
          "shutil.rmtree", "os.truncate", "gemma_keras.atomic.exchange"}
_PATH_ARGS = {"os.rename": 2, "gemma_keras.atomic.exchange": 2}
# Where an event's dir_fd is: os.remove(path, dir_fd), os.rmdir(path, dir_fd),
# os.mkdir(path, mode, dir_fd), os.rename(src, dst, src_dir_fd, dst_dir_fd).
_DIR_FD = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 2, "os.rename": 2}


# ---- what is on disk -------------------------------------------------------------------
def _digest(path: pathlib.Path) -> str:
    data = path.read_bytes()
    if path.name == "metadata.json":  # keras-hub's date_saved differs between two saves
        try:
            value = json.loads(data)
            value.pop("date_saved", None)
            data = json.dumps(value, sort_keys=True).encode()
        except ValueError:
            pass  # a torn file: its raw bytes, which match neither reference
    return hashlib.sha256(data).hexdigest()


def snapshot(path) -> dict | None:
    """None when absent; {relative path: sha256} for a file ("") or a directory's files."""
    path = pathlib.Path(path)
    if not (path.exists() or path.is_symlink()):
        return None
    if not path.is_dir():
        return {"": _digest(path)}
    state = {}
    for item in sorted(path.rglob("*")):
        rel = str(item.relative_to(path))
        state[rel] = "<dir>" if item.is_dir() else _digest(item)
    return state


def _remove(path: pathlib.Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _place(reference: pathlib.Path, target: pathlib.Path):
    _remove(target)
    if reference.is_dir():
        shutil.copytree(reference, target)
    else:
        shutil.copy2(reference, target)


# ---- the hook, in the process being killed ----------------------------------------------
class _Hook:
    """Counts the save's file-system events under `watch`; SIGKILLs its own process at event
    `kill_at`, or records the targets' state at every event (`log`)."""

    def __init__(self, watch, kill_at=None, report_fd=None, log=None, targets=()):
        self.watch = os.path.abspath(watch)
        self.kill_at, self.report_fd, self.log = kill_at, report_fd, log
        self.targets = [pathlib.Path(t) for t in targets]
        self.count, self.first, self.names, self.busy = 0, None, [], False
        self.start = time.monotonic()

    def _watched(self, event, args):
        count = _PATH_ARGS.get(event, 1)
        for n, value in enumerate(args[:count]):
            if isinstance(value, (str, bytes, os.PathLike)):
                path = os.fsdecode(os.fspath(value))
                # shutil.rmtree removes entries relative to a directory descriptor.
                fd = args[_DIR_FD[event] + n] if event in _DIR_FD else None
                if isinstance(fd, int) and fd >= 0 and not os.path.isabs(path):
                    try:
                        path = os.path.join(os.readlink(f"/proc/self/fd/{fd}"), path)
                    except OSError:
                        pass
                path = os.path.abspath(path)
                if path == self.watch or path.startswith(self.watch + os.sep):
                    return path
        return None

    def __call__(self, event, args):
        if self.busy or event not in EVENTS:
            return
        path = self._watched(event, args)
        if path is None:
            return
        self.busy = True  # what the hook itself opens is not an event of the save
        try:
            self.count += 1
            if self.first is None:
                self.first = time.monotonic() - self.start
            self.names.append(f"{event} {os.path.relpath(path, self.watch)}")
            if self.log is not None:
                record = {"n": self.count, "event": self.names[-1],
                          "states": [snapshot(t) for t in self.targets],
                          "beside": sorted(os.listdir(self.watch))}
                with open(self.log, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if self.count == self.kill_at:
                self.send({"killed_at": self.count, "event": self.names[-1]})
                os.kill(os.getpid(), signal.SIGKILL)
        finally:
            self.busy = False

    def send(self, message):
        if self.report_fd is not None:
            os.write(self.report_fd, (json.dumps(message) + "\n").encode())


def install_from_env():
    """Called by the sitecustomize.py written by `_shim` (exports' TensorFlow process)."""
    spec = json.loads(os.environ[HOOK_ENV])
    sys.addaudithook(_Hook(spec["watch"], spec.get("kill_at"), log=spec.get("log"),
                           targets=spec["targets"]))


def _shim(workdir: pathlib.Path) -> pathlib.Path:
    folder = workdir / "shim"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import os, sys\n"
        f"if os.environ.get({HOOK_ENV!r}):\n"
        f"    sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})\n"
        "    import crash_points\n"
        "    crash_points.install_from_env()\n")
    return folder


# ---- kill points --------------------------------------------------------------------------
_child = {}  # in a forked writer: its hook


class Writer:
    """One writer under test: `targets` [(path, is directory)] in their own folder, with
    reference copies of the old version in refs/old."""

    def __init__(self, name, folder, targets, refs):
        self.name, self.folder, self.refs = name, pathlib.Path(folder), pathlib.Path(refs)
        self.targets = [(pathlib.Path(p), d) for p, d in targets]
        self.folder.mkdir(parents=True, exist_ok=True)

    def ref(self, kind, target):
        return self.refs / kind / target.name


def kill_loop(writer: Writer, points: int, seed: int, results: dict) -> bool:
    """At a fork point: the writer's first complete run (events, timing, the new version),
    then `points` kill points, then a complete run after the last kill (which must leave
    nothing beside the targets). Returns True in each forked child, which then writes and
    calls `child_done`; False in the parent once all are done and recorded in `results`."""
    from gemma_keras.checkpoints import atomic

    rng = random.Random(f"{seed}:{writer.name}")
    record = results.setdefault(writer.name, {"points": [], "failures": [],
                                              "outcomes": {}, "hidden_leftovers": 0})
    old = [snapshot(writer.ref("old", t)) for t, _ in writer.targets]
    for (target, _), reference in zip(writer.targets, old):
        _place(writer.ref("old", target), target)

    def run(kill_at=None, delay=None, fallback=False):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            if fallback:  # as on a system without renameat2: two renames
                atomic._LIBC["renameat2"] = None
            _child["hook"] = _Hook(writer.folder, kill_at, write)
            sys.addaudithook(_child["hook"])
            return None
        os.close(write)
        if delay is not None:
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read) as f:
            messages = [json.loads(line) for line in f if line.strip()]
        return status, {k: v for m in messages for k, v in m.items()}

    def fail(point, problem):
        record["failures"].append(f"{writer.name} {point}: {problem}")

    def setup(begin):
        for (target, _), reference in zip(writer.targets, old):
            if begin == "absent":
                _remove(target)
            elif snapshot(target) != reference:
                _place(writer.ref("old", target), target)

    # 1. A complete run per starting point (over the old version, by renameat2's swap or by
    # the two renames of systems without it; and where there was none): the new version,
    # each one's events and timing.
    directories = any(d for _, d in writer.targets)
    configs = [("old", False)] + [("old", True)] * directories + [("absent", False)]
    dry, new = {}, None
    for config in configs:
        setup(config[0])
        outcome = run(fallback=config[1])
        if outcome is None:
            return True
        status, first = outcome
        if not first.get("done") or first.get("error"):
            fail(f"complete run {config}", first.get("error", f"exit status {status}"))
            return False
        dry[config] = first
        state = [snapshot(t) for t, _ in writer.targets]
        if new is None:
            new = state
        elif state != new:
            fail(f"complete run {config}", "wrote another new version than the first run")
    (writer.refs / "new").mkdir(parents=True, exist_ok=True)
    for target, _ in writer.targets:
        _place(target, writer.ref("new", target))
    first = dry[configs[0]]
    record.update(events=first["events"], event_names=first["names"],
                  write_seconds=first["end"] - (first["first"] or 0))
    if any(n == o for n, o in zip(new, old)):
        fail("complete run", "the new version equals the old one: the test cannot tell them "
             "apart")
        return False
    # 2. The plan: kills at events, chosen among each run's: always every rename and swap,
    # then mostly the commit phase (from the first rename, swap or removal on: where order
    # matters), some earlier ones; a quarter at seeded random times within a write (C code,
    # h5py's, raises no events).
    n_time = max(4, points // 4)
    must, commit, rest = [], [], []
    for config in configs:
        names = [name.split()[0] for name in dry[config]["names"]]
        deciding = [i for i, n in enumerate(names) if n in (
            "os.rename", "gemma_keras.atomic.exchange", "shutil.rmtree", "os.remove",
            "os.rmdir")]
        for i, name in enumerate(names):
            point = (config, i + 1)
            if name in ("os.rename", "gemma_keras.atomic.exchange"):
                must.append(point)
            elif deciding and i >= deciding[0]:
                commit.append(point)
            else:
                rest.append(point)
    room = max(0, points - n_time - len(must))
    picked = rng.sample(commit, min(len(commit), room * 2 // 3))
    picked += rng.sample(rest, min(len(rest), room - len(picked)))
    plan = [dict(kill_at=k, start=c[0], fallback=c[1]) for c, k in must + sorted(picked)]
    while len(plan) < points:
        config = configs[rng.randrange(len(configs))]
        window = dry[config]["first"] or 0.0, dry[config]["end"]
        plan.append(dict(delay=rng.uniform(*window), start=config[0], fallback=config[1]))
    # 3. The kill points.
    for i, point in enumerate(plan):
        label = f"point {i} {point}"
        setup(point["start"])
        outcome = run(point.get("kill_at"), point.get("delay"), point["fallback"])
        if outcome is None:
            return True
        status, message = outcome
        if message.get("error"):
            fail(label, message["error"])
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        landed = []
        for (target, is_dir), before, after in zip(writer.targets, old, new):
            state = snapshot(target)
            if state == after:
                landed.append("new")
            elif state == before and point["start"] == "old":
                landed.append("old")
            elif state is None and point["start"] == "absent":
                landed.append("absent")
            elif state is None and atomic.interrupted_save(target) is not None:
                # Killed between the fallback's two renames: the next save puts it back.
                atomic.check_target(target, overwrite=True, directory=is_dir)
                if snapshot(target) == before:
                    landed.append("restored old")
                else:
                    landed.append("lost")
                    fail(label, f"{target.name}: the old version put back is not the old one")
            else:
                landed.append("lost" if state is None else "torn")
                fail(label, f"{target.name} is neither old nor new: "
                            f"{_differences(state, before, after)}")
        names = {t.name for t, _ in writer.targets}
        beside = sorted(set(os.listdir(writer.folder)) - names)
        visible = [n for n in beside if not n.startswith(".")]
        if visible:
            fail(label, f"visible leftovers {visible}")
        record["hidden_leftovers"] += len(beside) - len(visible)
        point.update(outcome="+".join(landed), killed=killed,
                     at=message.get("event") or ("finished first" if not killed else None),
                     hidden=beside)
        record["points"].append(point)
        key = point["outcome"] + (" (fallback)" if point["fallback"] else "")
        record["outcomes"][key] = record["outcomes"].get(key, 0) + 1
        if i < len(plan) - 1:
            # What every save does first (check_target): remove the dead process's leftovers.
            for target, is_dir in writer.targets:
                atomic.check_target(target, overwrite=True, directory=is_dir)
            left = sorted(set(os.listdir(writer.folder)) - names)
            if left:
                fail(label, f"left after the next save's clean-up: {left}")
    # 4. A complete save after the last kill (its leftovers not cleaned by us): only the
    # targets remain, new.
    for (target, _), reference in zip(writer.targets, old):
        if snapshot(target) != reference:
            _place(writer.ref("old", target), target)
    outcome = run()
    if outcome is None:
        return True
    status, last = outcome
    if not last.get("done") or last.get("error"):
        fail("save after the kills", last.get("error", f"exit status {status}"))
    if [snapshot(t) for t, _ in writer.targets] != new:
        fail("save after the kills", "the targets are not the new version")
    left = sorted(set(os.listdir(writer.folder)) - {t.name for t, _ in writer.targets})
    if left:
        fail("save after the kills", f"left beside the targets: {left}")
    return False


def _differences(state, before, after):
    if state is None:
        return "absent"
    closest = min((before or {}), (after or {}), key=lambda ref: len(set(ref.items()) ^ set(
        state.items())))
    changed = sorted(set(state) ^ set(closest)) + sorted(
        k for k in set(state) & set(closest) if state[k] != closest[k])
    return f"{len(changed)} files differ from the closest version: {changed[:6]}"


def child_done(error=None):
    """The end of a forked writer: report and exit (no atexit, no pytest teardown)."""
    hook = _child["hook"]
    message = {"done": True, "events": hook.count, "names": hook.names, "first": hook.first,
               "end": time.monotonic() - hook.start}
    if error:
        message["error"] = error
    try:
        hook.send(message)
    finally:
        os._exit(0)


# ---- the writers -------------------------------------------------------------------------
def _perturbed(lm, amount):
    """`lm` with every float weight moved by `amount`: an old version that differs in every
    weights file."""
    for variable in lm.backbone.weights:
        if "float" in str(variable.dtype):
            variable.assign(variable + amount)
    return lm


def library_writers(source, workdir, points, seed, results, which):
    """save_to_preset (keras-hub and hf layouts) and save_lora_weights, forked from here."""
    import gemma_keras as gk

    lm_old = _perturbed(gk.GemmaCausalLM.from_preset(source), 0.5)
    lm_new = gk.GemmaCausalLM.from_preset(source)
    shard = 0.00004  # GB: several weights files, so more steps to be killed between
    cases = []
    for fmt in [w[len("save_to_preset["):-1] for w in which if w.startswith("save_to")]:
        def save(lm, target, fmt=fmt):
            lm.save_to_preset(target, format=fmt, max_shard_size=shard, overwrite=True)
        cases.append((f"save_to_preset[{fmt}]", "preset", True, save, save))
    lora = {}
    for name, lm, value in (("old", lm_old, 0.25), ("new", lm_new, -0.125)):
        copy = gk.GemmaCausalLM.from_preset(source)
        copy.backbone.enable_lora(rank=2)
        for variable in copy.backbone.trainable_weights:  # B starts at zero: give it values
            variable.assign(variable * 0 + value)
        lora[name] = copy
    cases.append(("save_lora_weights", "adapter.lora.h5", False,
                  lambda _, t: lora["old"].save_lora_weights(t, overwrite=True),
                  lambda _, t: lora["new"].save_lora_weights(t, overwrite=True)))
    for name, filename, is_dir, save_old, save_new in cases:
        if name not in which:
            continue
        folder = workdir / _slug(name)
        writer = Writer(name, folder / "out", [(folder / "out" / filename, is_dir)],
                        folder / "refs")
        target = writer.targets[0][0]
        save_old(lm_old, writer.ref("old", target))
        if is_dir:  # the references load, with the weights they were saved from
            _check_loads(writer.ref("old", target), lm_old, results, name)
        if kill_loop(writer, points, seed, results):
            try:
                save_new(lm_new, target)
            except BaseException:
                child_done(traceback.format_exc())
            child_done()
        if not writer.ref("new", target).exists():
            continue  # no complete run: a failure recorded already
        try:
            if is_dir:
                _check_loads(writer.ref("new", target), lm_new, results, name)
            else:
                _check_lora_loads(writer.ref("new", target), source, lora["new"], results,
                                  name)
        except Exception as e:
            results[name]["failures"].append(f"{name}: the new version does not load: {e}")


def _check_loads(directory, lm, results, name):
    import keras
    import numpy as np

    import gemma_keras as gk

    loaded = gk.GemmaCausalLM.from_preset(directory)
    for a, b in zip(loaded.backbone.weights, lm.backbone.weights):
        if not np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)):
            results[name]["failures"].append(f"{name}: {directory} loads other weights ({a.path})")
            return


def _check_lora_loads(path, source, lm, results, name):
    import keras
    import numpy as np

    import gemma_keras as gk

    loaded = gk.GemmaCausalLM.from_preset(source)
    loaded.load_lora_weights(path)
    for a, b in zip(loaded.backbone.trainable_weights, lm.backbone.trainable_weights):
        if not np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)):
            results[name]["failures"].append(f"{name}: {path} loads other adapters")
            return


def _slug(name):
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _in_child(function):
    """Runs `function()` in a forked child (keeps this process's state, e.g. a trained
    model, out of the fork server); an exception in it is raised here as RuntimeError."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        error = b""
        try:
            function()
        except BaseException:
            error = traceback.format_exc().encode()
        os.write(write, error)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        error = f.read().decode()
    os.waitpid(pid, 0)
    if error:
        raise RuntimeError(error)


def cli_writers(source, workdir, points, seed, results, which):
    """The command line's finetune (adapter + merged preset) and convert, run as cli.main in
    a child whose first save call becomes the fork point."""
    from gemma_keras import cli
    from gemma_keras.causal_lm import GemmaCausalLM

    data = workdir / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"The quick brown fox {i} jumps."})
                              for i in range(4)) + "\n")
    old_source = workdir / "old_source"
    if "cli convert" in which:
        import gemma_keras as gk

        _perturbed(gk.GemmaCausalLM.from_preset(source), 0.5).save_to_preset(old_source)
    cases = []
    if "cli finetune" in which:
        def finetune(adapter, output, seed_):
            return ["finetune", str(data), "--preset", str(source), "--adapter", str(adapter),
                    "--output", str(output), "--overwrite", "--epochs", "1", "--batch-size",
                    "2", "--sequence-length", "16", "--rank", "2", "--seed", str(seed_)]
        cases.append(("cli finetune", [("adapter.lora.h5", False), ("preset", True)],
                      lambda r: finetune(r / "adapter.lora.h5", r / "preset", 1),
                      lambda t: finetune(t[0], t[1], 0), "save_lora_weights"))
    if "cli convert" in which:
        def convert(src, output):
            return ["convert", str(src), str(output), "--overwrite"]
        cases.append(("cli convert", [("preset", True)],
                      lambda r: convert(old_source, r / "preset"),
                      lambda t: convert(source, t[0]), "save_to_preset"))
    for name, files, old_args, new_args, method in cases:
        folder = workdir / _slug(name)
        writer = Writer(name, folder / "out", [(folder / "out" / f, d) for f, d in files],
                        folder / "refs")
        (writer.refs / "old").mkdir(parents=True, exist_ok=True)
        _in_child(lambda: _expect_zero(cli.main(old_args(writer.refs / "old"))))
        if os.fork() == 0:  # the child that loads (and trains) once
            original = getattr(GemmaCausalLM, method)

            def fork_point(self, *args, **kwargs):
                setattr(GemmaCausalLM, method, original)
                if kill_loop(writer, points, seed, results):
                    return original(self, *args, **kwargs)
                with open(folder / "results.json", "w") as f:
                    json.dump(results[name], f)
                os._exit(0)

            setattr(GemmaCausalLM, method, fork_point)
            try:
                code = cli.main(new_args([t for t, _ in writer.targets]))
            except BaseException:
                if "hook" in _child:
                    child_done(traceback.format_exc())
                os._exit(1)
            if "hook" in _child:  # a forked writer that finished
                child_done(None if code == 0 else f"gemma-keras exited {code}")
            os._exit(1)  # the loading child never gets here: its loop exits
        os.wait()
        try:
            results[name] = json.loads((folder / "results.json").read_text())
        except OSError:
            results[name] = {"failures": [f"{name}: the child that loads crashed"],
                             "points": [], "outcomes": {}}


def _expect_zero(code):
    if code != 0:
        raise RuntimeError(f"gemma-keras exited {code}")


def export_writers(source, workdir, results, which, kill_points=0, seed=0):
    """gk.export / `gemma-keras export`: the TensorFlow process records the targets at each
    of its events (see the module docstring); `kill_points` more exports are SIGKILLed for
    real at seeded events."""
    import gemma_keras as gk
    from gemma_keras import cli

    shim = _shim(workdir)
    rng = random.Random(f"{seed}:export")
    for name in which:
        fmt = "litert" if "litert" in name else "saved_model"
        folder = workdir / _slug(name)
        out = folder / "out"
        out.mkdir(parents=True, exist_ok=True)
        if fmt == "litert":
            files = [(out / "model.tflite", False), (out / "model.json", False),
                     (out / "tokenizer.model", False)]
        else:
            files = [(out / "export", True)]
        # The old version: a stand-in of the same files (an export costs ~20 s); what is
        # tested is that the target is never anything but this or the finished new one.
        old = {}
        for target, is_dir in files:
            if is_dir:
                (target / "variables").mkdir(parents=True)
                (target / "saved_model.pb").write_bytes(b"old export")
                (target / "variables" / "variables.index").write_bytes(b"old index")
            else:
                target.write_bytes(b"old " + target.name.encode())
            old[target] = snapshot(target)
        log = folder / "events.jsonl"
        record = results.setdefault(name, {"points": [], "failures": [], "outcomes": {},
                                           "hidden_leftovers": 0})

        def export(kill_at=None):
            os.environ[HOOK_ENV] = json.dumps({"watch": str(out), "log": str(log),
                                               "targets": [str(t) for t, _ in files],
                                               "kill_at": kill_at})
            os.environ["PYTHONPATH"] = os.pathsep.join(
                [str(shim)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                               if p])
            target = str(files[0][0])
            if name.startswith("cli"):
                _expect_zero(cli.main(["export", "--preset", str(source), target,
                                       "--format", fmt, "--max-length", "16", "--overwrite"]))
            else:
                gk.export(gk.GemmaCausalLM.from_preset(source), target, format=fmt,
                          max_length=16, overwrite=True)

        start = time.monotonic()
        try:
            _in_child(export)
        except RuntimeError as e:
            record["failures"].append(f"{name}: the export failed: {e}")
            continue
        record["write_seconds"] = time.monotonic() - start
        new = {t: snapshot(t) for t, _ in files}
        events = [json.loads(line) for line in log.read_text().splitlines()]
        record.update(events=len(events), event_names=[e["event"] for e in events])
        for event in events:
            landed = []
            for (target, _), state in zip(files, event["states"]):
                if state == new[target]:
                    landed.append("new")
                elif state == old[target]:
                    landed.append("old")
                else:
                    landed.append("torn")
                    record["failures"].append(f"{name} event {event['n']} ({event['event']}):"
                                              f" {target.name} is neither old nor new")
            visible = [n for n in event["beside"] if not n.startswith(".")
                       and n not in {t.name for t, _ in files}]
            if visible:
                record["failures"].append(f"{name} event {event['n']}: visible {visible}")
            record["hidden_leftovers"] += sum(n.startswith(".") for n in event["beside"])
            outcome = "+".join(landed)
            record["outcomes"][outcome] = record["outcomes"].get(outcome, 0) + 1
            record["points"].append({"at": event["event"], "outcome": outcome,
                                     "mode": "state recorded at the event"})
        if any(new[t] == old[t] for t, _ in files):
            record["failures"].append(f"{name}: the export did not replace the old version")
        left = sorted(set(os.listdir(out)) - {t.name for t, _ in files})
        if left:
            record["failures"].append(f"{name}: left beside the export: {left}")
        # Real kills: the TensorFlow process SIGKILLed at a seeded event.
        for k in sorted(rng.sample(range(1, len(events) + 1), min(kill_points, len(events)))):
            for target, _ in files:
                _place_state(target, old[target], new[target], folder)
            log.unlink()
            try:
                _in_child(lambda: export(kill_at=k))
            except RuntimeError:
                pass  # the export reports its killed process; what matters is on disk
            landed = []
            for target, _ in files:
                state = snapshot(target)
                landed.append("new" if state == new[target] else
                              "old" if state == old[target] else "torn")
            if "torn" in landed:
                record["failures"].append(f"{name} killed at event {k}: {landed}")
            visible = [n for n in os.listdir(out) if not n.startswith(".")
                       and n not in {t.name for t, _ in files}]
            if visible:
                record["failures"].append(f"{name} killed at event {k}: visible {visible}")
            outcome = "+".join(landed) + " (SIGKILL)"
            record["outcomes"][outcome] = record["outcomes"].get(outcome, 0) + 1
            record["points"].append({"kill_at": k, "outcome": outcome})
        os.environ.pop(HOOK_ENV, None)


def _place_state(target, old_state, new_state, folder):
    """Puts the stand-in old version back (the real kills start from it)."""
    _remove(target)
    if old_state is None:
        return
    if "" in old_state:
        target.write_bytes(b"old " + target.name.encode())
    else:
        (target / "variables").mkdir(parents=True)
        (target / "saved_model.pb").write_bytes(b"old export")
        (target / "variables" / "variables.index").write_bytes(b"old index")


# ---- a full disk -------------------------------------------------------------------------
def full_disk(source, workdir, results, limit=4096, tmpfs=True):
    """Each library writer over an old version, with the file size limit (RLIMIT_FSIZE,
    SIGXFSZ ignored so writes fail with EFBIG) below what it writes, and, where this process
    may mount one, on a tmpfs with room for the old version only (ENOSPC): one
    CheckpointError naming the target, the old version intact, nothing left beside it."""
    import resource
    import subprocess

    import gemma_keras as gk
    from gemma_keras.errors import CheckpointError

    lm_old = _perturbed(gk.GemmaCausalLM.from_preset(source), 0.5)
    lm_new = gk.GemmaCausalLM.from_preset(source)
    for lm in (lm_old, lm_new):
        lm.backbone.enable_lora(rank=2)
        for variable in lm.backbone.trainable_weights:
            variable.assign(variable * 0 + (0.25 if lm is lm_old else -0.125))
    writers = {
        "save_to_preset[keras_hub]": ("preset", lambda lm, t: lm.save_to_preset(
            t, overwrite=True)),
        "save_to_preset[hf]": ("preset", lambda lm, t: lm.save_to_preset(
            t, format="hf", overwrite=True)),
        "save_lora_weights": ("adapter.lora.h5", lambda lm, t: lm.save_lora_weights(
            t, overwrite=True)),
    }
    out = results.setdefault("full disk", {"cases": [], "failures": [], "skipped": None})

    def attempt(kind, name, folder, save, limit_bytes=None):
        filename, write = save
        target = folder / filename
        try:
            write(lm_old, target)
        except Exception as e:  # the old version must fit: a sizing mistake of this test
            out["failures"].append(f"full disk ({kind}) {name}: the old version did not "
                                   f"fit: {e}")
            return
        before = snapshot(target)
        read, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            answer = {"error": None}
            try:
                if limit_bytes is not None:
                    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                    resource.setrlimit(resource.RLIMIT_FSIZE,
                                       (limit_bytes, resource.getrlimit(
                                           resource.RLIMIT_FSIZE)[1]))
                write(lm_new, target)
            except BaseException as e:
                answer = {"error": type(e).__name__, "message": str(e),
                          "checkpoint_error": isinstance(e, CheckpointError)}
            os.write(w, json.dumps(answer).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(read) as f:
            answer = json.loads(f.read() or "{}")
        _, status = os.waitpid(pid, 0)
        case = dict(kind=kind, writer=name, status=status, **answer)
        problems = []
        if not answer.get("checkpoint_error"):
            problems.append(f"not a CheckpointError: {answer}")
        elif str(target) not in answer["message"]:
            problems.append(f"the message does not name {target}: {answer['message']}")
        if snapshot(target) != before:
            problems.append("the old version changed")
        left = sorted(set(os.listdir(folder)) - {filename})
        if left:
            problems.append(f"left beside it: {left}")
        case["problems"] = problems
        out["cases"].append(case)
        out["failures"] += [f"full disk ({kind}) {name}: {p}" for p in problems]

    for name, save in writers.items():
        folder = workdir / "rlimit" / _slug(name)
        folder.mkdir(parents=True)
        attempt("file size limit", name, folder, save, limit)
    if not tmpfs:
        out["skipped"] = "not asked (--no-tmpfs)"
        return
    for name, save in writers.items():
        # Room for the old version and a quarter of the new one.
        probe = workdir / "probe" / _slug(name)
        probe.mkdir(parents=True)
        save[1](lm_old, probe / save[0])
        written = probe / save[0]
        files = list(written.rglob("*")) if written.is_dir() else [written]
        # tmpfs counts whole pages: each file and folder takes at least one.
        used = sum(-(-p.stat().st_size // 4096) if p.is_file() else 1 for p in files) + 1
        folder = workdir / "tmpfs" / _slug(name)
        folder.mkdir(parents=True)
        pages = used + used // 4 + 1
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages * 4096}", "tmpfs",
                                str(folder)], capture_output=True, text=True)
        if mount.returncode != 0:
            out["skipped"] = (f"cannot mount a tmpfs here ({mount.stderr.strip() or 'mount '}"
                              f"exit {mount.returncode}); the file size limit covers the "
                              "same error path")
            return
        try:
            attempt("tmpfs full", name, folder, save)
        finally:
            subprocess.run(["umount", str(folder)], capture_output=True)


# ---- the fork server -----------------------------------------------------------------------
LIBRARY = ("save_to_preset[keras_hub]", "save_to_preset[hf]", "save_lora_weights")
CLI = ("cli finetune", "cli convert")
EXPORTS = ("cli export", "gk.export", "gk.export litert")
DEFAULT = LIBRARY + CLI + ("cli export",)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="a checkpoint directory or preset")
    parser.add_argument("--workdir", required=True, help="an empty folder to write in")
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--points", type=int, default=20, help="kill points per writer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--writers", nargs="*", default=list(DEFAULT),
                        help=f"of {LIBRARY + CLI + EXPORTS}")
    parser.add_argument("--export-kills", type=int, default=0,
                        help="exports also SIGKILLed for real at this many seeded events")
    parser.add_argument("--no-full-disk", action="store_true")
    parser.add_argument("--no-tmpfs", action="store_true")
    args = parser.parse_args(argv)
    # One thread before torch is imported: fork is safe without an OpenMP pool.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["KERAS_BACKEND"] = "torch"
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    workdir = pathlib.Path(args.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    server = os.getpid()
    results, timings = {}, {}
    steps = [
        (lambda: library_writers(args.source, workdir / "library", args.points, args.seed,
                                 results, [w for w in LIBRARY if w in args.writers])
         if any(w in args.writers for w in LIBRARY) else None, "library"),
        (lambda: cli_writers(args.source, workdir / "cli", args.points, args.seed, results,
                             [w for w in CLI if w in args.writers])
         if any(w in args.writers for w in CLI) else None, "cli"),
        (lambda: export_writers(args.source, workdir / "export", results,
                                [w for w in EXPORTS if w in args.writers], args.export_kills,
                                args.seed)
         if any(w in args.writers for w in EXPORTS) else None, "export"),
        (lambda: None if args.no_full_disk else full_disk(
            args.source, workdir / "full_disk", results, tmpfs=not args.no_tmpfs),
         "full disk"),
    ]
    for step, name in steps:
        (workdir / name.replace(" ", "_")).mkdir(exist_ok=True)
        start = time.monotonic()
        step()
        assert os.getpid() == server  # a forked writer never returns here
        timings[name] = round(time.monotonic() - start, 1)
    results["seconds"] = timings
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
