#!/usr/bin/env bash
# The test command, from a fresh clone: install everything the suite needs into .venv, then
# run it once per Keras backend. Extra arguments go to pytest; BACKENDS="jax" narrows the run.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check --upgrade pip
# Pinned: 2.13.0 is the CPU wheel this machine carries; a looser pin pulls GBs of CUDA.
pip install -q --disable-pip-version-check torch==2.13.0
pip install -q --disable-pip-version-check -e ".[jax,tensorflow,torch,hf,test]"
status=0
for backend in ${BACKENDS:-jax tensorflow torch}; do
  echo "=== KERAS_BACKEND=$backend"
  start=$SECONDS
  KERAS_BACKEND=$backend python -m pytest -p no:cacheprovider "$@" || status=1
  echo "=== $backend: $((SECONDS - start)) s"
done
exit $status
