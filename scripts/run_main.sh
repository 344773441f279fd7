#!/usr/bin/env bash
# Fresh machine -> trains full / hashing / CAFE DLRMs on synthetic data and prints the comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m examples.main "$@"
