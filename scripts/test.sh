#!/usr/bin/env bash
# Quick start (b): set up everything the tests need (including the SSH + container test bed), then run them all.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh" --test
source "$ROOT/scripts/airflow-env.sh"
cd "$ROOT"
if [[ -f scripts/testbed.sh ]]; then
  bash scripts/testbed.sh up
fi
python -m pytest "$@"
