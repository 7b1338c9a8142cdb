"""`gemma-keras`: generate, chat, fine-tune, export, convert and benchmark Gemma from the
shell.

Every command defaults to the bundled demo preset (`gemma_demo`), so each works offline on a
fresh install. User mistakes (a wrong path, a bad file, an argument out of range) print one
line on stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import tempfile
import time

from gemma_keras.checkpoints import progress  # imports no Keras
from gemma_keras.checkpoints.resolve import DEMO_PRESET as DEMO  # imports no Keras
EPILOG = """examples:
  gemma-keras generate "json.dumps("                        # the bundled demo preset
  gemma-keras generate --stream --sampler top_p --seed 1 "Module os"
  gemma-keras chat                                          # multi-turn, /reset, /exit
  gemma-keras --backend torch generate --preset ./my_gemma "Hello"
  gemma-keras finetune data.jsonl --epochs 2 --output ./tuned   # LoRA, then a merged preset
  gemma-keras finetune data.jsonl --adapter a.lora.h5       # the adapters alone
  gemma-keras generate --adapter a.lora.h5 "Hello"          # ... applied (chat too)
  gemma-keras export ./demo_saved_model                     # SavedModel, generate signature
  gemma-keras export --format litert --quantize int8 ./demo.tflite   # on-device prefill/decode
  gemma-keras convert ./hf_checkpoint ./keras_hub_preset     # HF safetensors -> keras-hub
  gemma-keras convert --to hf gemma_demo ./demo_hf            # keras-hub -> HF safetensors
  gemma-keras presets                                       # the built-in presets
  gemma-keras bench --max-new-tokens 64                     # decode speed on this machine
  gemma-keras generate --quantize int4 --preset gemma2_9b_en "Hi"   # quantized while loading
  gemma-keras eval --tasks hellaswag,./my_task.yaml,./items.jsonl --preset gemma2_2b_en \
      --dtype bfloat16 --output results.json    # lm-evaluation-harness: needs [eval]

A preset is a built-in name (gemma-keras presets), kaggle://owner/model/keras/variation[/v],
hf://org/repo, or a local keras-hub preset or Hugging Face checkpoint directory."""


