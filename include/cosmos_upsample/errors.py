"""Errors of model jobs. `NotRetryable` ones cannot be fixed by retrying: the DAG fails such a task at once instead of
waiting out its retries."""

from __future__ import annotations


class NotRetryable(RuntimeError):
    """A configuration problem (a refused host key, say); the message says what to fix."""


class WorkerFailed(RuntimeError):
    """The worker (process or container) stopped before finishing; the ledger keeps what it finished, so a retry
    resumes."""


class PlanNotTheEngines(NotRetryable):
    """The engine counts prompts differently from the plan: a retry would be refused again (fix the tokenizer)."""
