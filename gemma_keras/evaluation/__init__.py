"""Scoring and evaluation: `score` and the log-likelihoods (`scoring`), and the
lm-evaluation-harness model `gemma_keras` (`harness`, needs the `[eval]` extra)."""

from gemma_keras.evaluation.scoring import (encode_request, loglikelihood,  # noqa: F401
                                            loglikelihood_rolling, loglikelihood_tokens,
                                            rolling_windows, score)
