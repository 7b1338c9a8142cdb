"""The lm-evaluation-harness model `gemma_keras` (issue 19) against lm-eval's own Hugging Face
model (HFLM) on the same checkpoint, written at test time: tokenization, log-likelihoods,
rolling log-likelihoods, greedy generation, the chat template and whole `simple_evaluate` runs
on a local task; and `gemma-keras eval` end to end. Nothing is downloaded."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import gemma_keras as gk
from conftest import one_line_error

TOL = 1e-4
CASE = "gemma2_gqa"  # sliding window 5 and both soft-caps: the windows and caps are exercised
SHORT = 16  # a max_length both models get, so that rolling texts take several windows


# ---- shared models ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(hflm_checkpoint):
    """(ours, HFLM) on one checkpoint, each also with max_length=SHORT."""
    from lm_eval.models.huggingface import HFLM

    from gemma_keras.evaluation.harness import GemmaKerasLM

    directory, hf_model = hflm_checkpoint(CASE, embedding_std=0.02)
    lm = gk.GemmaCausalLM.from_preset(str(directory), dtype="float32")

    def hflm(**kwargs):
        return HFLM(pretrained=str(directory), device="cpu", dtype="float32", batch_size=3,
                    **kwargs)
    return dict(lm=lm, hf_model=hf_model, ours=GemmaKerasLM(lm=lm),
                short=GemmaKerasLM(lm=lm, max_length=SHORT),
                hflm=hflm(), hflm_short=hflm(max_length=SHORT))


def _instances(kind, arguments):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i)
            for i, a in enumerate(arguments)]


# ---- tokenization and the chat template ------------------------------------------------------
@pytest.mark.once("tensorflow")
def test_tok_encode_and_chat_template_equal_hflm(models):
    ours, hflm = models["ours"], models["hflm"]
    texts = ["The quick brown fox", "", "  leading spaces", "Keras é€ 12 x\n y",
             "<bos>The quick brown fox",          # already has <bos>: no second one
             "<bos> Keras<eos> is<pad>12<unk>",   # special pieces written in the text
             "fox <bos> dog", "<start_of_turn>user\nHi<end_of_turn>\n"]
    for text in texts:
        for add in (None, True, False):
            assert ours.tok_encode(text, add_special_tokens=add) == hflm.tok_encode(
                text, add_special_tokens=add), (text, add)
    assert ours.tok_encode("The quick brown fox", left_truncate_len=3) == hflm.tok_encode(
        "The quick brown fox", left_truncate_len=3)
    ids = hflm.tok_encode("<bos>Keras<eos> is a deep learning API<end_of_turn>")
    for skip in (True, False):
        assert ours.tok_decode(ids, skip_special_tokens=skip) == hflm.tok_decode(
            ids, skip_special_tokens=skip), skip
    assert (ours.eot_token_id, ours.prefix_token_id) == (hflm.eot_token_id,
                                                         hflm.prefix_token_id)
    # lm-eval's --apply_chat_template: the same prompt text as transformers writes with the
    # checkpoint's chat template (a system message folded into the first user turn; without
    # add_generation_prompt the last message is left open to be continued).
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is Keras?"},
            {"role": "assistant", "content": "A deep learning API."},
            {"role": "user", "content": "And 12 x 7?"}]
    for history, add in ((chat, True), (chat[:3], False), (chat[1:2], True)):
        text = ours.apply_chat_template(history, add_generation_prompt=add)
        assert text == hflm.apply_chat_template(history, add_generation_prompt=add), (text, add)
        assert text.startswith("<bos><start_of_turn>user\n")
    assert ours.chat_template(True) and ours.chat_template(False) is None
    assert ours.tokenizer_name and ours.max_length == hflm.max_length == models[
        "lm"].config.max_sequence_length


# ---- log-likelihoods -------------------------------------------------------------------------
REQUESTS = [
    ("The quick brown fox", " jumps over the lazy dog"),
    ("The quick brown fox ", "jumps"),          # trailing space moves to the continuation
    ("The quick brown fox  \n", " 7"),          # several trailing whitespace characters
    ("", "Keras is a deep learning API"),       # empty context: <bos> alone
    ("", "<bos>Gemma"),                         # continuation starting with <bos> itself
    ("Gemma models are", " lightweight"),
    ("The quick brown fox 3 jumps over the lazy dog number 21. The lazy", " dog 7"),  # long
] + [("The quick brown fox 12 jumps over the lazy dog number", f" {n}")
     for n in ("84", "7", "lazy dog", "Gemma")]  # one context, four choices


def _greedy_requests(ours, hf_model, contexts, new_tokens=2):
    """(context, continuation) text requests whose continuation is transformers' greedy
    continuation of the context, kept where the text splits back into the same tokens
    (otherwise lm-eval's split would score other tokens)."""
    import torch

    requests = []
    for context in contexts:
        ids = ours.tok_encode(context)
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=new_tokens,
                                    do_sample=False)[0].tolist()
        # This random model mostly predicts byte pieces, which decode to text that does not
        # split back; shorter continuations are tried too.
        for n in range(new_tokens, 0, -1):
            continuation = ours.tok_decode(out[len(ids):len(ids) + n])
            if ours.tok_encode(context + continuation) == out[:len(ids) + n]:
                requests.append((context, continuation))
                break
    return requests


