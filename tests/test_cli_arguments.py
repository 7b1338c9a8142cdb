"""Every `gemma-keras` command fed wrong arguments (issue 32): each is one line on stderr and
exit status 2, never a traceback, never a run that goes ahead. Also `--adapter` for generate
and chat, and what an interrupted `finetune` says.

Everything runs in this process (`cli.main`, as the docs/cli.md block's test does): most mistakes
are refused before Keras loads, and the rest after loading the bundled demo, which is cached
after the first load (~0.1 s a row). The code paths do not depend on the backend: once."""

import contextlib
import io
import pathlib
import re
import shlex

import numpy as np
import pytest

from gemma_keras import cli

pytestmark = pytest.mark.once("jax")

CONTEXT = "8192"  # the demo's context (its card); rows past it say so

# (command line, a regex the one line must match: it names the argument or file).
# Files these lines use are made by `workdir`: data.jsonl (good), notjson.jsonl, badline.jsonl,
# afile.txt, adir/ and emptydir/, old.lora.h5 (an existing target), corrupt.lora.h5, list.yaml.
WRONG = [
    # the command itself
    ("", "required: command"),
    ("frobnicate", "invalid choice: 'frobnicate'"),
    ("--backend mxnet presets", "--backend"),
    ("presets extra", "unrecognized arguments: extra"),
    ("inspect a b", "unrecognized arguments: b"),
    ("inspect nowhere_xyz", "nowhere_xyz"),
    ("inspect ./afile.txt", "afile.txt"),
    ("inspect emptydir", "config.json"),
    # generate: the prompt, the model, the adapter
    ("generate ''", "empty prompt"),
    ("generate", "no prompt"),  # and nothing on stdin
    ("generate --frobnicate x", "unrecognized arguments: --frobnicate"),
    ("generate --preset gema_demo x", "gema_demo"),
    ("generate --preset ./afile.txt x", "afile.txt"),
    ("generate --preset emptydir x", "config.json"),
    ("generate --dtype int8 x", "--dtype"),
    ("generate --quantize int2 x", "--quantize"),
    ("generate --block-size 32 x", "--block-size"),
    ("generate --quantize int4 --block-size 0 x", "--block-size"),
    ("generate --quantize int4 --block-size -2 x", "--block-size"),
    ("generate --quantize int4 --block-size abc x", "--block-size"),
    ("generate --adapter missing.lora.h5 x", "missing.lora.h5"),
    ("generate --adapter adir x", "adir"),
    ("generate --adapter corrupt.lora.h5 x", "corrupt.lora.h5"),
    # generate: counts, numbers and their combinations
    ("generate --max-new-tokens 0 x", "--max-new-tokens"),
    ("generate --max-new-tokens -3 x", "--max-new-tokens"),
    ("generate --max-new-tokens abc x", "--max-new-tokens"),
    ("generate --max-new-tokens 1.5 x", "--max-new-tokens"),
    ("generate --max-new-tokens 100000 x", CONTEXT),
    ("generate --min-new-tokens -1 x", "--min-new-tokens"),
    ("generate --min-new-tokens abc x", "--min-new-tokens"),
    ("generate --min-new-tokens 10 --max-new-tokens 5 x", "min.new.tokens"),
    ("generate --sampler foo x", "--sampler"),
    ("generate --sampler greedy --temperature 0.5 x", "temperature"),
    ("generate --sampler top_k --top-p 0.5 x", "top.p"),
    ("generate --temperature -1 x", "--temperature"),
    ("generate --temperature 0 x", "--temperature"),
    ("generate --temperature nan x", "--temperature"),
    ("generate --temperature inf x", "--temperature"),
    ("generate --temperature abc x", "--temperature"),
    ("generate --top-k 0 x", "--top-k"),
    ("generate --top-k 2.5 x", "--top-k"),
    ("generate --top-p 0 x", "--top-p"),
    ("generate --top-p 1.5 x", "--top-p"),
    ("generate --top-p nan x", "--top-p"),
    ("generate --min-p 1.5 x", "--min-p"),
    ("generate --min-p -0.1 x", "--min-p"),
    ("generate --min-p nan x", "--min-p"),
    ("generate --sampler greedy --min-p 0.1 x", "min.p"),
    ("generate --repetition-penalty 0 x", "--repetition-penalty"),
    ("generate --repetition-penalty inf x", "--repetition-penalty"),
    ("generate --seed abc x", "--seed"),
    ("generate --seed -1 x", "--seed"),
    ("generate --seed 1.5 x", "--seed"),
    ("generate --seed 4294967296 x", "--seed"),
    ("generate --num-beams 0 x", "--num-beams"),
    ("generate --num-beams abc x", "--num-beams"),
    ("generate --num-beams 2 --stream x", "--stream"),
    ("generate --num-beams 2 --sampler top_p x", "num.beams"),
    ("generate --num-beams 2 --length-penalty abc x", "--length-penalty"),
    ("generate --num-beams 2 --length-penalty nan x", "--length-penalty"),
    ("generate --length-penalty 2 x", "length.penalty"),  # without beam search
    ("generate --stop '' x", "stop"),
    ("generate --draft-tokens 0 x", "--draft-tokens"),
    ("generate --draft-tokens 3 x", "draft"),  # no --draft
    ("generate --draft nowhere_xyz x", "nowhere_xyz"),
    # chat: refused before the first message (stdin is empty here)
    ("chat hello", "unrecognized arguments: hello"),
    ("chat --preset nowhere_xyz", "nowhere_xyz"),
    ("chat --quantize int2", "--quantize"),
    ("chat --quantize int4 --block-size 0", "--block-size"),
    ("chat --adapter missing.lora.h5", "missing.lora.h5"),
    ("chat --max-new-tokens 0", "--max-new-tokens"),
    ("chat --max-new-tokens 100000", CONTEXT),
    ("chat --min-new-tokens -1", "--min-new-tokens"),
    ("chat --min-new-tokens 9 --max-new-tokens 5", "min.new.tokens"),
    ("chat --sampler foo", "--sampler"),
    ("chat --sampler greedy --temperature 0.5", "temperature"),
    ("chat --temperature -1", "--temperature"),
    ("chat --top-k -1", "--top-k"),
    ("chat --top-p 2", "--top-p"),
    ("chat --min-p 2", "--min-p"),
    ("chat --repetition-penalty -1", "--repetition-penalty"),
    ("chat --seed abc", "--seed"),
    ("chat --seed -1", "--seed"),
    ("chat --draft-tokens 0", "--draft-tokens"),
    ("chat --dtype float64", "--dtype"),
    # finetune: the data, the targets, the numbers
    ("finetune", "required: data"),
    ("finetune missing.jsonl --adapter a.lora.h5", "missing.jsonl"),
    ("finetune adir --adapter a.lora.h5", "adir"),
    ("finetune notjson.jsonl --adapter a.lora.h5", "notjson.jsonl:1"),
    ("finetune badline.jsonl --adapter a.lora.h5", "badline.jsonl:2"),
    ("finetune data.jsonl", "--adapter"),
    ("finetune data.jsonl --adapter a.txt", "a.txt"),
    ("finetune data.jsonl --adapter adir", "adir"),
    ("finetune data.jsonl --adapter old.lora.h5", "--overwrite"),
    ("finetune data.jsonl --output afile.txt", "afile.txt"),
    ("finetune data.jsonl --output adir", "--overwrite"),
    ("finetune data.jsonl --adapter a.lora.h5 --preset nowhere_xyz", "nowhere_xyz"),
    ("finetune data.jsonl --adapter a.lora.h5 --dtype int8", "--dtype"),
    ("finetune data.jsonl --adapter a.lora.h5 --rank 0", "--rank"),
    ("finetune data.jsonl --adapter a.lora.h5 --rank abc", "--rank"),
    ("finetune data.jsonl --adapter a.lora.h5 --epochs -1", "--epochs"),
    ("finetune data.jsonl --adapter a.lora.h5 --batch-size 0", "--batch-size"),
    ("finetune data.jsonl --adapter a.lora.h5 --batch-size abc", "--batch-size"),
    ("finetune data.jsonl --adapter a.lora.h5 --sequence-length 0", "--sequence-length"),
    ("finetune data.jsonl --adapter a.lora.h5 --sequence-length 100000", "--sequence-length"),
    ("finetune data.jsonl --adapter a.lora.h5 --learning-rate 0", "--learning-rate"),
    ("finetune data.jsonl --adapter a.lora.h5 --learning-rate nan", "--learning-rate"),
    ("finetune data.jsonl --adapter a.lora.h5 --learning-rate inf", "--learning-rate"),
    ("finetune data.jsonl --adapter a.lora.h5 --seed abc", "--seed"),
    ("finetune data.jsonl --adapter a.lora.h5 --seed -1", "--seed"),
    # export (what argparse checks; the export's own checks are tested with export)
    ("export", "required: output"),
    ("export out --format onnx", "--format"),
    ("export out --quantize int4", "--quantize"),
    ("export out --max-length 0", "--max-length"),
    ("export out --prefill-length abc", "--prefill-length"),
    ("export out --dtype int8", "--dtype"),
    ("export out --preset nowhere_xyz", "nowhere_xyz"),
    # convert
    ("convert gemma_demo", "required: output"),
    ("convert nowhere_xyz out", "nowhere_xyz"),
    ("convert gemma_demo afile.txt", "afile.txt"),
    ("convert gemma_demo adir", "--overwrite"),
    ("convert gemma_demo out --to onnx", "--to"),
    ("convert gemma_demo out --dtype int8", "--dtype"),
    ("convert gemma_demo out --max-shard-size 0", "--max-shard-size"),
    ("convert gemma_demo out --max-shard-size nan", "--max-shard-size"),
    ("convert gemma_demo out --max-shard-size abc", "--max-shard-size"),
    # eval
    ("eval", "required: --tasks"),
    ("eval --tasks ' , '", "--tasks"),
    ("eval --tasks ./nowhere.yaml", "nowhere.yaml"),
    ("eval --tasks afile.txt", "afile.txt"),
    ("eval --tasks list.yaml", "list.yaml"),
    ("eval --tasks data.jsonl", "data.jsonl:1"),
    ("eval --tasks adir", "adir"),
    ("eval --tasks x --batch-size 0", "--batch-size"),
    ("eval --tasks x --limit 0", "--limit"),
    ("eval --tasks x --limit 1.5", "--limit"),
    ("eval --tasks x --limit nan", "--limit"),
    ("eval --tasks x --limit abc", "--limit"),
    ("eval --tasks x --num-fewshot -1", "--num-fewshot"),
    ("eval --tasks x --num-fewshot abc", "--num-fewshot"),
    ("eval --tasks x --output adir", "adir"),
    ("eval --tasks x --output afile.txt", "--overwrite"),
    ("eval --tasks x --dtype int8", "--dtype"),
    ("eval --tasks x --quantize int2", "--quantize"),
    ("eval --tasks x --block-size 32", "--block-size"),
    ("eval --tasks x --preset nowhere_xyz", "nowhere_xyz"),
    # bench
    ("bench --batch-size 0", "--batch-size"),
    ("bench --prompt-length 0", "--prompt-length"),
    ("bench --prompt-length abc", "--prompt-length"),
    ("bench --max-new-tokens 0", "--max-new-tokens"),
    ("bench --runs 0", "--runs"),
    ("bench --quantize int2", "--quantize"),
    ("bench --quantize int4 --block-size 0", "--block-size"),
    ("bench --dtype int8", "--dtype"),
    ("bench --preset nowhere_xyz", "nowhere_xyz"),
    ("bench --prompt-length 9000 --max-new-tokens 2 --runs 1", CONTEXT),
]


