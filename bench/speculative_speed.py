"""Speculative decoding speed: decode tokens/s of greedy `generate` with and without a drafter,
and how many drafts the target keeps, CPU.

    python bench/speculative_speed.py                       # the backend KERAS_BACKEND names
    python bench/speculative_speed.py --backends jax,torch,tensorflow
    python bench/speculative_speed.py --quick               # a smoke run: 16 tokens, 1 round
    python bench/speculative_speed.py --only lookup,int4 --rounds 5 --draft-tokens 6

Cases (all greedy, `stop_token_ids=None`, so every call makes exactly --new-tokens tokens):
  lookup     the bundled demo preset (float32) with `draft="prompt_lookup"` on a copy-heavy
             prompt: a function signature written three times, then its start again;
  int4       the demo preset (float32) drafted by its own int4 copy, `draft="int4"` (a trained
             model: a random one's int4 copy disagrees with it on nearly every token);
  truncated  a random Gemma-shaped target (vocab 4096, hidden 512, 6 layers, 8 / 1 heads of 64,
             GeGLU 2048) drafted by a truncated copy of itself: the same embedding, first
             --draft-layers decoder blocks and final norm; token-id dict inputs.

What it does: each backend runs in a fresh process of this script (one after another). In it,
each case makes its first calls (plain and speculative, timed apart: compilation included),
then --rounds rounds in which every case times, the order rotating each round (this machine is
shared and noisy): a plain call, a speculative call and a one-token call (prefill and first
token). Decode tokens/s = (new tokens - 1) / (call seconds - the case's median one-token call);
best of the rounds, median in parentheses. Every speculative output is compared with the plain
greedy output of the same round (they must be identical). Acceptance and tokens per round
are `lm.last_speculation`'s.
Writes bench/results/speculative_speed.md and .json (speculative_speed_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as common  # noqa: E402
from _common import log  # noqa: E402

DEFAULT_OUTPUT = common.RESULTS / "speculative_speed.md"
DEMO = str(common.REPO / "presets" / "gemma_demo")
CASES = ("lookup", "int4", "truncated")
# The demo preset was trained on standard-library docstrings; it copies a repeated signature
# (other copy prompts, a repeated docstring sentence, kept about 10 % of lookup drafts).
SIGNATURE = ("open(file, mode='r', buffering=-1, encoding=None, errors=None, newline=None, "
             "closefd=True, opener=None)\n")
COPY_PROMPT = SIGNATURE * 3 + "open(file,"
INT4_PROMPT = "class collections.OrderedDict("
RANDOM_MODEL = dict(vocabulary_size=4096, num_layers=6, num_query_heads=8, num_key_value_heads=1,
                    hidden_dim=512, intermediate_dim=2048, head_dim=64)
RANDOM_PROMPT_TOKENS = 32


# ---- inside the worker process --------------------------------------------------------------
def build_cases(args) -> dict:
    """{case: (lm, inputs, draft)} for the cases asked for."""
    import gemma_keras as gk

    cases = {}
    if {"lookup", "int4"} & set(args.cases):
        demo = gk.GemmaCausalLM.from_preset(DEMO, dtype="float32")
        cases["lookup"] = (demo, COPY_PROMPT, "prompt_lookup")
        cases["int4"] = (demo, INT4_PROMPT, "int4")
    if "truncated" in args.cases:
        target, draft = truncated_pair(args.draft_layers)
        cases["truncated"] = (target, draft_inputs(), draft)
    return {c: cases[c] for c in args.cases}


def truncated_pair(draft_layers: int):
    """(target, draft): a random target and a copy of its embedding, first `draft_layers`
    blocks and final norm."""
    import keras

    import gemma_keras as gk

    keras.utils.set_random_seed(0)
    target = gk.GemmaBackbone(gk.GemmaConfig(**RANDOM_MODEL), dtype="float32")
    draft = gk.GemmaBackbone(gk.GemmaConfig(**{**RANDOM_MODEL, "num_layers": draft_layers}),
                             dtype="float32")
    pairs = [(draft.token_embedding, target.token_embedding),
             (draft.final_normalization, target.final_normalization),
             *zip(draft.transformer_layers, target.transformer_layers)]
    for mine, theirs in pairs:
        mine.set_weights(theirs.get_weights())
    return gk.GemmaCausalLM(target, tokenizer=None), gk.GemmaCausalLM(draft, tokenizer=None)


def draft_inputs() -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    ids = np.concatenate([[2], rng.integers(3, RANDOM_MODEL["vocabulary_size"],
                                            RANDOM_PROMPT_TOKENS - 1)]).astype("int32")
    return {"token_ids": ids[None], "padding_mask": np.ones((1, len(ids)), bool)}


def comparable(out):
    """A generate output as JSON-able data, for equality tests."""
    import numpy as np

    if isinstance(out, dict):
        return np.asarray(out["token_ids"]).tolist()
    return out


def measure_backend(args) -> dict:
    """Every case on this process' backend: first calls, then interleaved timed rounds."""
    common.start_backend()
    import keras

    cases = build_cases(args)
    rows = {c: {"case": c, "backend": keras.backend.backend(), "plain_s": [], "spec_s": [],
                "prefill_s": [], "identical": True, "stats": []} for c in cases}

    def call(case, kind):
        lm, inputs, draft = cases[case]
        kw = dict(max_new_tokens=1 if kind == "prefill" else args.new_tokens,
                  stop_token_ids=None, sampler="greedy")
        if isinstance(inputs, str):
            kw["chat_template"] = False
        if kind == "spec":
            kw.update(draft=draft, draft_tokens=args.draft_tokens)
        seconds, out = common.timed(lambda: lm.generate(inputs, **kw), collect=True)
        stats = lm.last_speculation if kind == "spec" else None
        return seconds, comparable(out), stats

    for case in cases:
        log(f"  {case}: first calls ...")
        for kind in ("plain", "spec", "prefill"):
            seconds, out, _ = call(case, kind)
            rows[case][f"first_{kind}_s"] = seconds
            if kind == "plain":
                rows[case]["output"] = out
    names = list(cases)
    for round_ in range(args.rounds):
        shift = round_ % len(names)
        order = names[shift:] + names[:shift]
        log(f"  round {round_ + 1}/{args.rounds}: " + ", ".join(order))
        for case in order:
            kinds = ("plain", "spec", "prefill") if round_ % 2 == 0 else ("spec", "plain",
                                                                          "prefill")
            outs = {}
            for kind in kinds:
                seconds, outs[kind], stats = call(case, kind)
                rows[case][f"{kind}_s"].append(seconds)
                if stats is not None:
                    rows[case]["stats"].append({"rounds": stats.rounds, "drafted": stats.drafted,
                                                "accepted": stats.accepted,
                                                "tokens": stats.tokens})
            rows[case]["identical"] &= outs["plain"] == outs["spec"] == rows[case]["output"]
    for row in rows.values():
        if isinstance(row["output"], str):
            row["output"] = row["output"][-300:]
        else:
            row["output"] = None
    return {"rows": list(rows.values())}


