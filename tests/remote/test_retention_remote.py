"""Retention on a GPU host (the test bed: sshd on loopback, podman's Docker API behind it): job folders there go with
their local job folders, over the same verified SSH connection the runner uses, and a job whose container still runs
is never touched."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest
from docker.errors import NotFound

from include.cosmos_upsample.containers import JOB_LABEL, verified_engine_client
from include.cosmos_upsample.layout import OutputLayout, write_json_atomic
from include.cosmos_upsample.retention import prune
from include.cosmos_upsample.settings import Settings
from include.cosmos_upsample.ssh_hosts import open_verified, ssh_hook
from tests.remote.conftest import CONN_ID, WORKER_IMAGE, deployment_env, ssh_connection

pytestmark = pytest.mark.remote

DAY = 86400
KEYS = {name: uuid.uuid4().hex[:20] for name in ("done", "running", "recent", "foreign")}


def age(root: Path, days: float = 40) -> None:
    when = time.time() - days * DAY
    for folder, dirs, files in os.walk(root, topdown=False):
        for name in [*files, *dirs]:
            os.utime(os.path.join(folder, name), (when, when), follow_symlinks=False)
    os.utime(root, (when, when))


def host_job(host_work_dir: Path, key: str) -> Path:
    """What staging and a worker container leave on the host: manifest, frames, ledger."""
    folder = host_work_dir / key
    (folder / "frames").mkdir(parents=True)
    (folder / "frames" / "0123abcd.jpg").write_bytes(b"\xff\xd8" + b"jpeg" * 500)
    (folder / "manifest.json").write_text(json.dumps({"job_key": key, "items": []}))
    (folder / "ledger.jsonl").write_text('{"key": "k", "status": "ok"}\n')
    return folder


def local_job(layout: OutputLayout, key: str) -> Path:
    folder = layout.job_dir(key)
    write_json_atomic(folder / "manifest.json", {"job_key": key, "items": []})
    (folder / "ledger.jsonl").write_text('{"key": "k", "status": "ok"}\n')
    write_json_atomic(folder / "host.json", {"conn_id": CONN_ID, "container": f"cosmos-upsample-{key}-x"})
    return folder


@pytest.fixture
def host(testbed, monkeypatch):
    """This test's own job folder on the host, and a verified SSH client to the host's engine."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", ssh_connection(testbed))
    host_work_dir = Path(deployment_env(testbed)["COSMOS_UPSAMPLE_HOST_WORK_DIR"]) / f"retention-{uuid.uuid4().hex}"
    host_work_dir.mkdir(parents=True)
    client = open_verified(ssh_hook(CONN_ID))
    try:
        yield host_work_dir, verified_engine_client(client, 60)
    finally:
        client.close()
        shutil.rmtree(host_work_dir, ignore_errors=True)


@pytest.fixture
def running_container(host):
    """A container labelled as job `running` still running on the host, as one that outlived its task."""
    _, api = host
    created = api.create_container(WORKER_IMAGE, entrypoint=["sleep", "600"], labels={JOB_LABEL: KEYS["running"]},
                                   name=f"cosmos-retention-test-{uuid.uuid4().hex[:8]}")
    api.start(created["Id"])
    try:
        yield created["Id"]
    finally:
        with contextlib.suppress(NotFound):  # the test removes it half-way
            api.remove_container(created["Id"], force=True)


def test_host_folders_go_with_their_jobs_and_a_running_jobs_folder_stays(host, running_container, tmp_path):
    host_work_dir, api = host
    layout = OutputLayout(tmp_path / "work")
    for name in ("done", "running", "recent", "foreign"):
        host_job(host_work_dir, KEYS[name])
    for name in ("done", "running", "recent"):
        local_job(layout, KEYS[name])
    age(host_work_dir)
    age(layout.root)
    # The host's copy of `recent` was answered into yesterday (a container that outlived its task kept going).
    yesterday = time.time() - DAY
    os.utime(host_work_dir / KEYS["recent"] / "ledger.jsonl", (yesterday, yesterday))
    settings = Settings(output_dir=str(layout.root), host_work_dir=str(host_work_dir), retention_days=30)
    done_bytes = sum(p.stat().st_size for p in (host_work_dir / KEYS["done"]).rglob("*") if p.is_file())

    result = prune(settings, keep=layout.root / "runs" / "this", is_live=lambda run_id: False)

    assert result.problems == []
    assert not (host_work_dir / KEYS["done"]).exists() and not layout.job_dir(KEYS["done"]).exists()
    for name in ("running", "recent"):  # kept on the host and here, whole
        assert (host_work_dir / KEYS[name] / "frames" / "0123abcd.jpg").is_file(), name
        assert (layout.job_dir(KEYS[name]) / "ledger.jsonl").is_file(), name
    assert (host_work_dir / KEYS["foreign"]).is_dir()  # no local record: not this work_dir's to delete
    assert (result.host_jobs.pruned, result.jobs.pruned) == (1, 1)
    assert result.host_jobs.bytes == done_bytes > 2000
    assert api.inspect_container(running_container)["State"]["Running"]
    assert not [p for p in host_work_dir.iterdir() if p.name.startswith(".pruning-")]

    # Once its container is gone, the next pass prunes it; a second pass after that prunes nothing more.
    api.remove_container(running_container, force=True)
    again = prune(settings, keep=layout.root / "runs" / "this", is_live=lambda run_id: False)
    assert not (host_work_dir / KEYS["running"]).exists() and not layout.job_dir(KEYS["running"]).exists()
    assert again.host_jobs.pruned == 1
    assert prune(settings, keep=layout.root / "runs" / "this", is_live=lambda run_id: False).host_jobs.pruned == 0
