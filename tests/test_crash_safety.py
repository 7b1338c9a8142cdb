"""Nothing lost on a crash (issue 22 part 3). Every writer (save_to_preset in both layouts,
save_lora_weights, the command line's finetune / convert / export, which is gk.export's
code) is SIGKILLed at 12 seeded points of its write, each starting from a complete old
version or none: afterwards each target is the old version (byte for byte), the new one, or
absent when there was none, with no visible leftovers; the next save removes the hidden
ones. A full disk (file size limit, and a small tmpfs where one can be mounted) is one
CheckpointError naming the target, with the old version intact. See tests/crash_points.py
for how (one fork server: ~45 s on 2 idle cores at 20 points, 20 of them the export; 12 since
the suite reached its time budget);
scripts/kill_saves.py runs more points."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

import gemma_keras as gk
from crash_points import DEFAULT

# The writers' code (file layout, temporaries, renames) is the same on every backend, and the
# fork server runs on PyTorch whatever the pass: once, in the lightest pass.
pytestmark = pytest.mark.once("torch")
POINTS = 12


@pytest.fixture(scope="module")
def crashes(pristine_hf, tmp_path_factory):
    """The fork server's results (tests/crash_points.py), run once for this file."""
    work = tmp_path_factory.mktemp("crashes")
    out = work / "results.json"
    log = work / "server.log"
    env = dict(os.environ, KERAS_BACKEND="torch")
    with open(log, "w") as f:
        # The timeout only keeps a hung fork server from hanging the suite.
        code = subprocess.call(
            [sys.executable, str(pathlib.Path(__file__).parent / "crash_points.py"),
             "--source", str(pristine_hf("gemma_mqa")[0]), "--workdir", str(work / "w"),
             "--out", str(out), "--points", str(POINTS), "--seed", "0"],
            env=env, stdout=f, stderr=subprocess.STDOUT, timeout=1200)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    assert code == 0 and out.exists(), f"the fork server failed (exit {code}):\n{tail}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("writer", DEFAULT)
def test_a_killed_save_leaves_the_old_or_the_new_version(crashes, writer):
    result = crashes[writer]
    assert not result["failures"], "\n".join(result["failures"][:20])
    assert len(result["points"]) >= POINTS, result["outcomes"]
    landed = " ".join(result["outcomes"])
    # Kills fell on both sides of the rename, so the moment that decides was covered.
    assert "old" in landed and "new" in landed, result["outcomes"]


def test_a_full_disk_is_a_checkpoint_error_and_keeps_the_old_version(crashes):
    result = crashes["full disk"]
    assert not result["failures"], "\n".join(result["failures"])
    limited = [c for c in result["cases"] if c["kind"] == "file size limit"]
    assert len(limited) == 3
    for case in limited:
        assert "file size limit" in case["message"], case


def test_a_full_tmpfs_is_a_checkpoint_error_and_keeps_the_old_version(crashes):
    result = crashes["full disk"]
    if result["skipped"]:
        pytest.skip(result["skipped"])
    full = [c for c in result["cases"] if c["kind"] == "tmpfs full"]
    assert len(full) == 3 and not result["failures"], "\n".join(result["failures"])
    for case in full:
        assert "the disk is full" in case["message"], case


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_save_killed_between_its_two_renames_is_reported_and_put_back(tmp_path):
    """Where renameat2's swap is missing, a save renames the old version aside, then the new
    one in: a crash between leaves the target missing. Loading it says where the old version
    is; the next save puts it back first (and so refuses it without overwrite)."""
    from gemma_keras.checkpoints import atomic

    target = tmp_path / "preset"
    old = tmp_path / f".preset.old-{atomic._HOST}-{_dead_pid()}-x"
    old.mkdir()
    (old / "config.json").write_text("{}")
    with pytest.raises(gk.CheckpointError, match="interrupted save.*" + old.name):
        gk.GemmaCausalLM.from_preset(target)
    with pytest.warns(UserWarning, match="put back"), pytest.raises(gk.TargetExistsError):
        atomic.check_target(target, directory=True)
    assert sorted(os.listdir(tmp_path)) == ["preset"]
    assert (target / "config.json").read_text() == "{}"


def test_leftovers_of_a_dead_process_are_removed_and_a_running_ones_kept(tmp_path):
    from gemma_keras.checkpoints import atomic

    target = tmp_path / "adapter.lora.h5"
    dead = f".{target.name}.tmp-{atomic._HOST}-{_dead_pid()}-"
    mine = atomic._prefix(target, "tmp")
    for name in (dead + "a", mine + "b", ".other.tmp-x"):
        (tmp_path / name).write_text("partial")
    atomic.check_target(target)
    assert sorted(os.listdir(tmp_path)) == sorted([mine + "b", ".other.tmp-x"])
