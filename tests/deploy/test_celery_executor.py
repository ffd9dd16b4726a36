"""CeleryExecutor on Redis (broker) and PostgreSQL (metadata DB and Celery results), two workers with folders of their
own sharing only output_dir, the upsample tasks on a queue of their own, and one worker SIGKILLed mid-upsample."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from include.cosmos_upsample.deployment import UPSAMPLE_QUEUE_ENV
from tests.deploy.airflow_site import AirflowSite, hosts_of
from tests.deploy.checks import (
    check_finished_run,
    check_scheduled_run,
    deployment_env,
    deployment_variables,
    expected_params,
)
from tests.deploy.worker_identity import WORKER_NAME_ENV
from tests.processes import Service

pytestmark = pytest.mark.deploy

QUEUE = "cosmos_upsample"
WORKERS = ("worker-a", "worker-b")


def start_worker(site: AirflowSite, name: str) -> Service:
    """`airflow celery worker` as on its own machine: its own folder (cwd, logs, temp files), its own host name."""
    folder = site.home.parent / "workers" / name
    (folder / "tmp").mkdir(parents=True, exist_ok=True)
    env = {**site.env, WORKER_NAME_ENV: name, "TMPDIR": str(folder / "tmp"),
           "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(folder / "logs")}
    # Both consume both queues, so whichever survives can take every task, the killed one's retry included.
    return site.start(name, ["celery", "worker", "--queues", f"default,{QUEUE}", "--celery-hostname",
                             f"{name}@%h", "--concurrency", "2", "--skip-serve-logs"], env=env, cwd=folder)


@pytest.fixture
def celery_site(tmp_path, deploy_specs, redis_url, postgres_url) -> Iterator[tuple[AirflowSite, dict[str, Service]]]:
    home = tmp_path / "airflow"
    site = AirflowSite(home=home, executor="CeleryExecutor", sql_alchemy_conn=postgres_url, extra_env={
        "AIRFLOW__CELERY__BROKER_URL": redis_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + postgres_url,
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.deploy.worker_identity.hostname",
        # Read by the dag-processor when it parses the DAG: the upsample tasks go to this queue.
        UPSAMPLE_QUEUE_ENV: QUEUE,
        # A killed worker's task stops heartbeating; the scheduler fails it (then retries it) after this.
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
        **deployment_env(tmp_path),
    })
    try:
        site.prepare(deployment_variables(deploy_specs, tmp_path))
        site.start_core()
        workers = {name: start_worker(site, name) for name in WORKERS}
        for name, worker in workers.items():
            site.wait(lambda worker=worker: " ready." in worker.log.read_text(errors="replace"), 180,
                      f"Celery worker {name} to be ready")
        yield site, workers
    finally:
        site.stop()


def ledger_entries(output_dir: Path) -> list[dict]:
    return [json.loads(line) for path in sorted((output_dir / "jobs").glob("*/ledger.jsonl"))
            for line in path.read_text().splitlines() if line.strip()]


def wait_until_mid_job(site: AirflowSite, run_id: str, output_dir: Path) -> str:
    """The worker host running the upsample task, once its job has ledgered a first answer and not yet the last."""
    def running_upsample():
        tis = [ti for ti in site.task_instances(run_id) if ti["task_id"] == "upsample"]
        return tis and tis[0]["state"] == "running" and tis[0]["hostname"] and tis[0]

    ti = site.wait(running_upsample, 900, "the upsample task to run on a Celery worker")

    def first_answer():
        done = sum(entry["status"] == "ok" for entry in ledger_entries(output_dir))
        assert done < 3, "the job finished before the worker could be killed mid-job; nothing was tested"
        return done >= 1

    site.wait(first_answer, 600, "the first answer in the job's ledger", interval=0.05)
    return ti["hostname"]


def test_two_workers_queue_and_a_worker_killed_mid_upsample(celery_site, deploy_specs, tmp_path):
    site, workers = celery_site
    started = time.monotonic()
    output_dir = tmp_path / "outputs"
    conf = site.form_conf(output_dir=str(output_dir))
    run_id = site.trigger(conf)
    site.unpause()

    victim = wait_until_mid_job(site, run_id, output_dir)
    workers[victim].kill_all()  # as its machine dying: the Celery worker, its pool, the task, the model worker
    [survivor] = set(WORKERS) - {victim}

    run = site.wait_run(run_id, 900)
    assert run["state"] == "success", (run, site.services.tails())
    assert run["conf"] == conf

    # The killed try failed on the victim; the scheduler retried it on the queue, where only the survivor was left.
    tries = site.tries(run_id, "upsample", 0)
    assert [(t["hostname"], t["state"]) for t in tries[:1]] == [(victim, "failed")], tries
    assert (tries[-1]["hostname"], tries[-1]["state"]) == (survivor, "success"), tries
    assert tries[0]["pid"] != tries[-1]["pid"]

    # Nothing paid twice: every item answered exactly once, by two worker processes (before and after the kill).
    entries = ledger_entries(output_dir)
    ok = Counter(entry["key"] for entry in entries if entry["status"] == "ok")
    assert len(ok) == 3 and set(ok.values()) == {1}, ok
    assert len({entry["worker_run"] for entry in entries}) == 2

    tis = site.task_instances(run_id)
    all_tries = [t for ti in tis for t in site.tries(run_id, ti["task_id"], ti["map_index"])]
    assert hosts_of(all_tries) == set(WORKERS), all_tries
    queues = {ti["task_id"]: ti["queue"] for ti in tis}
    assert queues.pop("upsample") == QUEUE and set(queues.values()) == {"default"}, queues

    check_finished_run(site, run_id, deploy_specs, output_dir, expected_params(deploy_specs, tmp_path))
    check_scheduled_run(site, deploy_specs, tmp_path, 900)
    summary = [(t["try_number"], t["hostname"], t["pid"], t["state"]) for t in tries]
    print(f"killed {victim} mid-job; upsample tries (number, host, pid, state): {summary}")
    print(f"CeleryExecutor deployment test: {time.monotonic() - started:.0f} s after the components were up")
