"""`python -m gemma_keras.evaluation ...`: lm-evaluation-harness' own command line with the
model `gemma_keras` registered.

lm-eval (0.4.13) has no plugin entry point for models, so `lm_eval --model gemma_keras` only
finds the model once `gemma_keras.evaluation.harness` is imported; this imports it and then
hands the same arguments to lm-eval's CLI:

    python -m gemma_keras.evaluation run --model gemma_keras \\
        --model_args preset=gemma2_2b_en,dtype=bfloat16 --tasks hellaswag --batch_size 16
    python -m gemma_keras.evaluation --model gemma_keras --tasks ./my_task.yaml  # "run" implied
    python -m gemma_keras.evaluation run --model gemma_keras --model_args preset=gemma_demo \\
        --tasks ./my_task.yaml --apply_chat_template --limit 10 --batch_size 16
    python -m gemma_keras.evaluation ls tasks

Give the batch size as lm-eval's `--batch_size N`, not in --model_args: lm-eval passes its
own --batch_size (default 1: one request at a time) to every model, and both together are
refused by lm-eval. `--batch_size auto` means 16 here (shapes are bucketed; nothing to
search). Every other lm-eval option (--num_fewshot, --limit, --output_path, --log_samples,
--gen_kwargs, --apply_chat_template, --fewshot_as_multiturn, ...) works as with `--model hf`.

`gemma-keras eval` is the shorter way for the common case (see `gemma-keras eval --help`).
"""

import sys


def main(argv=None):
    try:
        import gemma_keras.evaluation.harness  # noqa: F401  (registers --model gemma_keras)
    except ImportError as e:  # MissingExtraError: lm-eval is not installed
        print(f"python -m gemma_keras.evaluation: error: {e}", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    from gemma_keras.errors import GemmaError
    from gemma_keras.evaluation.harness import quiet_git_hash

    # lm-eval's CLI reads sys.argv (it inserts "run" when no subcommand is given).
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        with quiet_git_hash():  # no git "fatal: not a git repository" line outside one
            cli_evaluate()
    except GemmaError as e:  # a bad --model_args value, a preset not found: one line
        print(f"python -m gemma_keras.evaluation: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
