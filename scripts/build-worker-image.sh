#!/usr/bin/env bash
# Build the worker image's `cpu` target (llama.cpp backend) in the test bed's container engine, from local wheels:
# no registry and no network are needed inside the build. The GPU image is built the same way with `--target gpu`
# on a machine that can pull the vLLM base image (see README, "Preparing a GPU host").
#   scripts/build-worker-image.sh [TAG]      default TAG: cosmos-upsampler:cpu
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
tag="${1:-cosmos-upsampler:cpu}"
eval "$(bash scripts/testbed.sh env)"   # podman's storage and config of the test bed

wheels=docker/upsampler/wheels
mkdir -p "$wheels"
# The same build flags as .venv, so pip's wheel cache serves the llama.cpp build instead of compiling again.
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
.venv/bin/pip wheel -q -w "$wheels" -r requirements-local-model.txt

podman build -q -f docker/upsampler/Dockerfile --target cpu -t "$tag" . >/dev/null
echo "worker image: $tag ($(podman image inspect --format '{{.Id}}' "$tag" | cut -c1-12))"
