"""Shared storage, checked: every task of a run must see the run folder that `discover` wrote.

With several Airflow workers (Celery, Kubernetes) the stages hand each other files under `work_dir` (runs/, jobs/,
hints/; by default `output_dir`), so that folder must be one POSIX file system every worker mounts, with working
`flock` (job locks). A
worker that does not see it would otherwise fail later with a confusing "file not found", or, worse, redo and pay
for finished work. So `discover` writes a marker into the run folder, and every later task looks for it before
doing anything and fails at once, without retries (another try on the same worker cannot see it either).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from pathlib import Path

from include.cosmos_upsample.errors import NotRetryable
from include.cosmos_upsample.layout import read_json, write_json_atomic

MARKER_NAME = ".shared-marker"


class SharedStorageError(NotRetryable):
    """This worker does not see the run folder written by `discover`: `work_dir` is not shared storage."""


def marker_record(host: str, pid: int, now: dt.datetime) -> dict[str, object]:
    return {"host": host, "pid": pid, "written_at": now.isoformat(timespec="seconds")}


def missing_message(run_dir: Path, host: str) -> str:
    return (
        f"shared storage: the run folder {run_dir} has no {MARKER_NAME} as seen from host {host!r}. The discover "
        "task wrote it on the worker that ran it, so this worker does not share that storage. Every Airflow worker "
        "must mount the same work_dir (runs/, jobs/, hints/; by default output_dir) as one POSIX file system with "
        "working flock; see README, 'Shared storage'."
    )


def write_marker(run_dir: Path, run_id: str | None = None) -> Path:
    """Called by `discover`; the record says which worker wrote it, for the error message of one that cannot see it,
    and which run the folder is (its name is a file-safe form of the run id), for retention.py."""
    path = run_dir / MARKER_NAME
    record = marker_record(socket.gethostname(), os.getpid(), dt.datetime.now(dt.UTC))
    write_json_atomic(path, {**record, "run_id": run_id} if run_id else record)
    return path


def read_marker(run_dir: Path) -> dict[str, object] | None:
    try:
        return read_json(run_dir / MARKER_NAME)
    except (OSError, ValueError):
        return None


def require_shared(run_dir: str | Path) -> dict[str, object]:
    """Every task after `discover` calls this first; raises a not-retryable error naming the folder and this host
    (the DAG's `fails_fast` fails the task at once: another try on the same worker cannot see it either)."""
    record = read_marker(Path(run_dir))
    if record is None:
        raise SharedStorageError(missing_message(Path(run_dir), socket.gethostname()))
    return record
