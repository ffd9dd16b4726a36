"""Errors of model jobs. `NotRetryable` ones cannot be fixed by retrying: the DAG fails such a task at once instead of
waiting out its retries."""

from __future__ import annotations

from collections.abc import Iterable

from include.cosmos_upsample.jobformat import REFUSAL_PREFIX


class NotRetryable(RuntimeError):
    """A configuration problem (a refused host key, say); the message says what to fix."""


class WorkerFailed(RuntimeError):
    """The worker (process or container) stopped before finishing; the ledger keeps what it finished, so a retry
    resumes."""


class PlanNotTheEngines(NotRetryable):
    """The engine counts prompts differently from the plan: a retry would be refused again (fix the tokenizer)."""

    @classmethod
    def from_output(cls, lines: Iterable[str], where: str = "") -> PlanNotTheEngines:
        """From the worker's last lines of output: its refusal, which names both tokenizers."""
        lines = list(lines)
        refusal = [line for line in lines if line.startswith(REFUSAL_PREFIX)] or lines or ["tokenizer mismatch"]
        return cls(f"{where}{refusal[-1]}")