class UsageError(Exception):
    """A mistake in what the user asked for, reported without a traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse's parser with its mistakes on one line, as every other mistake is: argparse
    prints the whole usage (up to 15 lines for generate) above the line that matters.
    Subcommands' parsers are made of the same class (argparse's add_subparsers default)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the "
                     f"options)\n")


# ---- commands ---------------------------------------------------------------------------
def _presets(args):
    from gemma_keras.checkpoints.resolve import demo_preset_directory
    from gemma_keras.presets import get_preset_card, list_presets

    print(f"{'preset':32} {'params':>15}  {'kaggle handle':52} hf repo")
    for name in list_presets():
        card = get_preset_card(name)
        print(f"{name:32} {card.parameter_count:>15,}  {card.kaggle_handle:52} "
              f"{card.hf_repo or '-'}")
    print(f"{DEMO:32} {'(bundled)':>15}  {str(demo_preset_directory()):52} -")


def _inspect(args):
    from gemma_keras.presets import get_preset_card, list_presets

    if args.preset in list_presets():
        # The card shipped in the package holds the config and counts: nothing to download.
        card = get_preset_card(args.preset)
        config = card.gemma_config()
        print(f"{card.name}: {card.description}")
        print(f"  {'parameters':30} {card.parameter_count:,}")
        print(f"  {'kaggle handle':30} {card.kaggle_handle}")
        print(f"  {'hf repo':30} {card.hf_repo or '-'}")
        print(f"  {'instruct':30} {card.instruct}")
        print(config.describe())
        for key, value in config.to_dict().items():
            print(f"  {key:30} {value}")
        return
    _settle_backend(args)
    from gemma_keras.checkpoints.loading import read_preset_config
    from gemma_keras.checkpoints.resolve import resolve_preset

    directory = resolve_preset(args.preset)
    config, dtype, fmt = read_preset_config(directory)
    print(f"{directory}: {fmt} checkpoint, saved as {dtype}")
    print(config.describe())
    for key, value in config.to_dict().items():
        print(f"  {key:30} {value}")


def _generate(args):
    lm = _with_adapter(_load(args), args)
    prompts = args.prompt
    options = _options(args, stop_strings=args.stop or None, chat_template=args.chat_template,
                       num_beams=args.num_beams, length_penalty=args.length_penalty,
                       **_drafting(args))
    if args.stream:
        if (args.num_beams or 1) > 1:  # before a prompt is printed
            raise UsageError("--stream cannot show beam search: it chooses whole "
                             "completions at the end. Drop --stream or --num-beams.")
        for prompt in prompts:
            print(prompt, end="", flush=True)
            for piece in lm.generate(prompt, stream=True, options=options):
                print(piece, end="", flush=True)
            print()
        return
    for text in lm.generate(prompts, options=options):
        print(text)


def _chat(args):
    lm = _with_adapter(_load(args), args)
    limit = lm.backbone.config.max_sequence_length
    if args.max_new_tokens >= limit:  # send() would refuse every message; say so up front
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a message "
                         f"in the model's context of {limit} tokens; lower it.")
    session = lm.chat(system=args.system, **_drafting(args))
    options = _options(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {args.preset}. /reset starts over, /exit (or Ctrl-D) ends.")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        message = line.strip()
        if not message:
            continue
        if message == "/reset":
            session.reset()
            print("(conversation cleared)")
            continue
        try:
            for piece in session.send(message, stream=True, options=options):
                print(piece, end="", flush=True)
        except ValueError as e:  # the conversation outgrew the context
            raise UsageError(str(e)) from e
        print()


def _finetune(args):
    saved = []  # the targets written so far: what an interrupted run reports
    try:
        _train_and_save(args, saved)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_interrupted(args, saved)) from None


def _train_and_save(args, saved):
    import keras

    examples = args.examples  # read and checked by _prepare, before loading
    lm = _load(args)
    if lm.preprocessor is None:
        raise UsageError(f"{args.preset} has no tokenizer; fine-tuning on text needs one.")
    limit = lm.backbone.config.max_sequence_length
    if args.sequence_length > limit:
        raise UsageError(f"--sequence-length {args.sequence_length} is longer than the model's "
                         f"context of {limit} tokens; lower it.")
    if args.seed is not None:  # LoRA's initial adapters, dropout and the data order
        keras.utils.set_random_seed(args.seed)
    lm.preprocessor.sequence_length = args.sequence_length
    lm.backbone.enable_lora(rank=args.rank)
    if args.learning_rate:
        lm.compile(optimizer=keras.optimizers.AdamW(args.learning_rate, weight_decay=0.01))
    history = lm.fit(examples, epochs=args.epochs, batch_size=args.batch_size, verbose=1)
    losses = history.history["loss"]
    if len(losses) == 1:  # one epoch has one mean: a "first -> last" would repeat it
        print(f"loss: {losses[0]:.4f} (mean over the epoch)")
    else:
        print(f"loss: {losses[0]:.4f} (epoch 1) -> {losses[-1]:.4f} (epoch {len(losses)})")
    if args.adapter:
        lm.save_lora_weights(args.adapter, overwrite=args.overwrite)
        saved.append(args.adapter)
        print(f"adapters: {args.adapter}")
    if args.output:
        # merged weights; loadable by keras-hub too
        lm.save_to_preset(args.output, overwrite=args.overwrite)
        saved.append(args.output)
        print(f"fine-tuned preset (adapters merged): {args.output}")


def _interrupted(args, saved):
    """The line a finetune stopped by Ctrl-C ends with: what was saved where, and that each
    target not written yet is as it was. Every save is atomic (a temporary name, then one
    rename: gemma_keras/checkpoints/atomic.py), so an interrupted one leaves its target
    untouched: the old version where there was one, nothing where there was none."""
    kinds = {args.adapter: "adapters", args.output: "merged preset"}
    done = "; ".join(f"{kinds[t]} saved to {t}" for t in saved) or "nothing was saved"
    untouched = [f"{t} left as it was" if os.path.lexists(t) else f"{t} not created"
                 for t in (args.adapter, args.output) if t and t not in saved]
    return f"finetune interrupted: {done}" + (f"; {', '.join(untouched)}" if untouched
                                               else "") + "."


def _convert(args):
    from gemma_keras.causal_lm import GemmaCausalLM

    start = time.perf_counter()
    print(f"reading {args.source} ...", flush=True)
    with progress.shown():  # a bar per tensor read and written
        lm = GemmaCausalLM.from_preset(args.source, dtype=args.dtype)
        print(f"  {lm.config.describe()} in {time.perf_counter() - start:.1f} s; writing "
              f"{args.output} ...", flush=True)
        lm.save_to_preset(args.output, max_shard_size=args.max_shard_size, format=args.to,
                          overwrite=args.overwrite)
    kind = "a Hugging Face checkpoint" if args.to == "hf" else "a keras-hub preset"
    print(f"wrote {kind} in {time.perf_counter() - start:.1f} s: {args.output}")


def _export(args):
    from gemma_keras.exporting import export

    start = time.perf_counter()
    print(f"reading {args.preset} ...", flush=True)
    with progress.shown():
        lm = _load(args)
    if args.adapter:  # enables LoRA as the file says; export merges it
        lm.load_lora_weights(args.adapter)
    print(f"exporting {lm.config.describe()} as {args.format} ...", flush=True)
    export(lm, args.output, format=args.format, quantize=args.quantize,
           max_length=args.max_length, prefill_length=args.prefill_length,
           allow_large_file=args.allow_large_file, overwrite=args.overwrite)
    if args.format == "litert":
        from gemma_keras.exporting.build import litert_paths

        files = litert_paths(args.output)
    else:
        files = [f for f in pathlib.Path(args.output).rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    print(f"wrote {args.output} ({size / 2 ** 20:.1f} MiB) in "
          f"{time.perf_counter() - start:.1f} s")
    if args.format == "litert":
        print(f"run it (the runner needs the LiteRT interpreter: pip install "
              f"\"gemma-keras[litert]\"): python -m gemma_keras.exporting.runner {args.output} "
              f"\"Your prompt\"")
    if lm.instruct:  # what the exported signatures / the runner do with a prompt
        print("an instruct model: the export sends a prompt as one user turn of Gemma's chat "
              "format, as generate does (runner --no-chat-template, SavedModel signature "
              "generate_no_chat_template: the text as written)")


def _bench(args):
    import keras
    import numpy as np

    lm = _load(args)
    tokens = np.random.default_rng(0).integers(
        4, lm.config.vocabulary_size, size=(args.batch_size, args.prompt_length)).astype("int32")
    if lm.tokenizer is not None:  # random ids otherwise: the speed is the same
        tokens[:, 0] = lm.tokenizer.bos_token_id
    inputs = {"token_ids": tokens, "padding_mask": np.ones_like(tokens, bool)}

    def run(new_tokens):
        start = time.perf_counter()
        lm.generate(inputs, max_new_tokens=new_tokens, stop_token_ids=None)
        return time.perf_counter() - start

    first = run(args.max_new_tokens)
    full = min(run(args.max_new_tokens) for _ in range(args.runs))
    prefill = min(run(1) for _ in range(args.runs))
    decode = args.batch_size * (args.max_new_tokens - 1) / max(full - prefill, 1e-9)
    weights = args.weights or lm.backbone.dtype_policy.name
    if args.weights == "int4":
        weights += f" (block {args.block_size or 128})"
    print(f"{args.preset} ({weights} weights) on {keras.backend.backend()}, batch "
          f"{args.batch_size}, prompt "
          f"{args.prompt_length}, {args.max_new_tokens} new tokens (best of {args.runs}):")
    print(f"  decode   {decode:8.1f} tokens/s")
    print(f"  prefill  {args.batch_size * args.prompt_length / prefill:8.1f} tokens/s")
    print(f"  first call (compilation included) {first:.2f} s")


EVAL_EXTRA = 'pip install "gemma-keras[eval]"'


def _eval(args):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from gemma_keras.checkpoints.atomic import atomic_file
    from gemma_keras.evaluation.harness import GemmaKerasLM, quiet_git_hash

    with tempfile.TemporaryDirectory(prefix="gemma_keras_eval_") as scratch:
        specs, folders, names = [], [], []
        for kind, value in args.task_specs:
            if kind == "jsonl":  # a lm-eval task YAML written for it
                specs.append(_jsonl_task(value, pathlib.Path(scratch)))
            elif kind == "folder":
                folders.append(value)
                specs += _folder_tasks(value)
            else:
                specs.append(value)
                if kind == "name":
                    names.append(value)
        # lm-eval's own task index (~15,000 tasks, seconds to scan) only when a task is named.
        manager = TaskManager(include_path=folders or None, include_defaults=bool(names))
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise UsageError(f"unknown lm-eval task {unknown[0]!r}: give a task name "
                             f"(python -m gemma_keras.evaluation ls tasks lists them), a task "
                             f"YAML file or folder, or a JSONL file of multiple-choice items.")
        model = GemmaKerasLM(lm=_load(args), batch_size=args.batch_size)
        model.preset = args.preset  # recorded in the results
        with quiet_git_hash():  # no "fatal: not a git repository" outside one
            results = lm_eval.simple_evaluate(
                model=model, tasks=specs, num_fewshot=args.num_fewshot, limit=args.limit,
                task_manager=manager, apply_chat_template=args.apply_chat_template,
                log_samples=False)
    print(f"{'task':30} {'metric':16} {'value':>10} {'stderr':>10}")
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or not _is_number(value):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            stderr = f"{stderr:.4f}" if _is_number(stderr) else "-"
            name = metric if filter_name in ("", "none") else f"{metric} ({filter_name})"
            print(f"{task:30} {name:16} {value:10.4f} {stderr:>10}")
    if args.output:
        from lm_eval.utils import handle_non_serializable

        with atomic_file(args.output, args.overwrite) as tmp:
            tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable,
                                      ensure_ascii=False))
        print(f"results: {args.output}")


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _jsonl_lines(path):
    """(line number, parsed JSON) for each non-blank line of a JSONL file; a line that is not
    JSON is a UsageError naming it."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{number}: not JSON ({e.msg}).") from e


