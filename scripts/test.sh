#!/usr/bin/env bash
# The test command, from a fresh clone: install everything the suite needs into .venv, then
# run it once per Keras backend. Extra arguments go to pytest; BACKENDS="jax" narrows the run.
#
# Tiers: numerics, generation, LoRA, export signatures and errors run in every backend's pass;
# end-to-end runs (guides, scripts, CLI subprocesses, the fresh-clone demo, fresh installs) are
# marked `once(backend)` and run in one pass only, spread over the three. `--all` runs every
# test in every pass (before a release).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--all" ]; then
  export GEMMA_KERAS_TEST_ALL=1
  shift
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check --upgrade pip
# Pinned: 2.13.0 is the CPU wheel this machine carries; a looser pin pulls GBs of CUDA.
pip install -q --disable-pip-version-check torch==2.13.0
pip install -q --disable-pip-version-check -e ".[jax,tensorflow,torch,hf,test]"
status=0
summary=""
for backend in ${BACKENDS:-jax tensorflow torch}; do
  echo "=== KERAS_BACKEND=$backend"
  start=$SECONDS
  KERAS_BACKEND=$backend python -m pytest -p no:cacheprovider --durations=15 "$@" || status=1
  summary="$summary$backend: $((SECONDS - start)) s; "
  echo "=== $backend: $((SECONDS - start)) s"
done
echo "=== suite time per backend: $summary(whole script: $SECONDS s)"
exit $status
