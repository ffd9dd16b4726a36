"""The DAG as a user runs it: api-server + scheduler + dag-processor with LocalExecutor on SQLite, triggered through
the REST API with the trigger form's conf, then unpaused so the scheduler makes the @daily run by itself."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from include.cosmos_upsample.shared_storage import write_marker
from tests.deploy.airflow_site import AirflowSite
from tests.deploy.checks import (
    check_finished_run,
    check_scheduled_run,
    deployment_env,
    deployment_variables,
    expected_params,
)

pytestmark = pytest.mark.deploy


@contextmanager
def local_deployment(tmp_path, deploy_specs, migrated_db, **extra_env: str) -> Iterator[AirflowSite]:
    """api-server, scheduler and dag-processor with LocalExecutor on SQLite, the deployment's Variables and
    environment (plus `extra_env`); every component stopped afterwards."""
    home = tmp_path / "airflow"
    site = AirflowSite(home=home, executor="LocalExecutor", sql_alchemy_conn=f"sqlite:///{home}/airflow.db",
                       extra_env={**deployment_env(tmp_path), **extra_env})
    try:
        site.prepare(deployment_variables(deploy_specs, tmp_path), migrated_db)
        site.start_core()
        yield site
    finally:
        site.stop()


@pytest.fixture
def local_site(tmp_path, deploy_specs, migrated_db) -> Iterator[AirflowSite]:
    with local_deployment(tmp_path, deploy_specs, migrated_db) as site:
        yield site


def test_form_trigger_then_daily_schedule(local_site, deploy_specs, tmp_path):
    started = time.monotonic()
    # As the form sends it: every Param present, the ones left empty null (so Variables and env apply), one typed.
    conf = local_site.form_conf(output_dir=str(tmp_path / "outputs"))
    assert conf["input_dir"] is None and conf["max_failure_ratio"] is None and len(conf) >= 15, conf
    # A run folder left weeks ago: the teardown asks the api-server whether its run still runs, then prunes it.
    old_run = tmp_path / "outputs" / "runs" / "scheduled__2020-01-01T00:00:00+00:00"
    write_marker(old_run, old_run.name)
    long_ago = time.time() - 40 * 86400
    for path in (old_run / ".shared-marker", old_run):
        os.utime(path, (long_ago, long_ago))
    run_id = local_site.trigger(conf)
    # A new DAG is paused, so the run waits; the form's user unpauses it, which also starts the @daily schedule.
    assert local_site.run(run_id)["state"] == "queued"
    local_site.unpause()
    run = local_site.wait_run(run_id, 900)
    assert run["state"] == "success", (run, local_site.services.tails())
    assert run["run_type"] == "manual" and run["conf"] == conf

    check_finished_run(local_site, run_id, deploy_specs, tmp_path / "outputs", expected_params(deploy_specs, tmp_path))
    tis = local_site.task_instances(run_id)
    assert {ti["task_id"] for ti in tis} == {"discover", "validate", "batch", "upsample", "upsample_endpoint",
                                             "review_requests", "review", "merge_metadata", "report", "prune_scratch"}
    # prune_scratch (a teardown) asked the api-server for the old run's state through the Execution API, and pruned it.
    assert not old_run.exists()
    # review none: the review task is mapped over no requests, so it is skipped; the scheduler ran the endpoint
    # runner's task (in its own pool) just to skip itself (this run's runner is local); every other task ran once.
    assert {ti["state"] for ti in tis if ti["task_id"] == "review"} == {"skipped"}, tis
    tis = [ti for ti in tis if ti["task_id"] != "review"]
    assert all(ti["state"] == ("skipped" if ti["task_id"] == "upsample_endpoint" else "success")
               and ti["try_number"] == 1 for ti in tis), tis
    # Unlike `dags test`, every task instance ran in a process of its own (XCom went through the Execution API).
    assert len({ti["pid"] for ti in tis}) == len(tis), tis

    check_scheduled_run(local_site, deploy_specs, tmp_path, 900)
    print(f"LocalExecutor deployment test: {time.monotonic() - started:.0f} s after the components were up")


def test_a_chunk_starts_its_job_while_later_chunks_are_validated(tmp_path, deploy_specs, migrated_db):
    """One chunk per spec (batch_max_items 1), one validate at a time (COSMOS_UPSAMPLE_VALIDATE_CONCURRENCY): the
    scheduler runs chunk 0's batch and upsample before the last chunk's validation has ended. With one batch after
    every validate, as before the per-chunk task group, no upsample could start before the last validate ended."""
    with local_deployment(tmp_path, deploy_specs, migrated_db, COSMOS_UPSAMPLE_VALIDATE_CONCURRENCY="1",
                          AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="False") as site:
        site.unpause()
        run_id = site.trigger(site.form_conf(output_dir=str(tmp_path / "outputs"), dry_run=True, batch_max_items=1))
        run = site.wait_run(run_id, 600)
        assert run["state"] == "success", (run, site.services.tails())
        tis = {(ti["task_id"], ti["map_index"]): {**ti, **{key: dt.datetime.fromisoformat(ti[key])
                                                          for key in ("start_date", "end_date")}}
               for ti in site.task_instances(run_id) if ti["start_date"]}  # not the skipped review task
    assert {map_index for task_id, map_index in tis if task_id == "upsample"} == {0, 1, 2}
    validations = sorted((tis["validate", index] for index in range(3)), key=lambda ti: ti["start_date"])
    # One at a time, as configured ...
    assert all(a["end_date"] <= b["start_date"] for a, b in zip(validations, validations[1:], strict=False))
    # ... and the first chunk's job began before the last chunk was validated.
    first_job = min(ti["start_date"] for (task_id, _), ti in tis.items() if task_id == "upsample")
    assert first_job < validations[-1]["end_date"], sorted((ti["start_date"], key) for key, ti in tis.items())
