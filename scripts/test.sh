#!/usr/bin/env bash
# The test command, from a fresh clone: install everything the suite needs into .venv, then
# run it once per Keras backend. Extra arguments go to pytest; BACKENDS="jax" narrows the run.
#
# Tiers: numerics, generation, LoRA, export signatures and errors run in every backend's pass;
# end-to-end runs (guides, scripts, CLI subprocesses, the fresh-clone demo, fresh installs) are
# marked `once(backend)` and run in one pass only, spread over the three. `--all` runs every
# test in every pass (before a release). The passes run side by side (SERIAL=1: in a row).
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
backends=(${BACKENDS:-jax tensorflow torch})
status=0
summary=""
if [ "${SERIAL:-0}" = "1" ] || [ "${#backends[@]}" -eq 1 ]; then
  for backend in "${backends[@]}"; do
    echo "=== KERAS_BACKEND=$backend"
    start=$SECONDS
    KERAS_BACKEND=$backend python -m pytest -p no:cacheprovider --durations=15 "$@" || status=1
    summary="$summary$backend: $((SECONDS - start)) s; "
    echo "=== $backend: $((SECONDS - start)) s"
  done
else
  # The backends' passes run side by side, each in its own process with its own pytest
  # temporary root (pytest prunes old roots it finds, which would include a running
  # sibling's), logs printed whole when all are done. A pass keeps about one core busy (XLA
  # compiles and Python run one thread at a time on these tiny models), so on a 2-core
  # machine three at once finish well before three in a row. SERIAL=1 runs them in a row.
  # One OpenMP thread per pass: PyTorch's OpenMP threads spin while they wait for work, and
  # with three passes on two cores the spinning starved the others (a torch guide run in a
  # subprocess took 300+ s instead of ~90 s). Results do not depend on the thread count.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  logs=$(mktemp -d)
  for backend in "${backends[@]}"; do
    (
      begin=$(date +%s)
      rc=0
      KERAS_BACKEND=$backend python -m pytest -p no:cacheprovider --durations=15 \
        --basetemp="$logs/tmp_$backend" "$@" >"$logs/$backend.log" 2>&1 || rc=$?
      echo "$rc $(( $(date +%s) - begin ))" >"$logs/$backend.rc"
    ) &
  done
  wait
  for backend in "${backends[@]}"; do
    read -r rc seconds <"$logs/$backend.rc"
    echo "=== KERAS_BACKEND=$backend (exit $rc, $seconds s)"
    cat "$logs/$backend.log"
    [ "$rc" = "0" ] || status=1
    summary="$summary$backend: $seconds s; "
  done
  rm -rf "$logs"
fi
echo "=== suite time per backend: $summary(whole script: $SECONDS s)"
exit $status
