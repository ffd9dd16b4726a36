"""The trigger the `upsample` task of runner `docker` defers to: it follows the job's container on its GPU host from
the triggerer, so no worker slot is held while the GPUs work.

Modelled on the SSH provider's SSHRemoteJobTrigger (apache/airflow providers/ssh/src/airflow/providers/ssh/triggers/
ssh_remote_job.py, provider 7.0.1): one SSH connection held for the whole wait, reconnected with jittered backoff up
to `max_reconnect_attempts` consecutive failures, any other error ending the wait with an error event, and one
TriggerEvent when the job is done. Unlike that trigger, ours speaks the Docker API and SFTP (paramiko and the Docker
SDK, both blocking), so each poll runs in a thread (asyncio.to_thread) while the event loop serves other triggers.

Each poll (containers.ContainerWatch.poll) looks at the container's state, copies the new bytes of the host's ledger
into the local job folder every ledger_sync_seconds (the UI's progress moves; the triggerer must see work_dir), runs
the stall watchdog and checks the try's deadline. The kwargs are small values (ids, paths, numbers): a restarted
triggerer re-creates the trigger from them and goes on from the ledger bytes already copied, the local file's size.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath
from typing import Any

import paramiko
from airflow.triggers.base import BaseTrigger, TriggerEvent

from include.cosmos_upsample.containers import POLL_SECONDS, ContainerWatch
from include.cosmos_upsample.errors import is_not_retryable
from include.cosmos_upsample.ssh_hosts import HostUnreachable
from include.cosmos_upsample.staging import RemoteJob
from include.cosmos_upsample.watchdog import StallWatch

# A dropped or refused connection: reconnect (as the provider's _CONNECTION_ERRORS, with paramiko's in place of
# asyncssh's). A host-key refusal is not among them: it is not retryable and ends the wait at once.
CONNECTION_ERRORS = (OSError, EOFError, paramiko.SSHException, HostUnreachable)


class DockerJobTrigger(BaseTrigger):
    """Waits for the worker container `container_id` of job `job_key` on the GPU host of `conn_id`; its event is
    ContainerWatch.poll's outcome plus the container id and when the stage started."""

    def __init__(self, conn_id: str, job_key: str, container_id: str, host_work_dir: str, host_model_dir: str,
                 local_job_dir: str, sync_seconds: float, stall_timeout_seconds: float, started_at: float,
                 deadline: float | None = None, max_reconnect_attempts: int = 5) -> None:
        super().__init__()
        self.conn_id, self.job_key, self.container_id = conn_id, job_key, container_id
        self.host_work_dir, self.host_model_dir, self.local_job_dir = host_work_dir, host_model_dir, local_job_dir
        self.sync_seconds, self.stall_timeout_seconds = sync_seconds, stall_timeout_seconds
        self.started_at, self.deadline, self.max_reconnect_attempts = started_at, deadline, max_reconnect_attempts

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}", {
            "conn_id": self.conn_id, "job_key": self.job_key, "container_id": self.container_id,
            "host_work_dir": self.host_work_dir, "host_model_dir": self.host_model_dir,
            "local_job_dir": self.local_job_dir, "sync_seconds": self.sync_seconds,
            "stall_timeout_seconds": self.stall_timeout_seconds, "started_at": self.started_at,
            "deadline": self.deadline, "max_reconnect_attempts": self.max_reconnect_attempts})

    def watch(self) -> ContainerWatch:
        job = RemoteJob(self.conn_id, self.job_key, PurePosixPath(self.host_work_dir),
                        PurePosixPath(self.host_model_dir))
        return ContainerWatch(job, self.container_id, Path(self.local_job_dir), self.sync_seconds,
                              StallWatch(self.stall_timeout_seconds), self.deadline)

    def event(self, outcome: dict[str, Any]) -> TriggerEvent:
        return TriggerEvent({**outcome, "container_id": self.container_id, "started_at": self.started_at})

    @staticmethod
    def reconnect_delay(attempt: int) -> float:
        """Exponential backoff with jitter, as the provider's trigger: many triggers do not retry in lockstep."""
        base = min(2 ** (attempt - 1), 30)
        return base + random.uniform(0, base)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        watch = self.watch()
        failures = 0  # consecutive failed polls; a poll that completes clears it
        try:
            while True:
                try:
                    outcome = await asyncio.to_thread(watch.poll)
                except CONNECTION_ERRORS as exc:
                    failures += 1
                    watch.close()
                    if failures > self.max_reconnect_attempts:
                        raise
                    self.log.warning("lost GPU host %s while following job %s (attempt %d/%d), reconnecting: %s",
                                     self.conn_id, self.job_key, failures, self.max_reconnect_attempts, exc)
                    await asyncio.sleep(self.reconnect_delay(failures))
                    continue
                failures = 0
                if outcome is not None:
                    yield self.event(outcome)
                    return
                await asyncio.sleep(min(POLL_SECONDS, self.sync_seconds))
        except Exception as exc:  # noqa: BLE001 - the resumed task raises it, with its kind (retryable or not)
            self.log.exception("following job %s on %s failed", self.job_key, self.conn_id)
            yield self.event({"status": "error", "exit_code": None, "message": f"{type(exc).__name__}: {exc}",
                              "retryable": not is_not_retryable(exc)})
        finally:
            watch.close()
