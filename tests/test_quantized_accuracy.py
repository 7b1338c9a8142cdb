"""Accuracy of the quantized weight formats on the bundled `gemma_demo` (issue 17): the logits
of int8 and int4 models against the float32 model's, on held-out windows of the demo's own
corpus (rebuilt by bench/quantized_accuracy.py with scripts/train_demo_preset.py's functions).
The full measurement (perplexity, greedy agreement, bfloat16, int4 block 32) is
bench/quantized_accuracy.py; its table is bench/results/quantized_accuracy.md."""

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
WINDOWS = 8
# max |logits - float32 logits| / (max - min of the float32 logits), over the first 8 held-out
# windows (2,048 positions x 4,096 ids), logits of `lm.predict`. int8: the bound
# (measured 0.65% with JAX, 2026-12-03). int4, block 128: measured 8.2%; the bound is that
# x 1.5. What they catch (measured): int8 with one projection's scales off by 2% (1.02%) or
# 5% (2.0%) fails; int4 with one projection's scales x 1.5 (15.1%) or its nibbles swapped
# (33.5%) fails, but int4 noise dominates this measure: per-channel int4 (8.3%) and one
# projection's zero points off by one (9.4%) pass.
INT8_BOUND = 0.01
INT4_BOUND = 0.12


def _bench():
    """bench/quantized_accuracy.py, imported as the bench scripts import each other."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import quantized_accuracy
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return quantized_accuracy


@pytest.fixture(scope="module")
def reference():
    """(bench module, the first WINDOWS held-out rows, float32 logits on them)."""
    bench = _bench()
    lm = bench.load("float32")
    rows = bench.held_out_windows(lm.tokenizer, bench.preset_record())[0][:WINDOWS]
    return bench, rows, bench.forward(lm, rows, WINDOWS)[0]


def _error(bench, rows, want, fmt):
    lm = bench.load(fmt)
    if fmt.startswith("int4"):
        assert bench.int4_fallbacks(lm) == []  # every projection on gemma_keras' int4 layout
    got = bench.forward(lm, rows, WINDOWS)[0]
    error, _, _, top1 = bench.logits_error(got, want)
    return error, top1


@pytest.mark.once("jax")
def test_int8_and_int4_logits_stay_within_their_bounds_of_float32(reference):
    bench, rows, want = reference
    int8, int8_top1 = _error(bench, rows, want, "int8")
    int4, int4_top1 = _error(bench, rows, want, "int4")
    assert int8 < INT8_BOUND, f"int8 logits off by {int8:.3%} of the float32 range"
    assert int4 < INT4_BOUND, f"int4 logits off by {int4:.3%} of the float32 range"
    # The measure tells the formats apart: int4 does not pass int8's bound, and int8 keeps
    # nearly every next-token prediction while int4 keeps most.
    assert int4 > INT8_BOUND
    assert int8_top1 > 0.98 and int4_top1 > 0.85, (int8_top1, int4_top1)
