"""The project's two kinds of error, and the one place where they meet Airflow's retries.

`NotRetryable`: what only a person can fix (a missing input folder, a bad setting or Variable, an unknown connection
id, a GPU declaration that cannot be used, a refused host key, a worker interpreter or image without its model
library, storage that is not shared). Its message names the fix. Every DAG task is wrapped in `fails_fast`, which
turns it into Airflow's `AirflowFailException`: the task fails on its first try instead of waiting out its retries.

Everything else (a dropped connection, a killed or stalled worker, a timeout) is left to Airflow's retries.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from include.cosmos_upsample.jobformat import REFUSAL_PREFIX

F = TypeVar("F", bound=Callable[..., Any])


class NotRetryable(RuntimeError):
    """A configuration problem that a retry cannot fix; the message says what to fix."""


class SettingsError(NotRetryable, ValueError):
    """A Param, Variable or environment variable whose value cannot be used; the message names it."""


class UnknownConnection(NotRetryable, LookupError):
    """A connection id named by a setting that Airflow does not know."""

    def __init__(self, conn_id: str, setting: str) -> None:
        super().__init__(
            f"connection {conn_id!r} (named in {setting}) is not defined in Airflow; add it (Admin > Connections, "
            f"`airflow connections add {conn_id} ...` or AIRFLOW_CONN_{conn_id.upper()}) or fix {setting}")


class NotThisRunner(RuntimeError):
    """The run's runner is served by the other upsample task (each has its own pool): this one skips itself."""


class WorkerFailed(RuntimeError):
    """The worker (process or container) stopped before finishing; the ledger keeps what it finished, so a retry
    resumes."""


class WorkerRefused(NotRetryable):
    """The worker refused its job for a reason only a person can fix (see jobformat.REFUSAL_PREFIX): its last line of
    output says which and how to fix it."""

    @classmethod
    def from_output(cls, lines: Iterable[str], where: str = "") -> WorkerRefused:
        """From the worker's last lines of output: its refusal, which names the fix."""
        lines = list(lines)
        refusal = [line for line in lines if line.startswith(REFUSAL_PREFIX)] or lines or ["the worker refused"]
        return cls(f"{where}{refusal[-1]}")


# The engine counting prompts differently from the plan is one such refusal (the worker names both tokenizers).
PlanNotTheEngines = WorkerRefused


def last_error_line(lines: Iterable[str]) -> str:
    """What a failed process said last (a traceback ends with the exception), for an item's one-line reason."""
    said = [line.strip() for line in lines if line.strip()]
    return said[-1] if said else "no output"


def is_unknown_connection(exc: BaseException) -> bool:
    """Airflow's "The conn_id `x` isn't defined", raised by a hook looking its connection up."""
    try:
        from airflow.sdk.exceptions import AirflowNotFoundException
    except ImportError:
        return False
    return isinstance(exc, AirflowNotFoundException) and "conn_id" in str(exc)


def is_not_retryable(exc: BaseException) -> bool:
    return isinstance(exc, NotRetryable) or is_unknown_connection(exc)


def fails_fast(task_function: F) -> F:
    """Wrap a DAG task's function: what only a person can fix fails this try for good (AirflowFailException),
    with the message naming the fix; an upsample task that serves another runner skips itself (NotThisRunner);
    any other error is raised as it is, for Airflow to retry."""

    @functools.wraps(task_function)
    def task_body(*args: Any, **kwargs: Any) -> Any:
        try:
            return task_function(*args, **kwargs)
        except NotThisRunner as exc:
            from airflow.sdk.exceptions import AirflowSkipException

            raise AirflowSkipException(str(exc)) from exc
        except Exception as exc:
            if not is_not_retryable(exc):
                raise
            from airflow.sdk.exceptions import AirflowFailException

            message = str(exc) if isinstance(exc, NotRetryable) else (
                f"{exc}: define that connection in Airflow, or fix the setting that names it")
            raise AirflowFailException(message) from exc

    return task_body  # type: ignore[return-value]
