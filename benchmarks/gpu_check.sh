#!/usr/bin/env bash
# The first-GPU check (benchmarks/gpu_check.py): on a CUDA machine, within 8 minutes, MFU of DiT-S/2, B/2 and
# XL/2 (bf16, eager and compiled), Config E / Config A, and a short `mapdit train` run, appended as a dated
# section to BENCHMARKS.md (and written to $OUT when set). On a machine without CUDA: one line, exit 2.
#   benchmarks/gpu_check.sh [--budget SECONDS] [--out DIR] [--benchmarks FILE]
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
# the script stops itself after --budget seconds (default 450); timeout is the backstop: SIGTERM at 8 minutes
# (the script then writes what it measured), SIGKILL 20 s later
exec timeout -s TERM -k 20 480 "$PY" benchmarks/gpu_check.py --command "benchmarks/gpu_check.sh${*:+ $*}" "$@"
