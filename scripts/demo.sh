#!/usr/bin/env bash
# The main job, from a fresh clone: install gemma_keras (JAX backend) into .venv and run the
# quickstart offline. Override the backend with KERAS_BACKEND=torch|tensorflow.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
backend="${KERAS_BACKEND:-jax}"
pip install -q --disable-pip-version-check --upgrade pip
if [ "$backend" = torch ]; then pip install -q torch==2.13.0; fi
pip install -q --disable-pip-version-check -e ".[$backend]"
KERAS_BACKEND="$backend" python guides/quickstart.py
