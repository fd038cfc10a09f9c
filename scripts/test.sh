#!/usr/bin/env bash
# The whole test suite: sets up what is missing (scripts/setup.sh, idempotent), then runs pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -v -rs --durations=30 "$@"
