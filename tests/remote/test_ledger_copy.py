"""Following a job from the triggerer: its ledger copied back over SFTP by two copiers at once (Airflow may run one
trigger twice for a while), and the real trigger through a cut SSH link and a triggerer restart."""

from __future__ import annotations

import asyncio
import importlib
import threading
import time
import uuid
from pathlib import Path, PurePosixPath

import pytest

from include.cosmos_upsample.containers import JOB_LABEL, verified_engine_client
from include.cosmos_upsample.docker_trigger import DockerJobTrigger
from include.cosmos_upsample.jobformat import LEDGER_NAME
from include.cosmos_upsample.ssh_hosts import open_verified, ssh_hook
from include.cosmos_upsample.staging import RemoteJob, sync_ledger
from tests.remote.conftest import CONN_ID, WORKER_IMAGE, first_event, host_work_dir, ssh_connection
from tests.remote.proxy import CuttingProxy

pytestmark = pytest.mark.remote


def test_two_copiers_at_once_copy_every_ledger_byte_exactly_once(testbed, tmp_path, monkeypatch):
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", ssh_connection(testbed))
    job = RemoteJob(CONN_ID, f"copy-{uuid.uuid4().hex[:12]}", PurePosixPath(host_work_dir(testbed)),
                    PurePosixPath("/models"))
    host_ledger = Path(str(job.ledger))
    host_ledger.parent.mkdir(parents=True)
    host_ledger.touch()
    local_job_dir = tmp_path / job.job_key
    local_job_dir.mkdir()
    answering = threading.Event()
    answering.set()
    errors: list[BaseException] = []

    def worker() -> None:  # the worker on the GPU host, appending an answer at a time
        with host_ledger.open("a") as ledger:
            for index in range(150):
                ledger.write(f'{{"key": "k{index}", "status": "ok", "text": "{"x" * 40}"}}\n')
                ledger.flush()
                time.sleep(0.01)
        answering.clear()

    def copier() -> None:  # a trigger: its own SSH connection, copying until the job is done, then once more
        client = open_verified(ssh_hook(CONN_ID))
        try:
            with client.open_sftp() as sftp:
                while answering.is_set():
                    sync_ledger(sftp, job, local_job_dir)
                sync_ledger(sftp, job, local_job_dir)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=worker), threading.Thread(target=copier), threading.Thread(target=copier)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and not any(thread.is_alive() for thread in threads), errors
    # Without the copiers' lock both appended the same tails: lines twice, so answers counted (and merged) twice.
    assert (local_job_dir / LEDGER_NAME).read_bytes() == host_ledger.read_bytes()


def test_a_host_ledger_shorter_than_the_local_copy_replaces_it_whole(testbed, tmp_path, monkeypatch):
    """The host's job folder was cleared and its worker began a new ledger: the local copy is no longer a prefix of
    it, so it is replaced whole (atomically: no temporary file left beside it), and later tails append as usual."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", ssh_connection(testbed))
    job = RemoteJob(CONN_ID, f"short-{uuid.uuid4().hex[:12]}", PurePosixPath(host_work_dir(testbed)),
                    PurePosixPath("/models"))
    host_ledger = Path(str(job.ledger))
    host_ledger.parent.mkdir(parents=True)
    host_ledger.write_bytes(b'{"key": "new0"}\n')
    local_job_dir = tmp_path / job.job_key
    local_job_dir.mkdir()
    (local_job_dir / LEDGER_NAME).write_bytes(b'{"key": "old0"}\n{"key": "old1"}\n')
    client = open_verified(ssh_hook(CONN_ID))
    try:
        with client.open_sftp() as sftp:
            assert sync_ledger(sftp, job, local_job_dir) == host_ledger.stat().st_size
            assert (local_job_dir / LEDGER_NAME).read_bytes() == host_ledger.read_bytes()
            with host_ledger.open("ab") as ledger:
                ledger.write(b'{"key": "new1"}\n')
            sync_ledger(sftp, job, local_job_dir)
    finally:
        client.close()
    assert (local_job_dir / LEDGER_NAME).read_bytes() == host_ledger.read_bytes()
    assert sorted(path.name for path in local_job_dir.iterdir() if path.name != ".lock") == [LEDGER_NAME]


def test_the_trigger_follows_through_a_dropped_link_and_a_triggerer_restart(testbed, tmp_path, monkeypatch):
    """The real trigger follows a real container on the test bed while its host ledger grows: its SSH link is cut
    mid-wait (it reconnects), then it is cancelled (a triggerer going down) and re-created from its serialized kwargs
    (the next triggerer), which goes on until the container exits; every ledger byte arrives exactly once."""
    job = RemoteJob(CONN_ID, f"follow-{uuid.uuid4().hex[:12]}", PurePosixPath(host_work_dir(testbed)),
                    PurePosixPath("/models"))
    host_ledger = Path(str(job.ledger))
    host_ledger.parent.mkdir(parents=True)
    local_job_dir = tmp_path / job.job_key
    local_job_dir.mkdir()
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", ssh_connection(testbed))
    client = open_verified(ssh_hook(CONN_ID))
    api = verified_engine_client(client, timeout=60)
    container = api.create_container(WORKER_IMAGE, entrypoint=["sleep", "20"], labels={JOB_LABEL: job.job_key})["Id"]
    api.start(container)

    def worker() -> None:  # the answers, while the container runs
        with host_ledger.open("a") as ledger:
            for index in range(30):
                ledger.write(f'{{"key": "k{index}", "status": "ok"}}\n')
                ledger.flush()
                time.sleep(0.4)

    writer = threading.Thread(target=worker)
    writer.start()
    try:
        # The first connection (the first trigger's) is cut once its client has sent 12 kB: a few polls in.
        with CuttingProxy(int(testbed["COSMOS_TESTBED_SSH_PORT"]), cut_after=12_000) as proxy:
            monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", ssh_connection(testbed, port=proxy.port))
            first = DockerJobTrigger(CONN_ID, job.job_key, container, str(job.host_work_dir), "/models",
                                     str(local_job_dir), sync_seconds=0.5, stall_timeout_seconds=600,
                                     started_at=time.time())
            assert asyncio.run(first_event(first, within=8)) is None  # still running: the triggerer goes down
            copied = (local_job_dir / LEDGER_NAME).stat().st_size
            classpath, kwargs = first.serialize()
            again = getattr(importlib.import_module(classpath.rpartition(".")[0]), classpath.rpartition(".")[2])
            event = asyncio.run(first_event(again(**kwargs)))
        assert proxy.cuts == 1
    finally:
        writer.join(timeout=60)
        api.remove_container(container, force=True)
        client.close()
    assert event.payload["status"] == "exited" and event.payload["exit_code"] == 0, event.payload
    assert event.payload["container_id"] == container
    assert 0 < copied < host_ledger.stat().st_size  # the first trigger copied some, the second the rest
    assert (local_job_dir / LEDGER_NAME).read_bytes() == host_ledger.read_bytes()
