"""Runner `docker` under a real deployment: while its container works, the upsample task is `deferred` and the
triggerer follows the job (no task process runs it), and a triggerer SIGKILLed mid-job and started again loses
nothing and pays nothing twice. LocalExecutor on SQLite and CeleryExecutor on Redis + PostgreSQL, each with
api-server, scheduler, dag-processor and a triggerer; the worker in a container on the podman test bed over SSH."""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from include.cosmos_upsample.jobformat import ANSWER_DELAY_ENV, LEDGER_NAME
from include.cosmos_upsample.settings import DAG_ID
from tests.deploy.airflow_site import AirflowSite
from tests.deploy.checks import deployment_env, deployment_variables
from tests.deploy.conftest import PROMPTS
from tests.deploy.test_celery_executor import start_worker
from tests.helpers import make_video, write_spec
from tests.remote import conftest as remote
from tests.remote.conftest import CONN_ID, WORKER_IMAGE, docker_conf, host_work_dir, ssh_connection
from tests.remote.test_docker_runner import podman

pytestmark = pytest.mark.deploy

testbed = remote.testbed  # sshd + podman + this checkout's worker image
SLOW_IMAGE = f"{WORKER_IMAGE}-slow"
# The task runner's process title (the LocalExecutor's pool processes are `airflow worker -- LocalExecutor: ...`).
TASK_PROCESS_TITLE = re.compile(r"airflow worker -- ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")
# Seconds the worker waits after each answer: long enough to see the task deferred between answers, and for a new
# triggerer to take over (after TRIGGERER_HEALTH_CHECK_THRESHOLD) while the container still runs.
ANSWER_DELAY = 15


@pytest.fixture(scope="module")
def slow_worker_image(testbed, tmp_path_factory) -> str:
    """The test bed's worker image, answering slowly (the worker's fault-injection setting baked in)."""
    context = tmp_path_factory.mktemp("slow-image")
    (context / "Containerfile").write_text(f"FROM {WORKER_IMAGE}\nENV {ANSWER_DELAY_ENV}={ANSWER_DELAY}\n")
    podman(testbed, "build", "-q", "-t", SLOW_IMAGE, "-f", str(context / "Containerfile"), str(context))
    assert SLOW_IMAGE in podman(testbed, "images", "--format", "{{.Repository}}:{{.Tag}}"), f"no {SLOW_IMAGE}"
    return SLOW_IMAGE


@pytest.fixture
def fresh_specs(tmp_path) -> Path:
    """Three specs never upsampled before: the host's job folders outlive a test (a job of the same specs would find
    its answers in the host's ledger and give none while the test watches)."""
    folder = tmp_path / "specs"
    make_video(folder / "clip.mp4", 320, 180)
    for stem, prompt in PROMPTS.items():
        write_spec(folder, stem, prompt=prompt, input_video_path="clip.mp4", metadata={"test": uuid.uuid4().hex})
    return folder


def site_env(tmp_path: Path, testbed: dict[str, str], image: str) -> dict[str, str]:
    return {
        **deployment_env(tmp_path),
        **remote.deployment_env(testbed, **{CONN_ID: ssh_connection(testbed, gpus="none")}),
        "COSMOS_UPSAMPLE_WORKER_IMAGE": image,
        "COSMOS_UPSAMPLE_LEDGER_SYNC_SECONDS": "1",
        # A new triggerer takes over the triggers of one whose heartbeat is older than this (default 30 s).
        "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "10",
    }