# ---- the driver -----------------------------------------------------------------------------
def speeds(row, new_tokens) -> dict:
    """Decode tokens/s (best, median) plain and speculative, and the ratios."""
    if not row.get("plain_s"):
        return {}
    prefill = statistics.median(row["prefill_s"])

    def rate(s):
        return (new_tokens - 1) / max(s - prefill, 1e-9)
    out = {}
    for kind in ("plain", "spec"):
        s = row[f"{kind}_s"]
        out[kind] = (rate(min(s)), rate(statistics.median(s)))
    out["prefill_s"] = prefill
    return out


def totals(row) -> dict:
    stats = row.get("stats") or []
    keys = ("rounds", "drafted", "accepted", "tokens")
    return {k: sum(s[k] for s in stats) for k in keys}


def measure(args) -> dict:
    rows = []
    for backend in args.backends:
        log(f"{backend}: ...")
        argv = [__file__, "--worker", "--cases", ",".join(args.cases), "--new-tokens",
                args.new_tokens, "--rounds", args.rounds, "--draft-tokens", args.draft_tokens,
                "--draft-layers", args.draft_layers]
        got = common.run_case(argv, env={"KERAS_BACKEND": backend}, timeout=args.timeout)
        if got.get("error"):
            rows += [{"case": c, "backend": backend, "error": got["error"]} for c in args.cases]
        else:
            rows += got["rows"]
    return {"rows": rows, "new_tokens": args.new_tokens, "rounds": args.rounds,
            "draft_tokens": args.draft_tokens, "draft_layers": args.draft_layers,
            "load_average": os.getloadavg()[0],
            "args_line": common.args_line(__file__, args.argv)}