def _run(line, capsys):
    capsys.readouterr()
    try:
        code = cli.main(shlex.split(line))
    except SystemExit as e:  # argparse's own (a console script's exit status is the same)
        code = e.code
    return code, *capsys.readouterr()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "data.jsonl").write_text('{"text": "json.dumps(1)"}\n{"text": "os.path"}\n')
    (tmp_path / "notjson.jsonl").write_text("not json\n")
    (tmp_path / "badline.jsonl").write_text('{"text": "fine"}\n{"prompt": 3}\n')
    (tmp_path / "afile.txt").write_text("plain text\n")
    (tmp_path / "list.yaml").write_text("- a\n- list\n")
    (tmp_path / "old.lora.h5").write_bytes(b"an older adapter")
    (tmp_path / "corrupt.lora.h5").write_bytes(b"\x89HDF\r\n" + b"\0" * 64)
    (tmp_path / "adir").mkdir()
    (tmp_path / "emptydir").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # no prompt, no chat message
    return tmp_path


def _tree(root):
    return {p.relative_to(root): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("line,needle", WRONG, ids=[line or "(none)" for line, _ in WRONG])
def test_a_wrong_argument_is_one_line_and_exit_2(workdir, capsys, line, needle):
    before = _tree(workdir)
    code, out, err = _run(line, capsys)
    lines = err.strip().splitlines()
    assert code == 2, (line, code, out[-500:], err[-2000:])
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert re.search(needle, lines[0]), lines[0]
    assert lines[0].startswith("gemma-keras"), lines[0]
    assert _tree(workdir) == before  # nothing written, nothing replaced


def _option_parsers():
    """{command: its argparse parser} from the CLI's own parser."""
    import argparse

    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, commands.choices


def test_the_table_covers_every_option_that_takes_a_value():
    """Each command is in the table, and each option with a type or a set of choices appears
    in a wrong row of its command: an option added later without a row fails here."""
    parser, commands = _option_parsers()
    rows = {}
    for line, _ in WRONG:
        words = shlex.split(line)
        command = next((w for w in words if w in commands), None)
        rows.setdefault(command, []).append(words)
    assert set(commands) <= set(rows), set(commands) - set(rows)
    rows[None] = [words for line, _ in WRONG for words in [shlex.split(line)]]  # --backend
    for command, sub in [(None, parser), *commands.items()]:
        for action in sub._actions:
            if not action.option_strings or (action.type is None and not action.choices):
                continue
            assert any(set(action.option_strings) & set(words) for words in rows[command]), (
                command, action.option_strings)


def test_help_still_exits_0(capsys):
    code, out, err = _run("generate --help", capsys)
    assert code == 0 and "--adapter" in out and err == ""


# ---- generate / chat --adapter ------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_and_merged(tmp_path_factory):
    """An adapter file for the demo whose weights move its greedy text, and the preset with
    it merged (what `finetune --output` writes): the one way the CLI had before --adapter."""
    import gemma_keras as gk

    root = tmp_path_factory.mktemp("adapter")
    lm = gk.GemmaCausalLM.from_preset("gemma_demo")
    lm.backbone.enable_lora(rank=2)
    rng = np.random.default_rng(0)
    for layer in gk.lora.projections(lm.backbone).values():
        if layer.lora_enabled:  # B starts at zero; random A and B make the adapter matter
            for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
                variable.assign(rng.normal(0, 0.5, variable.shape).astype("float32"))
    lm.save_lora_weights(root / "a.lora.h5")
    lm.merge_lora()
    lm.save_to_preset(root / "merged")
    return root / "a.lora.h5", root / "merged"


def test_generate_and_chat_with_adapter_equal_the_merged_preset(adapter_and_merged, capsys,
                                                                monkeypatch):
    adapter, merged = adapter_and_merged
    prompt = "What does str.join do?"
    texts = {}
    for command, where in [("generate", ""), ("generate", f"--adapter {adapter}"),
                           ("generate", f"--preset {merged}"), ("chat", f"--adapter {adapter}"),
                           ("chat", f"--preset {merged}")]:
        monkeypatch.setattr("sys.stdin", io.StringIO(prompt + "\n"))  # chat's one message
        words = shlex.quote(prompt) if command == "generate" else ""
        code, out, err = _run(f"{command} --max-new-tokens 8 {where} {words}", capsys)
        assert code == 0, err[-2000:]
        texts[command, where.split(" ")[0]] = out
    assert texts["generate", "--adapter"] == texts["generate", "--preset"]
    assert texts["chat", "--adapter"] == texts["chat", "--preset"]
    assert texts["generate", "--adapter"] != texts["generate", ""]  # the adapter counts


def test_adapter_on_a_quantized_model_stays_unmerged(adapter_and_merged, capsys, monkeypatch):
    """--quantize with --adapter: the adapter runs beside the int8 kernels, as QLoRA trains
    it (merging would re-quantize them); a float model gets it merged. Seen at generate's
    call, which is replaced here (the decoding itself is the test above's)."""
    from gemma_keras import lora
    from gemma_keras.causal_lm import GemmaCausalLM

    adapter, _ = adapter_and_merged
    seen = []

    def record(self, prompts, **kwargs):
        query = next(iter(lora.projections(self.backbone).values()))
        seen.append((lora.lora_state(self.backbone), query.quantization_mode))
        return ["" for _ in prompts]

    monkeypatch.setattr(GemmaCausalLM, "generate", record)
    for quantize in ("--quantize int8", ""):
        code, out, err = _run(f"generate {quantize} --adapter {adapter} x", capsys)
        assert code == 0, err[-2000:]
    (state, mode), (merged_state, float_mode) = seen
    assert mode == "int8" and state is not None and state["rank"] == 2
    assert float_mode is None and merged_state is None


# ---- finetune interrupted ------------------------------------------------------------------
class _History:
    history = {"loss": [1.0]}


@pytest.mark.parametrize("when", ["training", "saving the preset"])
def test_interrupted_finetune_says_what_was_saved(workdir, capsys, monkeypatch, when):
    """Ctrl-C (KeyboardInterrupt) during training, or while the merged preset is written
    after the adapters were saved: exit 130, one line saying what was saved where and that
    the existing target was left as it was."""
    from gemma_keras.causal_lm import GemmaCausalLM

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if when == "training":
        monkeypatch.setattr(GemmaCausalLM, "fit", interrupt)
    else:  # no training (a stand-in history); Ctrl-C halfway through writing the preset
        from gemma_keras.checkpoints import keras_hub_format

        real = keras_hub_format.atomic_directory

        @contextlib.contextmanager
        def interrupted_write(*args, **kwargs):
            with real(*args, **kwargs) as tmp:
                (pathlib.Path(tmp) / "config.json").write_text("{}")
                raise KeyboardInterrupt
            yield  # never reached: a context manager must be a generator

        monkeypatch.setattr(GemmaCausalLM, "fit", lambda self, *a, **k: _History())
        monkeypatch.setattr(keras_hub_format, "atomic_directory", interrupted_write)
    (workdir / "tuned").mkdir()
    (workdir / "tuned" / "keep").write_text("the old preset")
    before = (workdir / "tuned" / "keep").read_text()
    code, out, err = _run("finetune data.jsonl --adapter new.lora.h5 --output tuned "
                          "--overwrite --sequence-length 16", capsys)
    assert code == 130, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert "interrupted" in line and "tuned" in line and "left as it was" in line, line
    assert sorted(p.name for p in (workdir / "tuned").iterdir()) == ["keep"]
    assert (workdir / "tuned" / "keep").read_text() == before
    assert not [p for p in workdir.iterdir() if p.name.startswith(".")]  # no temporaries
    if when == "training":
        assert "nothing was saved" in line, line
        assert not (workdir / "new.lora.h5").exists()
    else:
        assert "new.lora.h5" in line and "nothing was saved" not in line, line
        assert (workdir / "new.lora.h5").is_file()

