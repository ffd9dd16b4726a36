"""Live jobs (runner `docker`): before batch plans items, the hosts that ran their earlier jobs are asked what they
hold now. A job whose container still runs is kept whole; the items of jobs on a host that does not answer (a silent
host) are held back, since its container may still be answering them.

Each local job folder records the host its last container ran on (HOST_MARKER_NAME), so a later batch knows whom to
ask.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from include.cosmos_upsample.batching import JobPlan
from include.cosmos_upsample.containers import JOB_LABEL, SLOT_LABEL, running_containers, verified_engine_client
from include.cosmos_upsample.jobformat import MANIFEST_NAME, Job, Ledger
from include.cosmos_upsample.layout import OutputLayout, read_json, write_json_atomic
from include.cosmos_upsample.settings import Settings
from include.cosmos_upsample.ssh_hosts import open_verified, ssh_hook
from include.cosmos_upsample.staging import RemoteJob, sync_ledger

log = logging.getLogger(__name__)

# In the local job folder: which host the job's last container ran on, so a later batch asks that host.
HOST_MARKER_NAME = "host.json"


def mark_host(local_job_dir: Path, conn_id: str, container_name: str) -> None:
    """Record that the job's container now runs on `conn_id` (read back by live_remote_jobs and retention)."""
    write_json_atomic(local_job_dir / HOST_MARKER_NAME, {"conn_id": conn_id, "container": container_name})


def host_of(job_dir: Path) -> str | None:
    """The GPU host (SSH connection id) a job's last container ran on, if it ran on one."""
    try:
        conn_id = read_json(job_dir / HOST_MARKER_NAME)["conn_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return conn_id if isinstance(conn_id, str) and conn_id else None


def _pointed_jobs(layout: OutputLayout, item_keys: Iterable[str]) -> set[str]:
    pointed = set()
    for key in item_keys:
        try:
            pointed.add(layout.answer_pointer(key).read_text(encoding="utf-8").strip())
        except OSError:
            continue
    return pointed


def _hosts_of(layout: OutputLayout, job_keys: Iterable[str]) -> dict[str, list[str]]:
    """conn_id -> the jobs whose last container ran there (from each job's HOST_MARKER_NAME)."""
    hosts: dict[str, list[str]] = {}
    for job_key in job_keys:
        conn_id = host_of(layout.job_dir(job_key))
        if conn_id:
            hosts.setdefault(conn_id, []).append(job_key)
    return hosts


def _held_on_silent_host(layout: OutputLayout, conn_id: str, job_keys: list[str], wanted: set[str],
                         exc: Exception) -> dict[str, str]:
    """The unanswered items of jobs on a host that could not be asked: its container may still be answering them,
    so planning them into a new job could pay for them twice. Held back (item key -> why) until the host answers."""
    held = {}
    for job_key in job_keys:
        job_dir = layout.job_dir(job_key)
        if not (job_dir / MANIFEST_NAME).exists():
            continue
        job = Job.read(job_dir)
        done = Ledger.of(job_dir).finished_keys(job)  # answers already copied back are merged as usual
        reason = (f"held back: its job {job_key} ran on GPU host {conn_id}, which did not answer ({exc}), and may "
                  "still be answering it there; it is planned again once the host answers. If that host is gone for "
                  f"good, delete {job_dir / HOST_MARKER_NAME} and re-run")
        held.update({item.key: reason for item in job.items
                     if item.key in wanted and item.key not in done})
    return held


def live_remote_jobs(layout: OutputLayout, settings: Settings,
                     item_keys: Iterable[str]) -> tuple[list[JobPlan], dict[str, str]]:
    """Before batch plans these items, ask the hosts that ran their jobs what they hold now.

    Each such job's ledger is copied back first (a container that outlived its killed task kept answering), so
    `earlier_answers` sees every answer the host has. A job whose container still runs is returned, to be kept
    whole by plan_jobs instead of re-planned into a second job that would pay for its items again. The unanswered
    items of jobs on a host that cannot be asked are returned too (key -> why), to be held out of every new job.
    """
    wanted = set(item_keys)
    pinned, held = [], {}
    for conn_id, job_keys in _hosts_of(layout, _pointed_jobs(layout, wanted)).items():
        try:
            client = open_verified(ssh_hook(conn_id))
        except Exception as exc:  # noqa: BLE001 - whatever the host's problem, its jobs' items wait for it
            log.warning("could not ask GPU host %s about jobs %s (%s): their unanswered items are held back",
                        conn_id, job_keys, exc)
            held.update(_held_on_silent_host(layout, conn_id, job_keys, wanted, exc))
            continue
        try:
            with client.open_sftp() as sftp:
                for job_key in job_keys:
                    remote = RemoteJob(conn_id, job_key, PurePosixPath(settings.host_work_dir),
                                       PurePosixPath(settings.host_model_dir))
                    sync_ledger(sftp, remote, layout.job_dir(job_key))
            running = running_containers(verified_engine_client(client, 30), JOB_LABEL)
        finally:
            client.close()
        for container in running:
            labels = container.get("Labels") or {}
            job_key = labels.get(JOB_LABEL)
            if job_key in job_keys and (layout.job_dir(job_key) / MANIFEST_NAME).exists():
                slot = labels.get(SLOT_LABEL, "/0").rsplit("/", 1)[-1]
                keys = tuple(item.key for item in Job.read(layout.job_dir(job_key)).items if item.key in wanted)
                log.info("job %s still runs on %s (container %s): kept whole, not re-planned", job_key, conn_id,
                         container.get("Id", "")[:12])
                pinned.append(JobPlan(job_key, conn_id, keys, int(slot) if slot.isdigit() else 0))
    return pinned, held
