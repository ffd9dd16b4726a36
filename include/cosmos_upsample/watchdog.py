"""The stall watchdog of both runners: a worker that holds its GPU and adds no line to its job's ledger for
`stall_timeout_seconds` is stopped, and the task's try fails (Airflow retries it; the ledger keeps every finished
answer, so the retry asks only for the rest).

The clock runs only while the worker holds its GPU (slot) lock, from the line it prints then
(jobformat.GPU_HELD_PREFIX): a job waiting for another job's GPU is not stalled, that job's own watchdog bounds the
wait. The model load counts, so the setting must exceed the longest load plus one answer (default 30 minutes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from include.cosmos_upsample.errors import WorkerFailed
from include.cosmos_upsample.jobformat import GPU_HELD_PREFIX


class WorkerStalled(WorkerFailed):
    """No new answer for stall_timeout_seconds while the worker held its GPU; retried like any stopped worker."""


@dataclass
class StallWatch:
    limit: float  # seconds
    clock: Callable[[], float] = time.monotonic
    _quiet_since: float | None = field(default=None, init=False)  # None: the worker does not hold its GPU yet
    _ledger_bytes: int | None = field(default=None, init=False)

    def worker_said(self, line: str) -> None:
        if self._quiet_since is None and line.startswith(GPU_HELD_PREFIX):
            self._quiet_since = self.clock()

    def ledger_is(self, size: int) -> None:
        """The ledger's size now; growth (a new answer) restarts the clock."""
        if size != self._ledger_bytes:
            self._ledger_bytes = size
            if self._quiet_since is not None:
                self._quiet_since = self.clock()

    def stalled(self) -> bool:
        return self._quiet_since is not None and self.clock() - self._quiet_since >= self.limit

    def error(self, job_key: str, worker: str) -> WorkerStalled:
        return WorkerStalled(
            f"job {job_key}: no new answer for {self.limit:g} s while its worker held the GPU (stall_timeout_seconds); "
            f"{worker} was stopped; finished answers are kept in the ledger and a retry does only the rest")
