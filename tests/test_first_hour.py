"""A new user's first hour (issue 16): the backend chosen for them, one overwrite policy, the
command line's input and error handling, offline `inspect`, the LiteRT runner's errors, HF
checkpoints with a chat template, and a non-editable install into a fresh venv."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time

import pytest

import gemma_keras as gk
from conftest import one_line_error

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---- helpers -------------------------------------------------------------------------------
def _hiding(tmp_path, *modules):
    """A PYTHONPATH folder whose sitecustomize makes `modules` uninstalled for the child:
    every finder is wrapped to find nothing for them, so importlib.util.find_spec returns None
    and `import` fails, as for a package that is not there (raising from find_spec instead
    breaks libraries that probe for others, as torch probes for tensorflow)."""
    folder = tmp_path / f"hide_{'_'.join(modules)}"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys
        HIDDEN = {modules!r}

        class _Hide:
            def __init__(self, finder):
                self._finder = finder

            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in HIDDEN:
                    return None
                return self._finder.find_spec(name, path, target)

            def __getattr__(self, name):  # invalidate_caches, find_distributions
                return getattr(self._finder, name)

        sys.meta_path[:] = [_Hide(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
        """))
    return folder


def _env(tmp_path, hide=(), keras_json=None, **extra):
    """The environment of a new user: no KERAS_BACKEND, their own KERAS_HOME."""
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "PYTHONPATH")}
    home = tmp_path / "keras_home"
    home.mkdir(exist_ok=True)
    if keras_json is not None:
        (home / "keras.json").write_text(json.dumps({"backend": keras_json}))
    env["KERAS_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join([str(_hiding(tmp_path, *hide))] if hide else [])
    env.update(extra)
    return env


def _run(args, env=None, stdin=None, timeout=300, cwd=REPO):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env or dict(os.environ),
                          input=stdin, capture_output=True, text=True, timeout=timeout)


def _cli(args, env=None, stdin=None, timeout=300):
    return _run(["-m", "gemma_keras.cli", *args], env, stdin, timeout)


@pytest.fixture(scope="module")
def demo():
    return gk.GemmaCausalLM.from_preset("gemma_demo")


# ---- defect 1: the backend --------------------------------------------------------------------
# A child that imports gemma_keras, then Keras itself (issue 32: the user's own `import keras`
# met Keras' default, TensorFlow), and prints the backend Keras runs on.
_IMPORT_KERAS = "import gemma_keras as gk; import keras; print(keras.backend.backend())"
# The command line, in a child that then prints the backend it settled (`inspect` of a
# directory settles it, imports Keras and reads a config: no model is built).
_CLI_THEN_BACKEND = ("import sys; from gemma_keras import cli; rc = cli.main(sys.argv[1:]); "
                     "import keras; print(rc, keras.backend.backend())")
DEMO_DIR = str(REPO / "presets" / "gemma_demo")
NOTICE = "gemma_keras: using the"  # how choice.py says which backend it chose, and why