def _read_choice_items(path):
    """A JSONL file of multiple-choice items {"query": str, "choices": [str, ...], "gold":
    index}, checked line by line (before any model loads)."""
    count = 0
    for number, item in _jsonl_lines(path):
        choices = item.get("choices") if isinstance(item, dict) else None
        gold = item.get("gold") if isinstance(item, dict) else None
        if not (isinstance(item, dict) and isinstance(item.get("query"), str)
                and isinstance(choices, list) and len(choices) >= 2
                and all(isinstance(c, str) for c in choices)
                and isinstance(gold, int) and not isinstance(gold, bool)
                and 0 <= gold < len(choices)):
            raise UsageError(f'{path}:{number}: expected {{"query": "...", "choices": '
                             f'["...", "...", ...], "gold": <index of the right choice>}}.')
        count += 1
    if not count:
        raise UsageError(f"{path}: no items.")


def _jsonl_task(path, scratch):
    """An lm-eval task YAML for a JSONL file of multiple-choice items: the query is the
    context, each choice a continuation (after lm-eval's one-space target delimiter),
    scored by acc (the most likely choice is gold) and acc_norm (the same, per byte)."""
    name = "".join(c if c.isalnum() else "_" for c in path.stem) or "items"
    text = json.dumps  # JSON strings are valid YAML scalars: paths with any characters
    yaml = "\n".join([
        f"task: {text(name)}",
        "dataset_path: json",
        f"dataset_kwargs: {{data_files: {{test: {text(str(path))}}}}}",
        "test_split: test",
        "output_type: multiple_choice",
        'doc_to_text: "{{query}}"',
        'doc_to_choice: "{{choices}}"',
        'doc_to_target: "{{gold}}"',
        "metric_list:",
        "  - {metric: acc, aggregation: mean, higher_is_better: true}",
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}",
        "metadata: {version: 1.0}", ""])
    target = scratch / f"{name}_{len(list(scratch.iterdir()))}.yaml"
    target.write_text(yaml, encoding="utf-8")
    return str(target)


