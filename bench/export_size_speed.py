"""Export sizes, times, peak memory and the decode speed of the exported files.

    python bench/export_size_speed.py                 # the demo preset and the 152M config
    python bench/export_size_speed.py --models demo   # just the bundled demo

Each case runs in a fresh process (KERAS_BACKEND=tensorflow, so the export itself is
in-process and its peak RSS is that process's): build or load the model, export, then time
greedy decoding of the export (SavedModel `generate`; LiteRT through the reference runner,
XNNPACK, 2 threads) and, for reference, `GemmaCausalLM.generate` on the same prompt.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as common  # noqa: E402

# The 152M Gemma-shaped config of bench/generate_speed.py, random weights.
MODELS = {
    "demo": None,
    "152m": dict(vocabulary_size=32000, num_layers=8, num_query_heads=8,
                 num_key_value_heads=1, hidden_dim=1024, intermediate_dim=8192, head_dim=128),
    # Gemma 2B's shapes (256k vocabulary, hidden 2048, MQA, FFN 2 x 16384) with 6 of its 18
    # layers: 1.19 B parameters, the largest export tried on a 24 GiB, 2-core machine.
    "2b_6layers": dict(vocabulary_size=256000, num_layers=6, num_query_heads=8,
                       num_key_value_heads=1, hidden_dim=2048, intermediate_dim=32768,
                       head_dim=256),
}
CASES = [("keras", None), ("saved_model", None), ("litert", None), ("litert", "float16"),
         ("litert", "int8")]
PROMPT_TOKENS, NEW_TOKENS, MAX_LENGTH = 16, 64, 256


def _model(name):
    import gemma_keras as gk

    demo = gk.GemmaCausalLM.from_preset("gemma_demo", dtype="float32")
    if MODELS[name] is None:
        return demo
    import keras

    keras.utils.set_random_seed(0)
    backbone = gk.GemmaBackbone(gk.GemmaConfig(**MODELS[name]), dtype="float32")
    return gk.GemmaCausalLM(backbone, demo.tokenizer)


def worker(name, fmt, quantize):
    import numpy as np

    import gemma_keras as gk

    lm = _model(name)
    ids = [lm.tokenizer.bos_token_id] + list(range(100, 100 + PROMPT_TOKENS - 1))
    result = {"params": lm.backbone.config.parameter_count()}
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / ("x.tflite" if fmt == "litert" else "sm")
        if fmt == "keras":
            inputs = {"token_ids": np.array([ids], "int32"),
                      "padding_mask": np.ones((1, len(ids)), bool)}
            def run_once():
                lm.generate(inputs, max_new_tokens=NEW_TOKENS, stop_token_ids=None)
                return NEW_TOKENS
        else:
            start = time.perf_counter()
            gk.export(lm, path, format=fmt, quantize=quantize, max_length=MAX_LENGTH,
                      prefill_length=32)
            result["export_s"] = time.perf_counter() - start
            files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
            result["mib"] = sum(f.stat().st_size for f in files) / 2 ** 20
            del lm
            if fmt == "litert":
                from gemma_keras.exporting.runner import LiteRTGenerator

                runner = LiteRTGenerator(path, num_threads=2)
                runner.stop_token_ids = set()  # always NEW_TOKENS tokens
                def run_once():
                    return len(runner.generate_ids(ids, NEW_TOKENS))
            else:
                import tensorflow as tf

                generate = tf.saved_model.load(str(path)).signatures["generate"]
                def run_once():  # stops early at <eos>, hence the count
                    out = generate(prompts=tf.constant(["json.dumps("]),
                                   max_new_tokens=tf.constant(NEW_TOKENS))
                    return int(out["num_tokens"][0]) + 1
        result["first_s"], _ = common.timed(run_once)
        result["tokens_per_s"] = max(tokens / seconds for seconds, tokens in
                                     (common.timed(run_once) for _ in range(3)))
    result["peak_rss_gib"] = common.proc_status()["VmHWM"] / 2 ** 30
    return result


def main(argv=None):
    parser = common.parser(__doc__)
    parser.add_argument("--models", nargs="+", default=["demo", "152m"], choices=list(MODELS))
    parser.add_argument("--cases", nargs="+", choices=[f"{f}:{q}" for f, q in CASES],
                        help="format:quantize pairs (default: all)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        name, fmt, quantize = args.worker
        common.reply(worker(name, fmt, None if quantize == "none" else quantize))
        return 0
    lines = [f"Export, {NEW_TOKENS} greedy tokens after a {PROMPT_TOKENS}-token prompt, cache "
             f"{MAX_LENGTH} (best of 3, after a first call), batch 1, float32 model.", ""]
    lines += common.machine_lines(common.args_line(__file__, argv))
    lines += ["", *common.table_head(["model", "params", "target", "export s", "size MiB",
                                      "peak RSS GiB", "first call s", "decode tokens/s"],
                                     "l" * 8)]
    for name in args.models:
        for fmt, quantize in CASES:
            if args.cases and f"{fmt}:{quantize}" not in args.cases:
                continue
            r = common.result_line(common.run([__file__, "--worker", name, fmt,
                                               quantize or "none"],
                                              env={"KERAS_BACKEND": "tensorflow"}, timeout=1800))
            target = fmt + (f" {quantize}" if quantize else "")
            if fmt == "keras":
                target = "GemmaCausalLM.generate (TF, XLA)"
            row = common.table_row([
                name, f"{r['params'] / 1e6:.1f}M", target, f"{r.get('export_s', float('nan')):.1f}",
                f"{r.get('mib', float('nan')):.1f}", f"{r['peak_rss_gib']:.2f}",
                f"{r['first_s']:.2f}", f"{r['tokens_per_s']:.1f}"])
            print(row, flush=True)
            lines.append(row)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
