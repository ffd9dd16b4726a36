"""Runner `local`: the worker program as a subprocess of the Airflow worker, its output streamed to the task log."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

from include.cosmos_upsample.errors import SettingsError, WorkerFailed, WorkerRefused, last_error_line
from include.cosmos_upsample.jobformat import EXIT_REFUSED, GPU_LOCK_NAME, LEDGER_NAME
from include.cosmos_upsample.settings import PROJECT_ROOT, WORKER_PYTHON_ENV
from include.cosmos_upsample.watchdog import StallWatch

WORKER_SCRIPT = PROJECT_ROOT / "docker" / "upsampler" / "worker.py"
# How often the worker's progress (its ledger's size) is looked at.
POLL_SECONDS = 1.0

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


def _follow(lines, tail: deque[str], watch: StallWatch) -> None:
    """The worker's output, line by line, to the task log (read on a thread: the watchdog must not wait on it)."""
    for line in lines:
        line = line.rstrip()
        tail.append(line)
        watch.worker_said(line)
        log.info("worker | %s", line)


def _ledger_size(job_dir: Path) -> int:
    try:
        return (job_dir / LEDGER_NAME).stat().st_size
    except FileNotFoundError:
        return 0


def _start(command: list[str]) -> subprocess.Popen:
    try:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=worker_environment())
    except OSError as exc:  # worker_python is not an interpreter that can run here
        raise SettingsError(
            f"the worker interpreter {command[0]!r} cannot be run ({exc.strerror or exc}); set the Variable "
            f"cosmos_upsample_worker_python or {WORKER_PYTHON_ENV} to a Python 3.11 with the backend's library, or "
            "leave it empty for Airflow's own") from None


def run_local_job(job_dir: Path, python: str = "", stall_timeout: float = 1800.0) -> None:
    """Run the worker on `job_dir`; a worker that holds its GPU and answers nothing for `stall_timeout` seconds is
    killed (watchdog.StallWatch) and the try fails, to be retried."""
    process = _start(local_worker_command(job_dir, python))
    tail: deque[str] = deque(maxlen=15)
    watch = StallWatch(stall_timeout)
    reader = threading.Thread(target=_follow, args=(process.stdout, tail, watch), daemon=True)
    reader.start()
    try:
        while True:
            watch.ledger_is(_ledger_size(job_dir))
            if watch.stalled():
                raise watch.error(job_dir.name, f"worker pid {process.pid}")
            try:
                code = process.wait(timeout=min(POLL_SECONDS, stall_timeout / 4))
                break
            except subprocess.TimeoutExpired:
                continue
        reader.join(timeout=10)
    finally:
        # If this task is being terminated (or the worker stalled), take the worker down too: a stray worker must not
        # race the retry.
        if process.poll() is None:
            process.kill()
            process.wait()
    if code == EXIT_REFUSED:
        raise WorkerRefused.from_output(tail)
    if code != 0:
        raise WorkerFailed(
            f"worker for job {job_dir.name} {describe_exit(code)}: {last_error_line(tail)}; finished items are kept "
            "in the ledger and a retry does only the rest")