@pytest.mark.once("torch")  # spawns its own children; in the lightest pass
def test_a_backend_chosen_for_a_new_user_is_recorded_and_kept(tmp_path):
    """Issue 32, 1, 2 and 11: only torch installed, no keras.json: `import keras` after
    `import gemma_keras` runs on torch, and keras.json records it (Keras' own keys), said
    once. After TensorFlow and JAX are installed too, later runs (the CLI's too) keep torch,
    silently. KERAS_BACKEND and then --backend still win, and an explicit choice made before
    any keras.json exists is what gets recorded."""
    keras_json = tmp_path / "keras_home" / "keras.json"
    first = _run(["-c", _IMPORT_KERAS], _env(tmp_path, hide=("jax", "tensorflow")))
    assert first.returncode == 0 and first.stdout.strip() == "torch", first.stderr[-3000:]
    assert first.stderr.count("using the torch backend") == 1, first.stderr
    assert str(keras_json) in first.stderr and "KERAS_BACKEND" in first.stderr
    recorded = json.loads(keras_json.read_text())
    # What Keras itself writes (keras/src/backend/config.py), with the backend in use; Keras
    # validated the rest when the child imported it.
    assert list(recorded) == ["floatx", "epsilon", "backend", "image_data_format"]
    assert recorded["backend"] == "torch"

    # Everything installed now, no choice: torch is kept, and nothing more is said.
    later = _run(["-c", _CLI_THEN_BACKEND, "inspect", DEMO_DIR], _env(tmp_path))
    assert later.returncode == 0, later.stderr[-3000:]
    assert later.stdout.strip().splitlines()[-1] == "0 torch"
    assert NOTICE not in later.stderr, later.stderr

    # An explicit KERAS_BACKEND wins over the recorded backend and does not replace it.
    explicit = _run(["-c", _IMPORT_KERAS], _env(tmp_path, KERAS_BACKEND="jax"))
    assert explicit.returncode == 0 and explicit.stdout.strip() == "jax", explicit.stderr
    assert NOTICE not in explicit.stderr
    assert json.loads(keras_json.read_text()) == recorded

    # --backend wins over KERAS_BACKEND; with no keras.json yet the backend that ran is
    # recorded (not Keras' default, TensorFlow), silently: it was the user's choice.
    other_home = tmp_path / "other_home"
    flag = _run(["-c", _CLI_THEN_BACKEND, "--backend", "jax", "inspect", DEMO_DIR],
                _env(tmp_path, KERAS_BACKEND="torch", KERAS_HOME=str(other_home)))
    assert flag.returncode == 0, flag.stderr[-3000:]
    assert flag.stdout.strip().splitlines()[-1] == "0 jax"
    assert NOTICE not in flag.stderr, flag.stderr
    assert json.loads((other_home / "keras.json").read_text())["backend"] == "jax"


@pytest.mark.once("jax")
def test_an_existing_keras_json_naming_a_missing_backend_is_left_alone(tmp_path):
    """keras.json says tensorflow (as Keras writes it) and TensorFlow is not installed here:
    the run falls back to the first installed backend, for this run only, and says so with
    how to choose; the file, shared by every Python environment of the user (one with
    TensorFlow runs on it), is not rewritten. The user's own `import keras` agrees."""
    env = _env(tmp_path, hide=("tensorflow",))
    keras_json = tmp_path / "keras_home" / "keras.json"
    written = json.dumps({"floatx": "float32", "epsilon": 1e-07, "backend": "tensorflow",
                          "image_data_format": "channels_last"}, indent=4)
    keras_json.write_text(written)
    api = _run(["-c", "import gemma_keras as gk; gk.GemmaCausalLM; gk.GemmaTokenizer; "
                      "import keras; print(keras.backend.backend())"], env)
    assert api.returncode == 0 and api.stdout.strip() == "jax", api.stderr[-3000:]
    assert api.stderr.count("using the jax backend") == 1, api.stderr
    assert "'tensorflow', which is not installed" in api.stderr
    assert "KERAS_BACKEND" in api.stderr and "--backend" in api.stderr
    assert str(keras_json) in api.stderr
    assert keras_json.read_text() == written


@pytest.mark.once("jax")
@pytest.mark.parametrize("args,extra,needles", [
    (["--backend", "torch", "generate", "x"], {}, ["--backend='torch'",
                                                   'pip install "gemma-keras[torch]"']),
    (["generate", "x"], {"KERAS_BACKEND": "torch"}, ["KERAS_BACKEND='torch'",
                                                     'pip install "gemma-keras[torch]"']),
    (["generate", "x"], {"KERAS_BACKEND": "cuda"}, ["KERAS_BACKEND='cuda'",
                                                    "jax, torch or tensorflow"]),
])
def test_an_explicit_backend_that_cannot_run_is_one_line(tmp_path, args, extra, needles):
    env = _env(tmp_path, hide=("torch",), **extra)
    one_line_error(_cli(args, env), *needles)


@pytest.mark.once("jax")
def test_python_api_names_the_extra_for_a_missing_backend(tmp_path):
    env = _env(tmp_path, hide=("torch",), KERAS_BACKEND="torch")
    code = ("import sys, gemma_keras as gk\n"
            "try:\n    gk.GemmaCausalLM\n"
            "except gk.BackendError as e:\n    print(e)\n"
            "print('keras' in sys.modules)\n")
    result = _run(["-c", code], env)
    assert result.returncode == 0, result.stderr[-2000:]
    message, keras_imported = result.stdout.strip().splitlines()
    assert 'pip install "gemma-keras[torch]"' in message and keras_imported == "False"
    assert not (tmp_path / "keras_home" / "keras.json").exists()  # nothing ran: no choice


