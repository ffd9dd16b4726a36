"""Runner `local`: the worker program as a subprocess of the Airflow worker, its output streamed to the task log."""

from __future__ import annotations

import importlib.util
import logging
import signal
import subprocess
import sys
from collections import deque
from functools import lru_cache
from pathlib import Path
from types import ModuleType

from include.cosmos_upsample.settings import PROJECT_ROOT

WORKER_SCRIPT = PROJECT_ROOT / "docker" / "upsampler" / "worker.py"
GPU_LOCK_NAME = ".gpu.lock"

log = logging.getLogger(__name__)


class WorkerFailed(RuntimeError):
    """The worker stopped before finishing; the ledger keeps what it finished, so a retry resumes."""


def local_worker_command(job_dir: Path, python: str = sys.executable) -> list[str]:
    # Jobs of all runs on this machine share one lock: one model in memory at a time.
    return [python, str(WORKER_SCRIPT), "--job-dir", str(job_dir), "--gpu-lock", str(job_dir.parent / GPU_LOCK_NAME)]


def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def run_local_job(job_dir: Path) -> None:
    command = local_worker_command(job_dir)
    tail: deque[str] = deque(maxlen=15)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in process.stdout:
            tail.append(line.rstrip())
            log.info("worker | %s", line.rstrip())
        code = process.wait()
    finally:
        # If this task is being terminated, take the worker down too: a stray worker must not race the retry.
        if process.poll() is None:
            process.kill()
            process.wait()
    if code != 0:
        raise WorkerFailed(
            f"worker for job {job_dir.name} {describe_exit(code)}; finished items are kept in the ledger and a "
            "retry does only the rest. Last output:\n" + "\n".join(tail)
        )


@lru_cache(maxsize=1)
def worker_module() -> ModuleType:
    """The worker program as a module: it lives in docker/upsampler/ because it ships alone in the GPU image,
    and the DAG side reads its manifests and ledgers with the very same code."""
    spec = importlib.util.spec_from_file_location("cosmos_upsampler_worker", WORKER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module
