"""The command line and the guides, run as a user runs them (subprocesses)."""

import os
import subprocess
import sys

import pytest


def _run(args, cwd, timeout=300):
    env = dict(os.environ)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_quickstart_guide_runs(repo_root):
    result = _run(["guides/quickstart.py"], repo_root)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "same logits: True" in result.stdout
    assert "generated token ids: [" in result.stdout


def test_lora_guide_improves_held_out_accuracy(repo_root):
    result = _run(["guides/finetune_lora.py", "--epochs", "8"], repo_root)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "improved held-out accuracy: True" in result.stdout
    assert "accuracy before: held-out 0%" in result.stdout


def test_cli_presets_lists_every_card(repo_root):
    import gemma_keras as gk

    result = _run(["-m", "gemma_keras.cli", "presets"], repo_root)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in gk.list_presets():
        assert name in result.stdout


def test_cli_inspect_a_checkpoint(repo_root, hf_checkpoint):
    directory, _ = hf_checkpoint("gemma2_gqa")
    result = _run(["-m", "gemma_keras.cli", "inspect", str(directory)], repo_root)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "hf checkpoint" in result.stdout and "sliding_window_size" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["inspect", "gemma2_2b"], "Did you mean: gemma2_2b_en"),
    (["inspect", "/no/such/dir"], "no such directory"),
])
def test_cli_user_errors_have_no_traceback(repo_root, args, message):
    result = _run(["-m", "gemma_keras.cli", *args], repo_root)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_cli_bad_arguments(repo_root):
    result = _run(["-m", "gemma_keras.cli", "frobnicate"], repo_root)
    assert result.returncode == 2 and "invalid choice" in result.stderr