@pytest.mark.once("tensorflow")
def test_loglikelihood_equals_hflm(models):
    # max_length=SHORT: the longer requests lose their oldest tokens, in both.
    ours, hflm = models["short"], models["hflm_short"]
    # A chat-templated context (a string starting with "<bos>"), and requests whose
    # continuation is the model's own greedy continuation (is_greedy True).
    chat = ours.apply_chat_template([{"role": "user", "content": "Hi"}])
    greedy = _greedy_requests(ours, models["hf_model"], [
        "The quick brown fox 12 jumps over the", "The quick brown fox", "Keras is", "1"])
    assert greedy
    requests = REQUESTS + [(chat, "A"), (chat, "1")] + greedy
    assert max(len(ours.tok_encode(c + x)) for c, x in requests) > SHORT + 1
    # The chat requests fit whole (with a token to spare): their <bos> is read.
    assert max(len(ours.tok_encode(chat + x)) for x in ("A", "1")) <= SHORT
    expected = hflm.loglikelihood(_instances("loglikelihood", requests), disable_tqdm=True)
    got = ours.loglikelihood(_instances("loglikelihood", requests), disable_tqdm=True)
    assert len(got) == len(requests)
    for request, (value, is_greedy), (want, want_greedy) in zip(requests, got, expected):
        assert abs(value - want) < TOL and is_greedy == want_greedy, (request, value, want)
    assert all(g for _, g in got[-len(greedy):]) and not all(g for _, g in got)


@pytest.mark.once("torch")
def test_loglikelihood_rolling_equals_hflm(models):
    ours, hflm = models["short"], models["hflm_short"]
    texts = ["The quick brown fox 3 jumps over the lazy dog number 21. " * 3,
             "Keras is a deep learning API written in Python. Gemma models are lightweight.",
             "x", ""]
    assert len(ours.tok_encode(texts[0])) > 3 * SHORT  # several windows
    expected = hflm.loglikelihood_rolling(_instances("loglikelihood_rolling",
                                                     [(t,) for t in texts]), disable_tqdm=True)
    got = ours.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in texts]),
                                     disable_tqdm=True)
    for text, value, want in zip(texts, got, expected):
        assert abs(value - want) < TOL * max(1, len(text) / 20), (text[:20], value, want)


