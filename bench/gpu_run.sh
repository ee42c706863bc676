#!/usr/bin/env bash
# `make bench-gpu`: bench/gpu_suite.py on this machine's GPU, figures into $OUT (default
# bench/out). Uses .venv where `make setup` made one; else the machine's python3 with the
# wheels of bench/gpu_prepare.sh (a GPU machine without a package index).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/out}
python=.venv/bin/python
if [ ! -x "$python" ]; then
  python=python3
  test -d .gpu/wheels || { echo "no .venv and no .gpu/wheels: run make setup, or bench/gpu_prepare.sh where pip works" >&2; exit 2; }
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/drseg-site .gpu/wheels/*.whl
  export PYTHONPATH="/tmp/drseg-site:$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
idrid=${IDRID:-.gpu/idrid}
photographs=()
test -d .gpu/photographs && photographs=(--photographs .gpu/photographs)
PYTHONUNBUFFERED=1 "$python" bench/gpu_suite.py --idrid "$idrid" --out "$out" "${photographs[@]}" "$@"
