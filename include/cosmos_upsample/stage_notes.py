"""Why a chunk's stage did not finish, kept for merge to put in the items' reasons.

A task that fails or times out can say why; one that is killed (out of memory, a lost worker, SIGKILL) cannot. So a
stage writes its note when it starts ("did not finish: killed before it could say why"), replaces it with its error
or timeout when it stops on one, and removes it when it succeeds. Whatever is left is the reason merge gives each
item the stage did not finish; no note at all means the stage never started.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from include.cosmos_upsample.deployment import timeout_env
from include.cosmos_upsample.layout import write_local_atomic


def _task_context(context: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The running task's Airflow context (for its try number and timeout); empty outside Airflow."""
    if context:
        return context
    try:
        from airflow.sdk import get_current_context

        return get_current_context()
    except Exception:  # noqa: BLE001 - called directly (tests, benchmarks): no task, no context
        return {}


def one_line(text: str) -> str:
    return " ".join(text.split())


def describe_stop(exc: BaseException, task_id: str, context: Mapping[str, Any]) -> str:
    """An error or a timeout as one line for a reason: a timeout names its bound and the setting that sets it."""
    try:
        from airflow.sdk.exceptions import AirflowTaskTimeout
    except ImportError:  # the worker image has no Airflow; nothing there times out this way
        AirflowTaskTimeout = ()  # noqa: N806
    if isinstance(exc, AirflowTaskTimeout):
        limit = getattr(context.get("task"), "execution_timeout", None)
        after = f" after {limit.total_seconds():.0f} s" if limit else ""
        return f"timed out{after} ({timeout_env(task_id)}); raise that bound, then re-run"
    return one_line(str(exc)) or type(exc).__name__


def _is_deferral(exc: BaseException) -> bool:
    try:
        from airflow.sdk.exceptions import TaskDeferred
    except ImportError:  # the worker image has no Airflow
        return False
    return isinstance(exc, TaskDeferred)


def _write(note: Path, text: str) -> None:
    write_local_atomic(note, [(text + "\n").encode("utf-8")])


@contextmanager
def noting_failure(note: Path, what: str, task_id: str, context: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Keep `note` saying why `what` (e.g. "its validation (chunk-0003)") did not finish, for as long as it has not."""
    context = _task_context(context)
    ti = context.get("ti")
    attempt = f"try {ti.try_number}, " if ti is not None else ""
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    _write(note, f"{what} did not finish ({attempt}started {started}): its task was killed (out of memory, a lost "
                 "worker) before it could say why; see that task's log, then re-run")
    try:
        yield
    except BaseException as exc:
        if _is_deferral(exc):
            raise  # not finished, not failed: the note says "did not finish" until the resumed task ends it
        _write(note, f"{what} did not finish ({attempt}{task_id}): {describe_stop(exc, task_id, context)}")
        raise
    note.unlink(missing_ok=True)


def chunk_stage_reason(note: Path, what: str) -> str:
    """The note a stage left, or: it never started."""
    try:
        return one_line(note.read_text(encoding="utf-8"))
    except OSError:
        return (f"{what} did not finish: it never started (an earlier task of its chunk failed or the run was "
                "stopped), or it ran on a worker that does not see work_dir (README 'Shared storage'); see the run's "
                "task logs, then re-run")
