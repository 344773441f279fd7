#!/usr/bin/env bash
# Fresh machine -> installs everything, lints and type-checks the package, runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
CAFE_EXTRA_REQS="-r requirements-dev.txt" bash scripts/setup_env.sh
.venv/bin/ruff check .        # lint (pyproject.toml [tool.ruff])
.venv/bin/mypy                # type check of torchrec_cafe/ (setup.cfg [mypy])
exec .venv/bin/python -m pytest tests -q "$@"
