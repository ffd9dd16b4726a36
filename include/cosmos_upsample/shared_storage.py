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
import functools
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


def write_marker(run_dir: Path) -> Path:
    """Called by `discover`; the record says which worker wrote it, for the error message of one that cannot see it."""
    path = run_dir / MARKER_NAME
    write_json_atomic(path, marker_record(socket.gethostname(), os.getpid(), dt.datetime.now(dt.UTC)))
    return path


def read_marker(run_dir: Path) -> dict[str, object] | None:
    try:
        return read_json(run_dir / MARKER_NAME)
    except (OSError, ValueError):
        return None


def require_shared(run_dir: str | Path) -> dict[str, object]:
    """Every task after `discover` calls this first; raises a not-retryable error naming the folder and this host."""
    record = read_marker(Path(run_dir))
    if record is None:
        raise _error_class()(missing_message(Path(run_dir), socket.gethostname()))
    return record


@functools.cache
def _error_class() -> type[SharedStorageError]:
    # Inside an Airflow task the error must also be an AirflowFailException, or the task SDK retries it: retries
    # cannot help a worker that does not mount the storage. Imported lazily: this package imports no Airflow.
    try:
        from airflow.sdk.exceptions import AirflowFailException
    except ImportError:
        return SharedStorageError
    cls = type("AirflowSharedStorageError", (SharedStorageError, AirflowFailException), {"__module__": __name__})
    globals()[cls.__name__] = cls  # findable by name, so the exception pickles like any other
    return cls
