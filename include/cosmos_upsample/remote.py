"""Runner `docker`: a job on a GPU host reached over SSH, in the worker image, on one GPU slot of that host.

For each job: ask the host whether a container for the job still runs (a killed task's) and adopt it, else stage the
manifest and hint frames over SFTP (staging.py) and start the worker container on a free slot (`start_docker_job`)
-> while it runs, the trigger the task defers to (docker_trigger.py) follows it with containers.ContainerWatch: the
host's ledger is copied back at a steady interval, so the UI's progress moves and a lost Airflow worker or triggerer
loses nothing the host already answered -> fetch the ledger once more and remove the container, whatever happened
(`finish_docker_job`, in the resumed task).

One SSH connection at a time per job (starting, following, finishing), verified by ssh_hosts.py; it carries both
SFTP and the Docker API (containers.py). No shell string is ever built from a spec.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import PurePosixPath
from typing import Any

from include.cosmos_upsample.batching import PlannedJob
from include.cosmos_upsample.containers import (
    JOB_LABEL,
    SLOT_LABEL,
    SLOT_LOCK_LABEL,
    ContainerWatch,
    container_model,
    container_spec,
    create_container,
    running_containers,
    verified_engine_client,
)
from include.cosmos_upsample.errors import NotRetryable, WorkerFailed, WorkerRefused, last_error_line
from include.cosmos_upsample.gpu_slots import GpuSlot, HostGpus, choose_slot, host_gpus_of, placement, planned_slot
from include.cosmos_upsample.jobformat import EXIT_JOB_BUSY, EXIT_REFUSED, MANIFEST_NAME
from include.cosmos_upsample.layout import read_json
from include.cosmos_upsample.live_jobs import mark_host
from include.cosmos_upsample.settings import Settings
from include.cosmos_upsample.ssh_hosts import open_verified, ssh_hook
from include.cosmos_upsample.staging import RemoteJob, stage_job
from include.cosmos_upsample.watchdog import StallWatch, WorkerStalled

log = logging.getLogger(__name__)


def remote_job(settings: Settings, planned: PlannedJob) -> RemoteJob:
    return RemoteJob(planned.conn_id, planned.job_key, PurePosixPath(settings.host_work_dir),
                     PurePosixPath(settings.host_model_dir))


def _start_or_adopt(api, sftp, settings: Settings, job: RemoteJob, planned_job: PlannedJob, hosts: HostGpus) -> str:
    """The running container of this job (adopted), else a new one on a free slot of the host."""
    mine = running_containers(api, f"{JOB_LABEL}={job.job_key}")
    if mine:
        log.info("job %s already runs on %s in container %s (%s): adopting it, not starting another",
                 job.job_key, job.conn_id, mine[0]["Id"][:12], (mine[0].get("Labels") or {}).get(SLOT_LABEL))
        return mine[0]["Id"]
    for stale in api.containers(all=True, filters={"label": [f"{JOB_LABEL}={job.job_key}"]}):
        api.remove_container(stale["Id"], force=True)  # an exited container of an earlier try
    busy = {(c.get("Labels") or {}).get(SLOT_LOCK_LABEL) for c in running_containers(api, SLOT_LOCK_LABEL)}
    planned = planned_slot(hosts.slots(), job.conn_id, planned_job.slot, planned_job.devices)
    slot: GpuSlot = choose_slot(hosts.slots(), busy, planned)
    place = placement(slot, settings.backend)
    sent = stage_job(sftp, job, read_json(planned_job.job_dir / MANIFEST_NAME), container_model(settings), place.engine)
    log.info("staged job %s on %s: %d frame file(s) sent", job.job_key, job.conn_id, sent)
    spec = container_spec(settings, job, place, uuid.uuid4().hex[:8])
    container_id = create_container(api, spec)
    mark_host(planned_job.job_dir, job.conn_id, spec.name)
    api.start(container_id)
    log.info("started container %s for job %s on slot %s (GPUs %s, lock %s)", spec.name, job.job_key, slot.label,
             list(slot.device_ids) or ("none" if slot.cpu_only else "all"), slot.lock_name)
    return container_id


def start_docker_job(settings: Settings, planned: PlannedJob) -> str:
    """Adopt the job's running container or start one on a free slot; returns its id. The waiting is done elsewhere
    (the task defers to docker_trigger.DockerJobTrigger), then `finish_docker_job`."""
    job = remote_job(settings, planned)
    client = open_verified(ssh_hook(job.conn_id))
    try:
        hosts = host_gpus_of(job.conn_id, client)
        api = verified_engine_client(client, timeout=60)
        with client.open_sftp() as sftp:
            return _start_or_adopt(api, sftp, settings, job, planned, hosts)
    finally:
        client.close()


def trigger_kwargs(settings: Settings, planned: PlannedJob, container_id: str, started_at: float) -> dict[str, Any]:
    """What the trigger following a job's container is made of (docker_trigger.DockerJobTrigger): small values only,
    since Airflow stores them to re-create the trigger in whichever triggerer runs it."""
    return {"conn_id": planned.conn_id, "job_key": planned.job_key, "container_id": container_id,
            "host_work_dir": settings.host_work_dir, "host_model_dir": settings.host_model_dir,
            "local_job_dir": str(planned.job_dir), "sync_seconds": settings.ledger_sync_seconds,
            "stall_timeout_seconds": settings.stall_timeout_seconds, "started_at": started_at}


def _raise_for(event: dict[str, Any], tail: tuple[str, ...], job: RemoteJob, image: str) -> None:
    """The errors of a finished wait, as the task raises them: retried, or (a refusal) failed at once."""
    if event["status"] == "stalled":
        raise WorkerStalled(event["message"])
    if event["status"] == "timeout":
        from airflow.sdk.exceptions import AirflowTaskTimeout

        raise AirflowTaskTimeout(event["message"])  # stage_notes names the bound and its setting
    if event["status"] != "exited":
        error = WorkerFailed if event.get("retryable", True) else NotRetryable
        raise error(f"following the container of job {job.job_key} on {job.conn_id} failed: {event['message']}")
    code = event["exit_code"]
    if code == EXIT_JOB_BUSY:
        raise WorkerFailed(f"job {job.job_key} is held by another worker on {job.conn_id}; the retry adopts it")
    if code == EXIT_REFUSED:
        raise WorkerRefused.from_output(tail, where=f"on {job.conn_id} (image {image}): ")
    if code != 0:
        raise WorkerFailed(
            f"worker container for job {job.job_key} on {job.conn_id} exited with status {code}: "
            f"{last_error_line(tail)}; finished items are kept in the ledger and a retry does only the rest")


def finish_docker_job(settings: Settings, planned: PlannedJob, event: dict[str, Any]) -> dict[str, Any]:
    """After the wait (`event`: ContainerWatch.poll's outcome, or an error of the trigger): stop the container unless
    it exited, fetch the ledger once more, remove the container, then raise what the wait ended with."""
    job, local_job_dir = remote_job(settings, planned), planned.job_dir
    container_id = event["container_id"]
    watch = ContainerWatch(job, container_id, local_job_dir, settings.ledger_sync_seconds,
                           StallWatch(settings.stall_timeout_seconds))
    try:
        info = watch.end(stop=event["status"] != "exited")
    finally:
        watch.close()
    state, labels = info["State"], info["Config"].get("Labels") or {}
    _raise_for(event, watch.tail, job, settings.worker_image)
    return {"container": container_id[:12], "started_at": state.get("StartedAt"),
            "finished_at": state.get("FinishedAt"), "slot_lock": labels.get(SLOT_LOCK_LABEL)}