# ---- generate_until --------------------------------------------------------------------------
@pytest.mark.once("tensorflow")
def test_generate_until_is_greedy_generate_cut_at_the_stop_string_as_hflm(models):
    ours, hflm, lm = models["ours"], models["hflm"], models["lm"]
    contexts = ["The quick brown fox", "Keras is a deep learning API", "1"]
    # A stop string that never appears keeps generate on the host loop generate_until uses
    # (stop strings are checked there): one compilation for the whole test.
    options = dict(max_new_tokens=12, chat_template=False, include_prompt=False,
                   stop_token_ids=[lm.tokenizer.eos_token_id], stop_strings=["never"])
    full = lm.generate(contexts, **options)
    # A stop string from inside each greedy completion, so the cut happens.
    stops = [text[len(text) // 2: len(text) // 2 + 2] for text in full]
    assert all(stops) and all(text.find(s) > 0 for text, s in zip(full, stops)), full
    requests = [(c, {"until": [s], "max_gen_toks": 12, "do_sample": False})
                for c, s in zip(contexts, stops)]
    # Other gen_kwargs (another group), a stop string that never appears, a temperature of 0.
    requests += [(c, {"until": ["never"], "max_gen_toks": 12, "temperature": 0.0})
                 for c in contexts]
    got = ours.generate_until(_instances("generate_until", requests), disable_tqdm=True)
    assert got[:3] == [text.split(s)[0] for text, s in zip(full, stops)]
    assert got[3:] == full
    # HFLM generates the same tokens. Its text differs where a run of byte pieces is not
    # valid UTF-8 (this random model writes many): transformers' decoder turns every byte of
    # such a run into U+FFFD, SentencePiece only the invalid ones. So its text is compared
    # with transformers' decoding of our tokens.
    width = max(len(ours.tok_encode(c)) for c in contexts)
    ids = [ours.tok_encode(c) for c in contexts]
    generated = lm.generate({"token_ids": [i + [0] * (width - len(i)) for i in ids],
                             "padding_mask": [[True] * len(i) + [False] * (width - len(i))
                                              for i in ids]}, **options)
    tokens = [[t for t, keep in zip(row, mask) if keep] for row, mask in zip(
        generated["token_ids"].tolist(), generated["padding_mask"].tolist())]
    assert [ours.tok_decode(t) for t in tokens] == full
    hf_text = [hflm.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    theirs = hflm.generate_until(_instances("generate_until", requests), disable_tqdm=True)
    assert theirs == [t.split(s)[0] for t, s in zip(hf_text, stops)] + hf_text
    # Sampling follows the model's seed: the same run twice gives the same text.
    sampled = [(c, {"until": ["never"], "max_gen_toks": 12, "do_sample": True,
                    "temperature": 1.0}) for c in contexts]
    once = ours.generate_until(_instances("generate_until", sampled), disable_tqdm=True)
    assert once == ours.generate_until(_instances("generate_until", sampled), disable_tqdm=True)
    assert once != full
    with pytest.raises(gk.InvalidArgumentError, match="num_beams"):
        ours.generate_until(_instances("generate_until", [("x", {"num_beams": 2})]),
                            disable_tqdm=True)


# ---- model_args and the missing extra --------------------------------------------------------
@pytest.mark.once("torch")
def test_bad_model_args_name_the_argument(models):
    from lm_eval.api.registry import get_model

    from gemma_keras.evaluation.harness import GemmaKerasLM

    assert get_model("gemma_keras") is GemmaKerasLM
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own models stay registered
    lm = models["lm"]
    for kwargs, needle in [(dict(preset="gemma_demo"), "preset"),
                           (dict(batch_size=0), "batch_size"),
                           (dict(batch_size="many"), "batch_size"),
                           (dict(max_length=10 ** 9), "max_length"),
                           (dict(max_gen_toks="64"), "max_gen_toks"),
                           (dict(pretrained="x"), "pretrained")]:
        with pytest.raises(gk.GemmaError, match=needle):
            GemmaKerasLM(lm=lm, **kwargs)
    with pytest.raises(gk.GemmaError, match="pretrained"):  # checked before any loading
        GemmaKerasLM.create_from_arg_string("pretrained=google/gemma-2b,dtype=bfloat16")
    assert GemmaKerasLM(lm=lm, batch_size="auto").batch_size == 16
    with pytest.raises(gk.InvalidArgumentError, match="max_gen_toks"):
        models["short"].generate_until(
            _instances("generate_until", [("x", {"until": [], "max_gen_toks": SHORT})]),
            disable_tqdm=True)


@pytest.mark.once("torch")
def test_import_without_lm_eval_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.delitem(sys.modules, "gemma_keras.evaluation.harness", raising=False)
    with pytest.raises(gk.MissingExtraError, match=r'pip install "gemma-keras\[eval\]"'):
        import gemma_keras.evaluation.harness  # noqa: F401


# ---- whole runs through lm-eval --------------------------------------------------------------
def _choice_items(n=8):
    items = []
    for i in range(n):
        choices = [f" jumps over the lazy dog number {i}", f" {i * 7}", " Keras", " is"]
        items.append({"query": f"The quick brown fox {i}", "choices": choices, "gold": i % 4})
    return items


def _write_items(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def _task_yaml(tmp_path, data):
    path = tmp_path / "local_mc.yaml"
    path.write_text(textwrap.dedent(f"""\
        task: local_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {json.dumps(str(data))}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{query}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{gold}}}}"
        metric_list:
          - metric: acc
          - metric: acc_norm
        """))
    return path


@pytest.mark.once("jax")
def test_simple_evaluate_on_a_local_task_equals_hflm(models, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    task = _task_yaml(tmp_path, _write_items(tmp_path / "items.jsonl", _choice_items()))
    scores = {}
    for name in ("ours", "hflm"):
        for chat in (False, True):  # lm-eval's --apply_chat_template: our template vs HF's
            out = lm_eval.simple_evaluate(
                model=models[name], tasks=[str(task)], log_samples=False,
                task_manager=TaskManager(include_defaults=False), apply_chat_template=chat)
            scores[name, chat] = {k: v for k, v in out["results"]["local_mc"].items()
                                  if k.startswith(("acc,", "acc_norm,"))}
    for chat in (False, True):
        assert set(scores["ours", chat]) == {"acc,none", "acc_norm,none"}
        assert scores["ours", chat] == scores["hflm", chat], chat


# ---- gemma-keras eval ------------------------------------------------------------------------
def _cli(args, tmp_path, env_extra=None):
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "datasets_cache"),
               **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "gemma_keras.cli", *args], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)


@pytest.mark.once("torch")
def test_cli_eval_runs_a_jsonl_task_and_writes_results(tmp_path):
    items = _write_items(tmp_path / "my items.jsonl", _choice_items())
    output = tmp_path / "results.json"
    result = _cli(["eval", "--tasks", str(items), "--output", str(output), "--limit", "2",
                   "--batch-size", "8"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["task", "metric", "value", "stderr"]
    table = {row[1]: (float(row[2]), float(row[3])) for row in rows[1:] if row[0] == "my_items"}
    assert set(table) == {"acc", "acc_norm"}
    saved = json.loads(output.read_text())["results"]["my_items"]
    assert saved["acc,none"] == pytest.approx(table["acc"][0], abs=1e-4)
    assert saved["acc_norm_stderr,none"] == pytest.approx(table["acc_norm"][1], abs=1e-4)
    assert json.loads(output.read_text())["n-samples"]["my_items"]["effective"] == 2
    # lm-eval runs `git describe` for the results' git_hash; outside a repository (tmp_path)
    # git's "fatal: not a git repository" reached the terminal (issue 32).
    assert "fatal:" not in result.stderr, result.stderr[-3000:]
    # The same output again is refused before anything loads; nothing is changed.
    before = output.read_bytes()
    again = _cli(["eval", "--tasks", str(items), "--output", str(output)], tmp_path)
    one_line_error(again, "already exists", "--overwrite")
    assert output.read_bytes() == before and again.stdout == ""  # nothing was evaluated


@pytest.mark.once("torch")
def test_cli_eval_refuses_mistakes_and_a_missing_lm_eval_in_one_line(tmp_path):
    items = _write_items(tmp_path / "items.jsonl", _choice_items(2))
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text('import sys\nsys.modules["lm_eval"] = None\n')
    missing = _cli(["eval", "--tasks", str(items)], tmp_path,
                   {"PYTHONPATH": os.pathsep.join([str(hide), os.environ.get("PYTHONPATH",
                                                                             "")])})
    one_line_error(missing, 'pip install "gemma-keras[eval]"')
    bad = _write_items(tmp_path / "bad.jsonl", [{"query": "q", "choices": ["a", "b"],
                                                 "gold": 2}])
    one_line_error(_cli(["eval", "--tasks", str(bad)], tmp_path), "bad.jsonl:1", "gold")
    one_line_error(_cli(["eval", "--tasks", "./nowhere.yaml"], tmp_path), "nowhere.yaml")
    one_line_error(_cli(["eval", "--tasks", " , "], tmp_path), "--tasks")
