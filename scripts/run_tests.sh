#!/usr/bin/env bash
# Fresh machine -> installs everything and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
CAFE_EXTRA_REQS="-r requirements-dev.txt" bash scripts/setup_env.sh
exec .venv/bin/python -m pytest tests -q "$@"