def _folder_tasks(folder):
    """The task files of a folder, for lm-eval: its groups when it defines some (they name
    their tasks), else every task it defines."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=folder, include_defaults=False)
    found = manager.all_groups or manager.all_subtasks
    if not found:
        raise UsageError(f"{folder}: no lm-eval task YAML files in this folder.")
    return found


def _check_task_yaml(path):
    """A task YAML is a mapping (task:, group:, ...): lm-eval's loader raises a bare
    ValueError for anything else, after the model has loaded."""
    import yaml  # lm-eval's own dependency

    class Loader(yaml.SafeLoader):
        pass

    # lm-eval's tags (!function utils.process_docs) are resolved by lm-eval; here they only
    # need to parse.
    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        with path.open("rb") as f:
            config = yaml.load(f, Loader=Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"{path}{where}: not valid YAML ({problem}).") from e
    if not (isinstance(config, dict) and {"task", "group", "include", "class"} & set(config)):
        raise UsageError(f"{path}: not an lm-eval task YAML (a mapping with task: or group:, "
                         f"see lm-eval's task guide).")


def _task_list(text):
    """--tasks: [(kind, value)], kind "name", "yaml", "folder" or "jsonl"."""
    specs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        path = pathlib.Path(item).expanduser()
        looks_like_path = (os.sep in item or item.startswith(".") or path.suffix.lower() in
                           (".yaml", ".yml", ".jsonl", ".json"))
        if path.is_dir():
            specs.append(("folder", str(path.absolute())))
        elif path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
            _read_choice_items(path)
            specs.append(("jsonl", path.absolute()))
        elif path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
            _check_task_yaml(path)
            specs.append(("yaml", str(path.absolute())))
        elif path.is_file():
            raise UsageError(f"{item}: not a task YAML (.yaml, .yml) or a JSONL file of "
                             f"multiple-choice items (.jsonl); --tasks takes those, task "
                             f"folders and lm-eval task names.")
        elif looks_like_path:
            raise UsageError(f"{item}: no such file or folder (--tasks takes lm-eval task "
                             f"names, task YAML files or folders, and JSONL files).")
        else:
            specs.append(("name", item))
    if not specs:
        raise UsageError("--tasks is empty: give lm-eval task names, task YAML files or "
                         "folders, or JSONL files of multiple-choice items, comma-separated.")
    return specs


def _installed(module):
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[module] is None
        return False


# ---- before anything loads --------------------------------------------------------------
def _prepare(args):
    """What can be checked without Keras is checked first, in milliseconds: the prompt, the
    preset's name or path, the data file, the targets (nothing is overwritten unless
    --overwrite), so a typo never waits for a backend to load or a model to train."""
    from gemma_keras.checkpoints.atomic import check_target
    from gemma_keras.checkpoints.resolve import check_preset

    if args.run is _generate and not args.prompt:
        text = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
        # The shell's `echo` (and an editor's last line) ends with one newline that is no
        # part of the prompt; only that one is dropped.
        if text.endswith("\n"):
            text = text[:-2] if text.endswith("\r\n") else text[:-1]
        if not text:
            raise UsageError("no prompt: give one as an argument (gemma-keras generate "
                             "\"json.dumps(\") or on stdin (echo \"json.dumps(\" | gemma-keras "
                             "generate).")
        args.prompt = [text]
    elif args.run is _generate and "" in args.prompt:
        raise UsageError("an empty prompt: give the text to complete, e.g. "
                         "gemma-keras generate \"json.dumps(\".")
    if getattr(args, "block_size", None) is not None and getattr(args, "weights", None) != "int4":
        raise UsageError("--block-size sets the int4 group size: use it with --quantize int4.")
    if args.run in (_generate, _chat):
        _check_sampling(args)
        if args.adapter:
            adapter = pathlib.Path(args.adapter).expanduser()
            if not adapter.is_file():
                raise UsageError(f"--adapter {args.adapter}: " + (
                    "is a directory; give the .lora.h5 file that finetune --adapter wrote."
                    if adapter.is_dir() else "no such file."))
    if getattr(args, "preset", None) is not None:
        check_preset(args.preset)
    if getattr(args, "draft", None):
        from gemma_keras.checkpoints.resolve import check_draft

        check_draft(args.draft)  # a wrong --draft before the model loads, not after
    if args.run is _convert:
        check_preset(args.source)
        check_target(args.output, args.overwrite, directory=True)
    if args.run is _finetune:
        args.examples = _read_jsonl(args.data)  # the data first: the first thing a user gives
        if not (args.adapter or args.output):
            raise UsageError("finetune needs somewhere to put the result: --adapter FILE "
                             "(.lora.h5) and/or --output DIR (a preset with the adapters "
                             "merged); nothing was trained.")
        if args.adapter:
            if not args.adapter.endswith(".h5"):  # save_lora_weights' rule, before training
                raise UsageError(f"--adapter {args.adapter}: LoRA adapters are written to an "
                                 f".h5 file, e.g. --adapter adapter.lora.h5.")
            check_target(args.adapter, args.overwrite)
        if args.output:
            check_target(args.output, args.overwrite, directory=True)
    if args.run is _eval:
        if not _installed("lm_eval"):
            raise UsageError(f"eval runs lm-evaluation-harness, which is not installed: "
                             f"{EVAL_EXTRA}")
        args.task_specs = _task_list(args.tasks)
        if args.output:
            check_target(args.output, args.overwrite)
    if args.run is _export:
        from gemma_keras.exporting import check_export_target, check_tensorflow, resolve_format

        # A .tflite path means LiteRT (a SavedModel is a directory); said the other way it is
        # refused here, before the model loads.
        if args.format == "saved_model" and pathlib.Path(args.output).suffix.lower() == ".tflite":
            raise UsageError(f"{args.output} ends in .tflite, but --format saved_model writes "
                             "a directory: drop --format (a .tflite path exports LiteRT) or "
                             "give a directory name.")
        args.format = resolve_format(args.output, args.format)
        check_tensorflow(args.format)  # before the model loads (find_spec; no import)
        check_export_target(args.output, args.format, overwrite=args.overwrite)


def _quiet_backend_logs():
    """The backends' start-up chatter (TensorFlow's oneDNN and CUDA notes, absl's preamble,
    JAX's "no GPU" warning) is not for the person at the terminal. Set before any backend
    import; what is printed while importing anyway is swallowed by _import_keras."""
    import logging

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    for name in ("absl", "jax._src.xla_bridge", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _settle_backend(args):
    """Chooses the backend (gemma_keras/backends/choice.py) and imports Keras with it, with
    the C++ logs printed during the import kept off the terminal (TensorFlow writes them to
    file descriptor 2 before any log setting applies). If the import fails they are shown."""
    import tempfile

    from gemma_keras.backends.choice import ensure_backend

    if args.backend:
        ensure_backend(args.backend, "--backend")
    else:
        ensure_backend()
    if "keras" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            import keras  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            sys.stderr.write(log.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# ---- helpers ----------------------------------------------------------------------------
def _load(args):
    from gemma_keras.causal_lm import GemmaCausalLM

    # generate / chat / bench: weight quantization while loading (export's own --quantize
    # is LiteRT's and means something else: it has another dest).
    quantize = getattr(args, "weights", None)
    if quantize is None:
        return GemmaCausalLM.from_preset(args.preset, dtype=args.dtype)
    block_size = args.block_size if args.block_size is not None else 128
    return GemmaCausalLM.from_preset(args.preset, dtype=args.dtype, quantize=quantize,
                                     block_size=None if block_size == -1 else block_size)


def _with_adapter(lm, args):
    """generate / chat --adapter: the LoRA adapters on the loaded model. A float model gets
    them merged: the weights (so the text) of the preset `finetune --output` writes, and
    decoding as fast as without. A model quantized while loading keeps them beside its
    quantized kernels, as QLoRA trains them: merging would re-quantize the kernels, and
    int4's rounding step can be larger than a small adapter's whole change."""
    if args.adapter:
        lm.load_lora_weights(args.adapter)
        if args.weights is None:
            lm.merge_lora()
    return lm


def _check_sampling(args):
    """generate / chat: the sampling options together, as generate checks them (no Keras in
    these), so `--sampler greedy --temperature 0.5` is refused before the model loads, and
    chat's before the first message rather than after it."""
    from gemma_keras.generation.samplers import build_sampler, check_repetition_penalty

    build_sampler(args.sampler, args.temperature, args.top_k, args.top_p, min_p=args.min_p,
                  num_beams=getattr(args, "num_beams", None),
                  length_penalty=getattr(args, "length_penalty", None))
    check_repetition_penalty(args.repetition_penalty)
    if args.min_new_tokens > args.max_new_tokens:
        raise UsageError(f"--min-new-tokens {args.min_new_tokens} is more than "
                         f"--max-new-tokens {args.max_new_tokens}; raise --max-new-tokens.")


