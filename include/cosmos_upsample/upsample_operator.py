"""The DAG's `upsample` task as an operator, because a TaskFlow `@task` cannot defer (resuming calls a method of the
operator by name, and a decorated function has none).

Runner `docker`: the task starts (or adopts) the job's container, then defers to docker_trigger.DockerJobTrigger, so
no worker slot is held while the GPUs work; when the container exits (or stalls, or the try's time is up) the task
resumes in `execute_complete`, fetches the ledger once more, removes the container and raises what a retry can fix
(a non-zero exit, a stall) or what only a person can (a refusal, e.g. a tokenizer mismatch), as before. Other
runners run to the end in `execute`, as the TaskFlow task did. The pattern is the SSH provider's
SSHRemoteJobOperator (apache/airflow providers/ssh/src/airflow/providers/ssh/operators/ssh_remote_job.py).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from airflow.sdk import BaseOperator

from include.cosmos_upsample.batching import PlannedJob
from include.cosmos_upsample.errors import fails_fast

# The trigger's own deadline ends a try past its execution_timeout with a reason; Airflow's trigger timeout, this
# much later, bounds the wait even when no triggerer runs at all.
TRIGGER_TIMEOUT_GRACE = dt.timedelta(minutes=5)


def job_label(job: PlannedJob, where: str) -> str:
    """How an upsample task instance is named in the UI (the map_index_template of both upsample tasks)."""
    return f"job {job.job_key or '-'} ({job.items} prompts) on {job.conn_id or where}"


class UpsampleOperator(BaseOperator):
    template_fields: Sequence[str] = ("run_dir", "job")

    def __init__(self, *, run_dir: str, job: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run_dir, self.job = run_dir, job  # job: batch's PlannedJob as XCom carries it (JSON), once rendered

    def planned_job(self, context: Any) -> PlannedJob:
        """The rendered job, validated, and the task instance named after it in the UI."""
        job = PlannedJob.model_validate(self.job)
        context["job_label"] = job_label(job, "local")
        return job

    @fails_fast
    def execute(self, context: Any) -> dict[str, Any]:
        from include.cosmos_upsample import stages

        job = self.planned_job(context)
        return stages.upsample(self.run_dir, job, context["ti"].map_index, context, defer=self.wait_for)

    def wait_for(self, following: dict[str, Any]) -> NoReturn:
        """Defer to the trigger following the started container (kwargs: stages.upsample), bounded by the try's
        execution_timeout, which Airflow does not apply while a task is deferred."""
        from include.cosmos_upsample.docker_trigger import DockerJobTrigger

        timeout = self.execution_timeout
        deadline = following["started_at"] + timeout.total_seconds() if timeout else None
        self.defer(trigger=DockerJobTrigger(**following, deadline=deadline), method_name="execute_complete",
                   timeout=timeout + TRIGGER_TIMEOUT_GRACE if timeout else None)

    @fails_fast
    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        from include.cosmos_upsample import stages

        job = self.planned_job(context)
        self.log.info("resumed after %.0f s: the container ended its wait with %s", time.time() - event["started_at"],
                      {key: event[key] for key in ("status", "exit_code")})
        return stages.upsample_resumed(self.run_dir, job, context["ti"].map_index, context, event)
