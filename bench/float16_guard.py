"""What float16's overflow guards cost (layers/precision.py): greedy decode tokens/s and prefill
time of one random Gemma-shaped model in float16 with the guards and without them, with
float32 and bfloat16 beside them, and transformers' float16 on the same shape (PyTorch's pass).

    python bench/float16_guard.py --backends jax,tensorflow,torch
    python bench/float16_guard.py --quick          # a smoke run: 8 tokens, 1 round

The model: vocab 4096, hidden 512, 6 layers, 8 / 1 heads of 64, GeGLU 2048 (Gemma 1 layout),
random weights small enough that float16 never overflows, so the unguarded float16 run is a
fair baseline (on a real checkpoint it would generate nothing). "Unguarded" runs the same
model with `precision.guarded` made false around each call (it is read when a step is traced,
so the unguarded case has its own compiled steps).

Each backend runs in a fresh process of this script. First calls are timed apart (compilation
included); then --rounds rounds in which every case, in rotating order, times a --new-tokens
call and a one-token call (prefill + first token). Decode tokens/s = (new tokens - 1) / (call -
the case's median one-token call): best of the rounds, median in parentheses.
This machine has no GPU: float16 on CPU is not what float16 is for (XLA and ATen widen much of
it), so the ratio guarded / unguarded is the number to read, not float16 against float32.
Writes bench/results/float16_guard.md and .json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402
from _common import log  # noqa: E402

DEFAULT_OUTPUT = common.RESULTS / "float16_guard.md"
MODEL = dict(vocabulary_size=4096, num_layers=6, num_query_heads=8, num_key_value_heads=1,
             hidden_dim=512, intermediate_dim=2048, head_dim=64)
PROMPT_TOKENS = 128
CASES = ("float32", "bfloat16", "float16 guarded", "float16 unguarded")


# ---- inside the worker process --------------------------------------------------------------
@contextlib.contextmanager
def unguarded(active):
    from gemma_keras.layers import precision

    if not active:
        yield
        return
    original = precision.guarded
    precision.guarded = lambda compute_dtype: False
    try:
        yield
    finally:
        precision.guarded = original


def build_cases() -> dict:
    """{case: (generate(max_new_tokens) -> ids, unguarded?)}."""
    import keras
    import numpy as np

    import gemma_keras as gk

    keras.utils.set_random_seed(0)
    source = gk.GemmaBackbone(gk.GemmaConfig(**MODEL), dtype="float32")
    weights = source.get_weights()
    ids = np.random.default_rng(0).integers(3, MODEL["vocabulary_size"], PROMPT_TOKENS)
    inputs = {"token_ids": ids[None].astype("int32"),
              "padding_mask": np.ones((1, PROMPT_TOKENS), bool)}
    cases = {}
    models = {}
    for case in CASES:
        dtype = case.split()[0]
        if dtype not in models:
            backbone = gk.GemmaBackbone(gk.GemmaConfig(**MODEL), dtype=dtype)
            backbone.set_weights(weights)
            models[dtype] = backbone
        # Its own GemmaCausalLM, so that the unguarded case compiles its own steps.
        lm = gk.GemmaCausalLM(models[dtype], tokenizer=None)

        def generate(n, lm=lm):
            out = lm.generate(inputs, max_new_tokens=n, stop_token_ids=None, sampler="greedy")
            return np.asarray(out["token_ids"])
        cases[case] = (generate, case.endswith("unguarded"))
    return cases


def transformers_case():
    """transformers' Gemma in float16 on the same shape (random weights of its own), greedy."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GemmaConfig(
        vocab_size=MODEL["vocabulary_size"], hidden_size=MODEL["hidden_dim"],
        intermediate_size=MODEL["intermediate_dim"] // 2, num_hidden_layers=MODEL["num_layers"],
        num_attention_heads=MODEL["num_query_heads"],
        num_key_value_heads=MODEL["num_key_value_heads"], head_dim=MODEL["head_dim"],
        hidden_activation="gelu_pytorch_tanh")
    model = transformers.GemmaForCausalLM(config).to(torch.float16).eval()
    ids = torch.randint(3, MODEL["vocabulary_size"], (1, PROMPT_TOKENS))

    def generate(n):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0).numpy()
    return generate


def measure_backend(args) -> dict:
    common.start_backend()
    import keras

    backend = keras.backend.backend()
    cases = build_cases()
    if backend == "torch" and not args.no_peer:
        cases["transformers float16"] = (transformers_case(), False)
    rows = {c: {"case": c, "backend": backend, "call_s": [], "prefill_s": []} for c in cases}

    def call(case, n):
        generate, plain = cases[case]
        with unguarded(plain):
            return common.timed(lambda: generate(n), collect=True)

    for case in cases:
        log(f"  {case}: first calls ...")
        rows[case]["first_call_s"] = call(case, args.new_tokens)[0]
        call(case, 1)
    names = list(cases)
    for round_ in range(args.rounds):
        shift = round_ % len(names)
        log(f"  round {round_ + 1}/{args.rounds}")
        for case in names[shift:] + names[:shift]:
            rows[case]["call_s"].append(call(case, args.new_tokens)[0])
            rows[case]["prefill_s"].append(call(case, 1)[0])
    return {"rows": list(rows.values())}


