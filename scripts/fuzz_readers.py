"""A longer fuzzing run of the checkpoint readers than the test suite's 2,000 cases.

    python scripts/fuzz_readers.py --cases 50000 --seed 1

Builds small checkpoints with gemma_keras' own writers (a random 2-layer Gemma 1 and Gemma 2,
each as a Hugging Face checkpoint in shards and as a keras-hub preset in shards, with the
demo preset's tokenizer), then mutates and loads them as tests/fuzz_readers.py describes.
Prints every finding (a load that ended in anything but success or a GemmaError naming the
file, ran too long, or allocated too much) and exits 1 if there was one.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("KERAS_BACKEND", "jax")


def build_bases(root: pathlib.Path):
    import keras

    import gemma_keras as gk

    spm = REPO / "presets" / "gemma_demo" / "assets" / "tokenizer" / "vocabulary.spm"
    tokenizer = gk.GemmaTokenizer(spm)
    small = dict(vocabulary_size=tokenizer.vocabulary_size, num_layers=2, num_query_heads=2,
                 num_key_value_heads=1, hidden_dim=16, intermediate_dim=32, head_dim=8)
    gemma2 = dict(small, use_post_ffw_norm=True, use_post_attention_norm=True,
                  attention_logit_soft_cap=50.0, final_logit_soft_cap=30.0,
                  use_sliding_window_attention=True, sliding_window_size=4,
                  query_head_dim_normalize=True)
    bases = []
    for name, config in (("gemma", small), ("gemma2", gemma2)):
        keras.utils.set_random_seed(0)
        lm = gk.GemmaCausalLM(gk.GemmaBackbone(gk.GemmaConfig(**config), dtype="float32"),
                              tokenizer)
        for fmt in ("hf", "keras_hub"):
            directory = root / f"{name}_{fmt}"
            lm.save_to_preset(str(directory), format=fmt, max_shard_size=0.00005)
            bases.append(directory)
    return bases


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--time-limit", type=float, default=5.0,
                        help="Seconds a load may take (stopped at twice this).")
    args = parser.parse_args(argv)
    from fuzz_readers import fuzz

    root = pathlib.Path(tempfile.mkdtemp(prefix="gemma_keras_fuzz_"))
    try:
        bases = build_bases(root / "bases")
        work = root / "cases"
        work.mkdir()
        findings = fuzz(bases, args.cases, args.seed, work, time_limit=args.time_limit)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for finding in findings:
        print(finding)
    print(f"{len(findings)} finding(s) in {args.cases} cases (seed {args.seed}).")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
