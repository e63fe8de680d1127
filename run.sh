#!/usr/bin/env bash
# Set up .venv (Python 3.12, the project and its dependencies) and run the main job on the
# embedded default model. Extra arguments go to the command.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/find_python.sh
setup_venv ""
exec .venv/bin/gptoss-jax demo "$@"