# ---- defect 3: one overwrite policy -----------------------------------------------------------
@pytest.mark.parametrize("format", ["keras_hub", "hf"])
def test_save_to_preset_refuses_an_existing_target_unless_overwrite(demo, tmp_path, format):
    target = tmp_path / "preset"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    with pytest.raises(gk.TargetExistsError, match="overwrite=True"):
        demo.save_to_preset(target, format=format)
    assert sorted(p.name for p in target.iterdir()) == ["mine.txt"]
    demo.save_to_preset(target, format=format, overwrite=True)
    assert (target / "config.json").is_file() and not (target / "mine.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preset"]  # no temporaries left


def test_lora_weights_refuse_an_existing_file_and_merge_needs_adapters(tmp_path):
    lm = gk.GemmaCausalLM.from_preset("gemma_demo")
    with pytest.raises(gk.ConfigError, match="no LoRA adapters to merge"):
        lm.merge_lora()
    lm.backbone.enable_lora(rank=2)
    path = tmp_path / "a.lora.h5"
    path.write_bytes(b"someone else's file")
    with pytest.raises(gk.TargetExistsError, match="overwrite=True"):
        lm.save_lora_weights(path)
    assert path.read_bytes() == b"someone else's file"
    lm.save_lora_weights(path, overwrite=True)
    fresh = gk.GemmaCausalLM.from_preset("gemma_demo")
    fresh.load_lora_weights(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.lora.h5"]


def test_export_refuses_an_existing_target_before_any_work(demo, tmp_path):
    (tmp_path / "saved").mkdir()
    (tmp_path / "m.tflite").write_bytes(b"an older export")
    for path, format in ((tmp_path / "saved", "saved_model"), (tmp_path / "m.tflite", "litert")):
        start = time.perf_counter()
        with pytest.raises(gk.TargetExistsError, match="overwrite=True"):
            gk.export(demo, path, format=format)
        assert time.perf_counter() - start < 2  # refused before tracing anything
    assert (tmp_path / "m.tflite").read_bytes() == b"an older export"


@pytest.mark.once("torch")
def test_cli_finetune_overwrite_policy_seed_and_one_epoch_loss(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"json.dumps({i})"}) for i in range(4)))
    nowhere = _cli(["finetune", str(data)])
    one_line_error(nowhere, "--adapter", "--output", "nothing was trained")
    adapter = tmp_path / "a.lora.h5"
    adapter.write_bytes(b"old")
    refused = _cli(["finetune", str(data), "--adapter", str(adapter)])
    one_line_error(refused, str(adapter), "--overwrite")
    assert "Epoch" not in refused.stdout and adapter.read_bytes() == b"old"
    args = ["finetune", str(data), "--adapter", str(adapter), "--overwrite", "--seed", "1",
            "--sequence-length", "16", "--batch-size", "4", "--learning-rate", "1e-3"]
    runs = [_cli(args) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
        assert "(mean over the epoch)" in run.stdout and " -> " not in run.stdout
    losses = [[line for line in run.stdout.splitlines() if line.startswith("loss:")]
              for run in runs]
    assert losses[0] == losses[1]  # --seed: the same adapters' start and data order
    fresh = gk.GemmaCausalLM.from_preset("gemma_demo")
    fresh.load_lora_weights(adapter)  # the old bytes were replaced by a real adapter file


@pytest.mark.once("tensorflow")
def test_cli_convert_and_export_refuse_then_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    one_line_error(_cli(["convert", "gemma_demo", str(out)]), "already exists", "--overwrite")
    one_line_error(_cli(["export", str(out)]), "already exists", "--overwrite")
    result = _cli(["convert", "gemma_demo", str(out), "--overwrite"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "config.json").is_file()
    # Backend start-up noise (oneDNN, CUDA stubs, absl's preamble) stays off the terminal.
    for noise in ("oneDNN", "cuda", "absl", "I0000"):
        assert noise not in result.stderr, result.stderr


# ---- defect 5 (CLI): the prompt from stdin ---------------------------------------------------
@pytest.mark.once("torch")
def test_cli_stdin_prompt(demo):
    one_line_error(_cli(["generate"], stdin=""), "no prompt")
    one_line_error(_cli(["generate", ""]), "empty prompt")
    # The piped prompt, its trailing newline dropped, is what `generate("x(")` completes (the
    # CLI's prompt-as-argument path is compared to lm.generate in the docs/cli.md block's test,
    # which also checks that a chat-templated answer shows no turn markers).
    piped = _cli(["generate", "--max-new-tokens", "6"], stdin="x(\n")
    assert piped.returncode == 0, piped.stderr[-2000:]
    expected = demo.generate("x(", max_new_tokens=6)
    assert piped.stdout == expected + "\n" and piped.stdout.startswith("x(")


# ---- defect 7: offline inspect -----------------------------------------------------------------
@pytest.mark.once("jax")
def test_cli_inspect_reads_the_card_offline_and_defaults_to_the_demo():
    code = ("import sys; from gemma_keras import cli\n"
            "rc = cli.main(['inspect', 'gemma2_2b_en'])\n"
            "print('keras imported:', 'keras' in sys.modules, 'rc', rc)\n")
    result = _run(["-c", code])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2,614,341,888" in result.stdout and "sliding_window_size" in result.stdout
    assert "keras imported: False rc 0" in result.stdout  # nothing loaded, nothing downloaded
    default = _cli(["inspect"])
    assert default.returncode == 0, default.stderr[-2000:]
    assert "gemma_demo" in default.stdout and "4,198,656 params" in default.stdout


# ---- defect 8: the LiteRT runner ---------------------------------------------------------------
@pytest.mark.once("jax")
def test_runner_wrong_paths_are_one_line(tmp_path):
    runner = ["-m", "gemma_keras.exporting.runner"]
    one_line_error(_run([*runner, str(tmp_path / "no.tflite"), "x"]), "no such file")
    one_line_error(_run([*runner, str(REPO / "README.md"), "x"]), "not a .tflite file")
    one_line_error(_run([*runner, str(tmp_path), "x"]), "without model.tflite")


# ---- defect 9 ----------------------------------------------------------------------------------
def test_python_preset_typo_points_at_list_presets():
    with pytest.raises(gk.UnknownPresetError, match=r"gk\.list_presets\(\)"):
        gk.GemmaCausalLM.from_preset("gemma2_2b")


@pytest.mark.once("jax")
@pytest.mark.parametrize("args,needle", [
    (["generate", "--preset", "gemma2_2b", "x"], "`gemma-keras presets`"),
    (["chat", "--preset", "/no/such/dir"], "no such directory"),
    (["export", "--preset", "kaggle://keras/gemma", "out"], "not a Kaggle model handle"),
])
def test_cli_preset_mistakes_come_before_keras_loads(args, needle):
    code = ("import sys; from gemma_keras import cli\n"
            f"rc = cli.main({args!r})\n"
            "print('keras imported:', 'keras' in sys.modules, 'rc', rc)\n")
    result = _run(["-c", code])
    assert "keras imported: False rc 2" in result.stdout, result.stderr[-2000:]
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert "gk.list_presets" not in result.stderr


# ---- HF checkpoints: tokenizer.json and the chat template --------------------------------------
@pytest.mark.parametrize("with_transformers", [True, False])
def test_hf_checkpoint_carries_the_chat_template(hf_checkpoint, tmp_path, monkeypatch,
                                                  with_transformers):
    import transformers

    lm = gk.GemmaCausalLM.from_preset(hf_checkpoint("gemma_mqa")[0])
    out = tmp_path / "hf_out"
    if not with_transformers:  # saving must not need it: tokenizer.model + config suffice
        monkeypatch.setitem(sys.modules, "transformers", None)
    lm.save_to_preset(out, format="hf")
    monkeypatch.undo()
    assert (out / "tokenizer.json").is_file() == with_transformers
    assert (out / "tokenizer_config.json").is_file() and (out / "tokenizer.model").is_file()
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    one = [{"role": "user", "content": "What is Keras?"}]
    assert hf.apply_chat_template(one, tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nWhat is Keras?<end_of_turn>\n<start_of_turn>model\n")
    conversation = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "What is Keras?"},
                    {"role": "assistant", "content": "A deep learning API."},
                    {"role": "user", "content": "And 12 x 7?"}]
    text = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    from gemma_keras.tokenizer import format_chat

    ours = format_chat([("user", "Be brief.\n\nWhat is Keras?"),
                        ("model", "A deep learning API."), ("user", "And 12 x 7?")])
    assert text == "<bos>" + ours
    ids = hf.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == lm.tokenizer.tokenize(ours, add_bos=True)
    for sample in ("Keras is 12 x\n  y é€", "  leading spaces", "The quick brown fox 7"):
        assert hf.encode(sample) == lm.tokenizer.tokenize(sample, add_bos=True)


# ---- done means: a non-editable install in a fresh venv ----------------------------------------
def _shadow_site_packages(tmp_path):
    """The main venv's installed packages without TensorFlow and without the editable
    gemma_keras, as symlinks: the fresh venv sees jax and keras (no download needed) but its
    gemma_keras is the wheel installed into it."""
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    shadow = tmp_path / "shadow_site"
    shadow.mkdir()
    hidden = ("tensorflow", "tf_keras", "gemma_keras", "gemma-keras", "__editable__",
              "_gemma_keras", "tensorboard")
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.endswith(".pth") or name.startswith(hidden) or name.replace("-", "_").startswith(
                hidden):
            continue
        (shadow / entry.name).symlink_to(entry)
    return shadow


# Its children run without KERAS_BACKEND (JAX, TensorFlow hidden) whichever pass runs it.
@pytest.mark.once("torch")
def test_fresh_non_editable_install_runs_the_readme(tmp_path):
    source = tmp_path / "src"  # built from a copy: the build writes build/ and egg-info
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("gemma_keras", "presets"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    # Defect 9: the package layout installs without setuptools warnings.
    assert "preset_cards" not in built.stdout + built.stderr
    assert "Warning" not in built.stdout + built.stderr, built.stdout + built.stderr
    wheel = next((tmp_path / "dist").glob("gemma_keras-*.whl"))

    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                                "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    fresh_site = pathlib.Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    (fresh_site / "main_venv_packages.pth").write_text(str(_shadow_site_packages(tmp_path)))

    env = {k: v for k, v in os.environ.items()
           if k not in ("KERAS_BACKEND", "PYTHONPATH", "VIRTUAL_ENV")}
    env["KERAS_HOME"] = str(tmp_path / "new_keras_home")  # no keras.json: Keras' default, TF
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    work = tmp_path / "work"  # not the repository: its gemma_keras must not be imported
    work.mkdir()
    generate = subprocess.run([str(venv / "bin" / "gemma-keras"), "generate",
                               "--max-new-tokens", "8", "json.dumps("], cwd=work, env=env,
                              capture_output=True, text=True, timeout=300)
    assert generate.returncode == 0, generate.stderr[-3000:]
    assert generate.stdout.startswith("json.dumps(") and len(generate.stdout) > 13
    assert generate.stderr.count("using the jax backend") == 1, generate.stderr
    quickstart = textwrap.dedent("""
        import json
        import gemma_keras as gk
        print(gk.__file__)
        lm = gk.GemmaCausalLM.from_preset("gemma_demo")
        print(json.dumps(lm.generate("What is Keras?", max_new_tokens=32)))
        """)
    result = subprocess.run([str(python), "-c", quickstart], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    where, text = result.stdout.strip().splitlines()
    assert where.startswith(str(fresh_site)), where  # the wheel, not the editable checkout
    text = json.loads(text)
    assert text.startswith("What is Keras?") and len(text) > len("What is Keras?"), text
    # The first run recorded the backend it chose in keras.json (before Keras could write its
    # default, TensorFlow, there), and said so; the second run kept it without a word.
    assert json.loads((tmp_path / "new_keras_home" / "keras.json").read_text())["backend"] \
        == "jax"
    assert NOTICE not in result.stderr, result.stderr
