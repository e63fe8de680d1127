#!/usr/bin/env bash
# Set up .venv (Python 3.12, the project with its test extra) and run the test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/find_python.sh
setup_venv "[test]"
exec .venv/bin/python -m pytest -q "$@"
