#!/usr/bin/env bash
# `make demo`: the local cluster, the operator and a TrainJob through its lifecycle.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${VENV:-.venv}/bin/python" -m largo.dev.demo "$@"
