#!/usr/bin/env bash
# Creates .venv (if missing) and installs torchrec_cafe with pinned dependencies.
# CAFE_FBGEMM=cpu|cuda|auto (default auto: cuda when nvidia-smi sees a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
flavour=${CAFE_FBGEMM:-auto}
if [ "$flavour" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then flavour=cuda; else flavour=cpu; fi
fi
case "$flavour" in
  cpu) fbgemm="fbgemm-gpu-cpu==1.8.0" ;;
  cuda) fbgemm="fbgemm-gpu==1.8.0" ;;
  *) echo "CAFE_FBGEMM must be cpu, cuda or auto, got $flavour" >&2; exit 2 ;;
esac
pip install -q --disable-pip-version-check -r requirements.txt "$fbgemm" ${CAFE_EXTRA_REQS:-}
pip install -q --disable-pip-version-check --no-deps torchrec==1.8.0
pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .   # builds torchrec_cafe._C against this torch