@pytest.fixture(params=["LocalExecutor", "CeleryExecutor"])
def deferring_site(request, tmp_path, fresh_specs, testbed, slow_worker_image, migrated_db) -> Iterator[AirflowSite]:
    home = tmp_path / "airflow"
    env = site_env(tmp_path, testbed, slow_worker_image)
    if request.param == "LocalExecutor":
        site = AirflowSite(home=home, executor="LocalExecutor", sql_alchemy_conn=f"sqlite:///{home}/airflow.db",
                           extra_env=env)
    else:
        redis_url, postgres_url = request.getfixturevalue("redis_url"), request.getfixturevalue("postgres_url")
        site = AirflowSite(home=home, executor="CeleryExecutor", sql_alchemy_conn=postgres_url, extra_env={
            **env, "AIRFLOW__CELERY__BROKER_URL": redis_url, "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + postgres_url})
    try:
        site.prepare(deployment_variables(fresh_specs, tmp_path), migrated_db)
        site.start_core(triggerer=True)
        if request.param == "CeleryExecutor":
            worker = start_worker(site, "worker-a")
            site.wait(lambda: " ready." in worker.log.read_text(errors="replace"), 180, "the Celery worker")
        yield site
    finally:
        site.stop()


def task_processes() -> set[str]:
    """The task instance ids of the task processes on this machine (the task runner titles itself
    `airflow worker -- <ti id>`), whatever executor started them."""
    ids = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            title = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if match := TASK_PROCESS_TITLE.match(title):
            ids.add(match.group(1))
    return ids


def ok_lines(ledger: Path) -> Counter:
    lines = [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()] if ledger.exists() else []
    return Counter(line["key"] for line in lines if line["status"] == "ok")


class DeferredWatch:
    """Follows the run's upsample task over REST and the processes of this machine, polled by the test."""

    def __init__(self, site: AirflowSite, run_id: str) -> None:
        self.site, self.run_id = site, run_id
        self.task_ids_seen: set[str] = set()  # every task process seen in the run (the probe sees them)
        self.ledger_sizes_while_deferred: list[int] = []  # polls after its task process had exited

    def upsample_ti(self) -> dict | None:
        tis = [ti for ti in self.site.task_instances(self.run_id) if ti["task_id"] == "upsample"]
        return tis[0] if tis else None

    def poll(self, ledger: Path) -> dict | None:
        size = ledger.stat().st_size if ledger.exists() else 0
        ti = self.upsample_ti()
        running_tasks = task_processes()
        self.task_ids_seen |= running_tasks
        if ti and ti["state"] == "deferred":
            # The task process reports the deferral, then exits: once gone, none runs the task while it is deferred,
            # yet the ledger keeps arriving (only the trigger copies it then).
            if ti["id"] not in running_tasks:
                self.ledger_sizes_while_deferred.append(size)
            else:
                assert not self.ledger_sizes_while_deferred, f"a task process runs {ti['id']} while it is deferred"
        return ti


def test_the_upsample_task_defers_and_a_killed_triggerer_loses_nothing(deferring_site, fresh_specs, testbed,
                                                                          tmp_path):
    site = deferring_site
    output_dir = tmp_path / "outputs"
    run_id = site.trigger(site.form_conf(**docker_conf(fresh_specs, output_dir)))
    site.unpause()
    watch = DeferredWatch(site, run_id)

    def job_ledger() -> Path | None:
        ledgers = list((output_dir / "jobs").glob(f"*/{LEDGER_NAME}"))
        return ledgers[0] if ledgers else None

    def first_answer_copied_while_deferred():
        ledger = job_ledger() or output_dir / "none"
        ti = watch.poll(ledger)
        done = sum(ok_lines(ledger).values())
        assert done < 3, "the job finished before the triggerer could be killed mid-job; nothing was tested"
        return ti and ti["state"] == "deferred" and done >= 1

    site.wait(first_answer_copied_while_deferred, 900, "the deferred upsample task's first answer", interval=0.2)
    ledger = job_ledger()
    at_kill, deferred_polls_before_kill = ledger.stat().st_size, len(watch.ledger_sizes_while_deferred)
    [old] = [service for service in site.services.started if service.name == "triggerer"]
    old.kill_all()  # SIGKILL, mid-job: its trigger's thread and SSH connection die with it
    site.start("triggerer-2", ["triggerer"])

    def finished():
        watch.poll(ledger)
        run = site.run(run_id)
        return run["state"] in ("success", "failed") and run

    run = site.wait(finished, 900, f"DAG run {run_id} to finish", interval=0.5)
    assert run["state"] == "success", (run, site.services.tails())

    sizes = watch.ledger_sizes_while_deferred
    assert sizes and max(sizes) > min(sizes), f"the ledger did not grow while the task was deferred: {sizes}"
    # ... and the new triggerer's trigger copied the answers given after the kill while the task was still deferred.
    assert max(sizes[deferred_polls_before_kill:], default=0) > at_kill, (at_kill, sizes)
    assert watch.task_ids_seen, "no task process was ever seen: the process probe would prove nothing"
    # The new triggerer went on from the bytes the old one had copied: the local ledger is the host's, byte for byte,
    # and every item is answered exactly once (one ok line each), by one worker run (the container was never lost).
    host_ledger = host_work_dir(testbed) / ledger.parent.name / LEDGER_NAME
    assert ledger.read_bytes() == host_ledger.read_bytes()
    assert sorted(ok_lines(ledger).values()) == [1, 1, 1], ok_lines(ledger)
    assert len({json.loads(line)["worker_run"] for line in ledger.read_text().splitlines()}) == 1
    [upsample_try] = site.tries(run_id, "upsample", 0)
    assert upsample_try["state"] == "success" and upsample_try["try_number"] == 1, upsample_try
    # The trigger's lines reach the try's log in the UI: the worker's output and the ledger copies while deferred.
    log = site.get(f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances/upsample/logs/1", map_index=0)
    text = json.dumps(log["content"])
    assert "worker | " in text and "bytes here" in text, text[-3000:]
    report = json.loads(next((output_dir / "reports").glob("*.json")).read_text())
    assert report["counts"]["upsampled"] == 3 and report["counts"]["failed"] == 0, report["counts"]
    print(f"{site.executor}: deferred in {len(sizes)} polls (ledger {min(sizes)} -> {max(sizes)} bytes meanwhile); "
          f"ledger {at_kill} bytes when the triggerer was killed, {ledger.stat().st_size} at the end")