def render(raw) -> str:
    n = raw["new_tokens"]
    lines = [
        "# Speculative decoding: decode tokens/s with and without drafting (CPU)", "",
        f"Greedy, batch 1, {n} new tokens per call (`stop_token_ids=None`), "
        f"`draft_tokens={raw['draft_tokens']}`. Cases: *lookup*: the demo preset (float32), "
        "`draft=\"prompt_lookup\"`, on a prompt that writes a function signature three times "
        "and starts it again; *int4*: the demo preset (float32) drafted by its int4 copy, "
        f"`draft=\"int4\"`, prompt `{INT4_PROMPT!r}`; *truncated*: a random Gemma-shaped "
        "target (vocab 4096, hidden 512, 6 layers, 8 / 1 heads of 64, GeGLU 2048, float32) "
        f"drafted by its own first {raw['draft_layers']} layers (same embedding and final "
        f"norm), a {RANDOM_PROMPT_TOKENS}-token random prompt as token ids.", "",
        f"Each backend in its own process. First calls timed apart (compilation included), "
        f"then {raw['rounds']} rounds in which each case in turn times a plain call, a "
        "speculative call and a one-token call (prefill + first token), the case order "
        "rotating. *Decode tok/s* = (new tokens - 1) / (call - median one-token call): "
        "**best** of the rounds, median in parentheses. *Acceptance*: drafts kept / drafts "
        "proposed; *tokens / round*: tokens per target pass after the first token (over all "
        "timed rounds). *Identical*: every speculative output equals plain greedy's.", "",
    ]
    columns = ["backend", "case", "plain tok/s", "speculative tok/s", "ratio (best)",
               "ratio (median)", "acceptance", "tokens / round", "identical",
               "first call plain / spec (s)"]
    lines += common.table_head(columns, "llrrrrrrlr")
    for r in raw["rows"]:
        cells = [r["backend"], r["case"]]
        if r.get("error"):
            lines.append(common.failed_row(cells, r["error"], len(columns)))
            continue
        m, t = speeds(r, n), totals(r)
        if not m:
            lines.append(common.failed_row(cells, "no timed round", len(columns)))
            continue
        lines.append(common.table_row(cells + [
            f"**{m['plain'][0]:.1f}** ({m['plain'][1]:.1f})",
            f"**{m['spec'][0]:.1f}** ({m['spec'][1]:.1f})",
            common.ratio(m["spec"][0], m["plain"][0]), common.ratio(m["spec"][1], m["plain"][1]),
            f"{t['accepted'] / t['drafted']:.0%}" if t["drafted"] else "-",
            f"{t['tokens'] / t['rounds']:.2f}" if t["rounds"] else "-",
            "yes" if r["identical"] else "**NO**",
            f"{r['first_plain_s']:.1f} / {r['first_spec_s']:.1f}"]))
    lines += common.closing_lines(raw)
    return "\n".join(lines)


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--quick", action="store_true", help="A smoke run: 16 tokens, 1 round.")
    common.add_backends_list_arg(p)
    p.add_argument("--only", help=f"Comma-separated cases, of {','.join(CASES)} (default all).")
    p.add_argument("--new-tokens", type=int, default=None, help="Default 128 (16 with --quick).")
    p.add_argument("--rounds", type=int, default=None, help="Default 3 (1 with --quick).")
    p.add_argument("--draft-tokens", type=int, default=4, help="k, drafts per round.")
    p.add_argument("--draft-layers", type=int, default=2,
                   help="Decoder blocks of the truncated draft (default 2).")
    p.add_argument("--timeout", type=float, default=common.CASE_TIMEOUT_S,
                   help="Seconds one backend's process may take.")
    common.add_report_args(p, "Markdown file (default bench/results/speculative_speed.md; "
                           "speculative_speed_quick.md with --quick).",
                           json_help="Raw results (default: the markdown's path as .json).",
                           from_json_help="Re-render an earlier run's --json (no measuring).")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cases", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = argv
    args.new_tokens = args.new_tokens or (16 if args.quick else 128)
    args.rounds = args.rounds or (1 if args.quick else 3)
    if args.worker:
        args.cases = args.cases.split(",")
        common.reply(measure_backend(args))
        return 0
    args.cases = common.pick(CASES, args.only) if args.only else list(CASES)
    return common.report_backends(args, DEFAULT_OUTPUT, measure, render)


if __name__ == "__main__":
    sys.exit(main())