def _options(args, **more):
    """The generate options of `generate` and `chat`: --max-new-tokens and the sampling
    options, as in Python (--temperature / --top-k / --top-p / --min-p alone pick the
    sampler; with --sampler they set its parameters), and `more`."""
    # Here: the CLI's start (help, argument errors) imports nothing but the standard library.
    from gemma_keras.generation.options import GenerateOptions

    return GenerateOptions(
        max_new_tokens=args.max_new_tokens, sampler=args.sampler,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        seed=args.seed, min_new_tokens=args.min_new_tokens,
        repetition_penalty=args.repetition_penalty, **more)


def _read_jsonl(path):
    """Lines of {"text": ...} give texts; {"prompt": ..., "response": ...} give pairs (the
    loss on responses only). One kind per file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file.")
    from gemma_keras.errors import InvalidArgumentError
    from gemma_keras.preprocessor import records_to_columns  # fit's rule (no Keras import)

    lines = list(_jsonl_lines(path))
    for number, item in lines:
        if not isinstance(item, dict):
            raise UsageError(f'{path}:{number}: expected {{"text": ...}} or '
                             f'{{"prompt": ..., "response": ...}}.')
    if not lines:
        raise UsageError(f"{path}: no examples.")
    try:
        return records_to_columns([item for _, item in lines], name=str(path),
                                  labels=[f"{path}:{number}" for number, _ in lines])
    except InvalidArgumentError as e:
        raise UsageError(str(e)) from e


def _number(kind, text):
    """`text` as an int or a finite float; otherwise argparse's one-line error, worded for
    the person typing (argparse's own would say "invalid parse value: 'abc'")."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}"
        ) from None
    if not math.isfinite(value):  # float("nan") passes every comparison below
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive(kind):
    def positive(text):
        value = _number(kind, text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return positive


def _finite(text):
    return _number(float, text)


def _probability(text):
    """--top-p: a probability mass in (0, 1]."""
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _fraction(text):
    """--min-p: a fraction of the top token's probability, in [0, 1]."""
    value = _number(float, text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _seed(text):
    """A seed Keras (keras.utils.set_random_seed) and numpy both take: 0 to 2**32 - 1."""
    value = _number(int, text)
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be from 0 to 4294967295, got {text}")
    return value


def _model_options(parser, preset_help="preset name, handle or directory"):
    parser.add_argument("--preset", default=DEMO, help=f"{preset_help} (default: {DEMO})")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="compute and weight dtype (default: the checkpoint's)")


def _limit(text):
    """lm-eval's --limit: a number of documents per task, or a fraction (< 1) of them."""
    value = _number(float, text)
    if value <= 0 or (value >= 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"must be a whole number of documents or a fraction "
                                         f"below 1, got {text}")
    return value if value < 1 else int(value)


def _count(text):
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _block_size(text):
    value = _number(int, text)
    if value <= 0 and value != -1:
        raise argparse.ArgumentTypeError(f"must be > 0 (or -1: per output channel), got {text}")
    return value


def _quantize_options(parser):
    parser.add_argument("--quantize", dest="weights", choices=("int8", "int4"),
                        help="weight-only quantization while loading: int8 per output "
                             "channel, int4 in groups (--block-size); the float model never "
                             "exists whole in memory")
    parser.add_argument("--block-size", type=_block_size,
                        help="int4 group size along the input axis (default 128; -1: per "
                             "output channel)")


def _adapter_option(parser):
    parser.add_argument("--adapter", help="LoRA adapters (.lora.h5, from finetune --adapter) "
                                          "applied to the model: the text of the preset "
                                          "finetune --output writes, without writing it")


def _sampling_options(parser, max_new_tokens):
    parser.add_argument("--max-new-tokens", type=_positive(int), default=max_new_tokens)
    parser.add_argument("--sampler", choices=("greedy", "random", "top_k", "top_p"),
                        help="default: greedy, or what --temperature/--top-k/--top-p/--min-p "
                        "ask for")
    parser.add_argument("--temperature", type=_positive(float), help="sample at this "
                        "temperature (default 1.0 when sampling)")
    parser.add_argument("--top-k", type=_positive(int), help="sample among the k most likely "
                        "tokens (top_k's default: 50)")
    parser.add_argument("--top-p", type=_probability, help="nucleus sampling with this "
                        "mass (top_p's default: 0.9)")
    parser.add_argument("--min-p", type=_fraction, help="sample among the tokens at least "
                        "this fraction as likely as the most likely one (0.05-0.1 is usual)")
    parser.add_argument("--min-new-tokens", type=_count, default=0,
                        help="no stop token before this many new tokens")
    parser.add_argument("--repetition-penalty", type=_positive(float),
                        help="> 1 discourages tokens already seen (transformers' semantics)")
    parser.add_argument("--seed", type=_seed, help="makes sampling reproducible")
    parser.add_argument("--draft", help="speculative decoding: 'prompt_lookup' (drafts "
                        "copied from the prompt), 'int4' / 'int8' (the model's own quantized "
                        "copy drafts), or a smaller model's preset with the same tokenizer; "
                        "greedy output is unchanged, sampling keeps its distribution")
    parser.add_argument("--draft-tokens", type=_positive(int),
                        help="drafts per round (default: 8 for prompt_lookup, 4 for a model)")


def _drafting(args):
    return dict(draft=args.draft, draft_tokens=args.draft_tokens)


def build_parser():
    parser = _Parser(
        prog="gemma-keras", description="Gemma models for Keras 3 (JAX, TensorFlow, PyTorch).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["jax", "tensorflow", "torch"],
                        help="Keras backend (default: $KERAS_BACKEND, else the one in "
                             "~/.keras/keras.json if installed, else jax, torch or "
                             "tensorflow, whichever is installed)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = commands.add_parser("generate", help="complete prompts (text in, text out)")
    p.add_argument("prompt", nargs="*", help="prompts (default: read one from stdin)")
    _model_options(p)
    _quantize_options(p)
    _adapter_option(p)
    _sampling_options(p, 64)
    p.add_argument("--stream", action="store_true", help="print text as it is decoded")
    p.add_argument("--num-beams", type=_positive(int),
                   help="beam search with this many beams (transformers' num_beams; 1: greedy)")
    p.add_argument("--length-penalty", type=_finite,
                   help="with --num-beams: a finished beam scores its log-probability / "
                        "length ** this (default 1.0; > 1 favours longer completions)")
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--no-chat-template", dest="chat_template", action="store_const",
                   const=False, default="auto",
                   help="send the prompt as written, to be continued (by default an instruct "
                        "model gets it as a user turn and answers it)")
    p.set_defaults(run=_generate)

    p = commands.add_parser("chat", help="an interactive, multi-turn chat")
    _model_options(p)
    _quantize_options(p)
    _adapter_option(p)
    _sampling_options(p, 256)
    p.add_argument("--system", help="instructions put before the first message")
    p.set_defaults(run=_chat)

    p = commands.add_parser("finetune", help="LoRA fine-tuning on a JSONL file")
    p.add_argument("data", help='JSONL: {"text": ...} or {"prompt": ..., "response": ...} lines')
    _model_options(p)
    p.add_argument("--rank", type=_positive(int), default=4, help="LoRA rank (default 4)")
    p.add_argument("--epochs", type=_positive(int), default=1)
    p.add_argument("--batch-size", type=_positive(int), default=4)
    p.add_argument("--sequence-length", type=_positive(int), default=256)
    p.add_argument("--learning-rate", type=_positive(float),
                   help="AdamW learning rate (default: 2e-4, the LoRA default)")
    p.add_argument("--adapter", help="write the adapters here (.lora.h5)")
    p.add_argument("--output", help="write a preset with the adapters merged here")
    p.add_argument("--seed", type=_seed, help="makes the adapters' start and the data order "
                                           "reproducible")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --adapter / --output (atomically)")
    p.set_defaults(run=_finetune)

    p = commands.add_parser("export", help="SavedModel or LiteRT (.tflite) for serving and "
                                           "on-device generation")
    p.add_argument("output", help="new path: a directory, or a .tflite file for litert")
    _model_options(p)
    p.add_argument("--format", choices=("saved_model", "litert"),
                   help="default: litert for an output ending in .tflite, else saved_model")
    p.add_argument("--quantize", choices=("int8", "float16"),
                   help="LiteRT weight quantization (default: float32)")
    p.add_argument("--max-length", type=_positive(int),
                   help="longest prompt + completion served; sizes the KV cache (default 1024 "
                        "or the model's context)")
    p.add_argument("--prefill-length", type=_positive(int),
                   help="LiteRT tokens per prefill call (default 128)")
    p.add_argument("--adapter", help="LoRA adapters (.lora.h5) to merge into the export")
    p.add_argument("--allow-large-file", action="store_true",
                   help="LiteRT past the 2 GiB FlatBuffer limit (weights after the FlatBuffer)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing export (atomically)")
    p.set_defaults(run=_export)

    p = commands.add_parser("convert", help="HF checkpoint <-> keras-hub preset")
    p.add_argument("source", help="HF checkpoint or keras-hub preset: directory or handle")
    p.add_argument("output", help="new directory")
    p.add_argument("--to", choices=("keras_hub", "hf"), default="keras_hub",
                   help="layout to write (default: keras_hub)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--max-shard-size", type=_positive(float), help="GB per weights shard")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output directory (atomically)")
    p.set_defaults(run=_convert)

    p = commands.add_parser(
        "eval", help=f"lm-evaluation-harness tasks (needs {EVAL_EXTRA})",
        description="Evaluates a preset on lm-evaluation-harness tasks and prints a table "
                    "(task, metric, value, stderr). For every lm-eval option, use its own "
                    "command line: python -m gemma_keras.evaluation run --model gemma_keras "
                    "--model_args preset=...")
    p.add_argument("--tasks", required=True,
                   help="comma-separated: lm-eval task names, task YAML files or folders, "
                        'and JSONL files of multiple-choice items {"query": ..., '
                        '"choices": [...], "gold": index} (scored by acc and acc_norm)')
    _model_options(p)
    _quantize_options(p)
    p.add_argument("--batch-size", type=_positive(int), default=16,
                   help="requests scored together (default 16)")
    p.add_argument("--limit", type=_limit,
                   help="documents per task: a number, or a fraction below 1 (for a quick "
                        "look; not a valid score)")
    p.add_argument("--num-fewshot", type=_count, help="examples before each question "
                                                      "(default: the task's)")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="send each prompt as a chat in Gemma's format (instruct presets)")
    p.add_argument("--output", help="write lm-eval's results here as JSON")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output (atomically)")
    p.set_defaults(run=_eval)

    p = commands.add_parser("presets", help="table of the built-in presets")
    p.set_defaults(run=_presets)

    p = commands.add_parser("inspect", help="the config of a preset, handle or directory "
                                            "(built-in names: from the card, no download)")
    p.add_argument("preset", nargs="?", default=DEMO, help=f"(default: {DEMO})")
    p.set_defaults(run=_inspect)

    p = commands.add_parser("bench", help="generation speed of a preset on this machine")
    _model_options(p)
    _quantize_options(p)
    p.add_argument("--batch-size", type=_positive(int), default=1)
    p.add_argument("--prompt-length", type=_positive(int), default=32)
    p.add_argument("--max-new-tokens", type=_positive(int), default=128)
    p.add_argument("--runs", type=_positive(int), default=3)
    p.set_defaults(run=_bench)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_backend_logs()
    from gemma_keras import errors
    from gemma_keras.errors import GemmaError

    errors.use_cli_hints()  # "add --overwrite", "gemma-keras presets" in messages
    try:
        _prepare(args)  # no Keras yet: mistakes cost milliseconds
        if args.run not in (_presets, _inspect):  # inspect settles it only for a directory
            _settle_backend(args)
        args.run(args)
    except (GemmaError, UsageError) as e:  # user mistakes: a message, not a traceback
        print(f"gemma-keras: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(file=sys.stderr)  # off the line a progress bar or a streamed reply was on
        if str(e):  # what the command did before it stopped (finetune: what was saved)
            print(f"gemma-keras: {e}", file=sys.stderr)
        return 130
    except ValueError as e:
        # generate's documented argument errors (a prompt longer than the context, ...)
        # are ValueErrors that say what to change; anything else is a bug: show it.
        if args.run not in (_generate, _chat, _bench):
            raise
        print(f"gemma-keras: error: {e}", file=sys.stderr)
        return 2
    finally:  # main() called in-process (tests, scripts) leaves Python's hints as they were
        errors.use_cli_hints(False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