# ---- the driver -----------------------------------------------------------------------------
def speeds(row, new_tokens):
    prefill = statistics.median(row["prefill_s"])

    def rate(s):
        return (new_tokens - 1) / max(s - prefill, 1e-9)
    return rate(min(row["call_s"])), rate(statistics.median(row["call_s"])), prefill


def measure(args) -> dict:
    rows = []
    for backend in args.backends:
        log(f"{backend}: ...")
        argv = [__file__, "--worker", "--new-tokens", args.new_tokens, "--rounds", args.rounds]
        if args.no_peer:
            argv.append("--no-peer")
        got = common.run_case(argv, env={"KERAS_BACKEND": backend}, timeout=args.timeout)
        if got.get("error"):
            rows.append({"case": "all", "backend": backend, "error": got["error"]})
        else:
            rows += got["rows"]
    return {"rows": rows, "new_tokens": args.new_tokens, "rounds": args.rounds,
            "load_average": os.getloadavg()[0],
            "args_line": common.args_line(__file__, args.argv)}


def render(raw) -> str:
    n = raw["new_tokens"]
    lines = [
        "# float16's overflow guards: what they cost (CPU)", "",
        f"Greedy, batch 1, a {PROMPT_TOKENS}-token prompt, {n} new tokens per call, a random "
        "model of vocab 4096, hidden 512, 6 layers, 8 / 1 heads of 64, GeGLU 2048. *float16 "
        "guarded* is what `dtype=\"float16\"` runs (layers/precision.py); *unguarded* the same "
        "model with the guards switched off (on real checkpoints it overflows). Each backend "
        f"in its own process; first calls apart, then {raw['rounds']} rounds, cases in "
        "rotating order. *Decode tok/s* = (new tokens - 1) / (call - median one-token call): "
        "**best**, median in parentheses. *Prefill*: the median one-token call. *vs "
        "unguarded float16*: speed ratios (> 1 faster) of decode (best) and prefill (median); "
        "on the *float16 guarded* row, the guards' cost.", "",
    ]
    columns = ["backend", "case", "decode tok/s", "prefill (ms)", "vs unguarded float16",
               "first call (s)"]
    lines += common.table_head(columns, "llrrrr")
    by_backend = {}
    for r in raw["rows"]:
        if not r.get("error"):
            by_backend.setdefault(r["backend"], {})[r["case"]] = speeds(r, n)
    for r in raw["rows"]:
        cells = [r["backend"], r["case"]]
        if r.get("error"):
            lines.append(common.failed_row(cells, r["error"], len(columns)))
            continue
        best, median, prefill = by_backend[r["backend"]][r["case"]]
        base = by_backend[r["backend"]].get("float16 unguarded")
        versus = "-"
        if base and r["case"] != "float16 unguarded":
            versus = (f"decode {common.ratio(best, base[0])}, prefill "
                      f"{common.ratio(base[2], prefill)}")  # speeds: > 1 is faster
        lines.append(common.table_row(cells + [
            f"**{best:.1f}** ({median:.1f})", f"{prefill * 1e3:.0f}", versus,
            f"{r['first_call_s']:.1f}"]))
    lines += common.closing_lines(raw)
    return "\n".join(lines)


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--quick", action="store_true", help="A smoke run: 8 tokens, 1 round.")
    common.add_backends_list_arg(p)
    p.add_argument("--new-tokens", type=int, default=None, help="Default 64 (8 with --quick).")
    p.add_argument("--rounds", type=int, default=None, help="Default 3 (1 with --quick).")
    p.add_argument("--no-peer", action="store_true", help="Leave out transformers' row.")
    p.add_argument("--timeout", type=float, default=common.CASE_TIMEOUT_S,
                   help="Seconds one backend's process may take.")
    common.add_report_args(p, "Markdown file (default bench/results/float16_guard.md).",
                           json_help="Raw results (default: the markdown's path as .json).",
                           from_json_help="Re-render an earlier run's --json (no measuring).")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = argv
    args.new_tokens = args.new_tokens or (8 if args.quick else 64)
    args.rounds = args.rounds or (1 if args.quick else 3)
    if args.worker:
        common.reply(measure_backend(args))
        return 0
    return common.report_backends(args, DEFAULT_OUTPUT, measure, render)


if __name__ == "__main__":
    sys.exit(main())
