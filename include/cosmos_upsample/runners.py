"""Runner `local`: the worker program as a subprocess of the Airflow worker, its output streamed to the task log."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path

from include.cosmos_upsample.errors import PlanNotTheEngines, WorkerFailed
from include.cosmos_upsample.jobformat import EXIT_TOKENIZER_MISMATCH, GPU_LOCK_NAME
from include.cosmos_upsample.settings import PROJECT_ROOT

WORKER_SCRIPT = PROJECT_ROOT / "docker" / "upsampler" / "worker.py"

log = logging.getLogger(__name__)


def local_worker_command(job_dir: Path, python: str = "") -> list[str]:
    """`python` is the `worker_python` setting: e.g. a separate vLLM environment; empty: Airflow's interpreter."""
    # Jobs of all runs on this machine share one lock: one model in memory at a time.
    return [python or sys.executable, str(WORKER_SCRIPT), "--job-dir", str(job_dir),
            "--gpu-lock", str(job_dir.parent / GPU_LOCK_NAME)]


def worker_environment(environ: dict[str, str] | os._Environ = os.environ) -> dict[str, str]:
    """The worker imports the shared job and prompt formats from include/ (standard library only), so it also
    runs on an interpreter without Airflow."""
    path = os.pathsep.join(part for part in (str(PROJECT_ROOT), environ.get("PYTHONPATH", "")) if part)
    return {**environ, "PYTHONPATH": path}


def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def run_local_job(job_dir: Path, python: str = "") -> None:
    command = local_worker_command(job_dir, python)
    tail: deque[str] = deque(maxlen=15)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=worker_environment())
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
    if code == EXIT_TOKENIZER_MISMATCH:
        raise PlanNotTheEngines.from_output(tail)
    if code != 0:
        raise WorkerFailed(
            f"worker for job {job_dir.name} {describe_exit(code)}; finished items are kept in the ledger and a "
            "retry does only the rest. Last output:\n" + "\n".join(tail)
        )
