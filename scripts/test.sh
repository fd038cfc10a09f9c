#!/usr/bin/env bash
# The whole test suite: sets up what is missing (scripts/setup.sh --tests, idempotent), then runs pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests
export CCACHE_BASEDIR=$PWD  # the tests' own builds (cross-compiled kernels, fuzzers) hit the cache from any clone
exec .venv/bin/python -m pytest -v -rs --durations=30 "$@"
