"""The same specs through `airflow dags test`, LocalExecutor and CeleryExecutor, side by side in one run.

    .venv/bin/python bench/deploy_runs.py              # 20 specs, the real local model (SmolLM2 via llama.cpp)
    .venv/bin/python bench/deploy_runs.py --dry-run    # plan only: no model, so Airflow's own overhead stands out

For each mode: the wall time a user waits (the `dags test` command; trigger -> finished state seen through the
REST API for the executors), the dag_run's own duration (start -> end in the metadata DB), the seconds inside the
task instances, and the scheduler overhead per task instance = (dag_run duration - task seconds) / task instances
(the tasks of a 20-spec run form one chain: one validate chunk, one model job, so nothing overlaps), and the
start-up inside each task process = (task seconds - the stage functions' own seconds from the report) / task
instances (with `dags test` every task runs in the one process that already imported everything). The executors
run as a deployment does (scripts of tests/deploy: api-server, scheduler, dag-processor; for Celery, Redis and
PostgreSQL from Debian and two workers). The last line of stdout is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

# Run as a script: make the project root importable, for `bench`, `include` and `tests` alike.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.clips import clip  # noqa: E402
from bench.common import CACHE_DIR, airflow_env, metadata_db, migrate, say  # noqa: E402
from bench.dag_runs import run_dag  # noqa: E402
from bench.overhead import CLIP_SHAPES, _warm_model_file  # noqa: E402
from bench.specs import write_specs  # noqa: E402
from include.cosmos_upsample.settings import REPORT_TASK_ID, REPORT_XCOM_KEY  # noqa: E402
from tests.deploy.airflow_site import AirflowSite  # noqa: E402
from tests.deploy.services import postgres_server, redis_server  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", type=int, default=20)
    parser.add_argument("--dry-run", action="store_true", help="plan only (no model time)")
    parser.add_argument("--workdir", type=Path, default=CACHE_DIR / "deploy-runs", help="scratch (replaced)")
    return parser.parse_args(argv)


def _seconds(start: str | None, end: str | None) -> float:
    return (dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds()


def figures(mode: str, wall: float, run_seconds: float, tis: list[dict], report: dict) -> dict:
    task_seconds = sum(ti["duration"] or 0.0 for ti in tis)
    stage_seconds = sum(report["stages"].values())  # the stage functions' own work, as the report records it
    queued = [_seconds(ti["queued_when"], ti["start_date"]) for ti in tis if ti.get("queued_when")]
    result = {"wall_seconds": round(wall, 1), "dag_run_seconds": round(run_seconds, 1),
              "task_seconds": round(task_seconds, 1), "stage_seconds": round(stage_seconds, 1),
              "task_instances": len(tis),
              "overhead_per_ti_seconds": round((run_seconds - task_seconds) / len(tis), 2),
              "in_task_overhead_per_ti_seconds": round((task_seconds - stage_seconds) / len(tis), 2),
              "queued_to_start_median_seconds": round(sorted(queued)[len(queued) // 2], 2) if queued else None}
    say(f"  {mode}: wall {result['wall_seconds']} s, dag_run {result['dag_run_seconds']} s, inside tasks "
        f"{result['task_seconds']} s (stage work {result['stage_seconds']} s), {len(tis)} task instances -> "
        f"scheduler overhead {result['overhead_per_ti_seconds']} s per task instance, in-task start-up "
        f"{result['in_task_overhead_per_ti_seconds']} s (queued -> running, median: "
        f"{result['queued_to_start_median_seconds']} s)")
    return result


def dags_test(conf: dict, work: Path) -> dict:
    env = airflow_env(work / "home-dags-test")
    migrate(env, work / "logs" / "dags-test-migrate.log")
    run = run_dag(env, conf, work / "logs" / "dags-test.log")
    with metadata_db(env) as db:
        rows = db.execute("SELECT duration, start_date, queued_dttm FROM task_instance WHERE run_id = ?",
                          (run.run_id,)).fetchall()
    tis = [{"duration": duration, "start_date": start, "queued_when": None} for duration, start, _ in rows]
    return figures("dags test", run.wall_seconds, run.run_seconds, tis, run.report())


@dataclass(frozen=True)
class MeasuredRun:
    wall_seconds: float  # trigger -> finished state seen through the REST API
    run: dict
    task_instances: list[dict]
    report: dict


@contextmanager
def bench_site(home: Path, executor: str, extra_env: dict[str, str],
               sql_alchemy_conn: str | None = None) -> Iterator[AirflowSite]:
    """A prepared deployment (migrated DB, GPU pool) for measured runs, stopped afterwards. No @daily run beside the
    measured one: the scheduler creates none, manual runs still run."""
    site = AirflowSite(home=home, executor=executor, sql_alchemy_conn=sql_alchemy_conn or f"sqlite:///{home}/airflow.db",
                       extra_env={**extra_env, "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False"})
    try:
        site.prepare({})
        yield site
    finally:
        site.stop()


def measured_run(site: AirflowSite, conf: dict, workers: int = 0) -> MeasuredRun:
    """Start the components (and `workers` Celery workers), trigger one run with the trigger form's conf, wait for
    its success."""
    site.start_core()
    for index in range(workers):
        name = f"worker-{index}"
        worker = site.start(name, ["celery", "worker", "--queues", "default", "--celery-hostname",
                                   f"{name}@%h", "--concurrency", "2", "--skip-serve-logs"])
        site.wait(lambda worker=worker: " ready." in worker.log.read_text(errors="replace"), 180, f"Celery {name}")
    site.unpause()
    started = time.perf_counter()
    run_id = site.trigger(site.form_conf(**conf))
    run = site.wait_run(run_id, 1800)
    wall = time.perf_counter() - started
    assert run["state"] == "success", f"{site.executor} run {run_id}: {run['state']}\n{site.services.tails()}"
    report = json.loads(Path(site.xcom(run_id, REPORT_TASK_ID, REPORT_XCOM_KEY)["report_json"]).read_text())
    return MeasuredRun(wall, run, site.task_instances(run_id), report)


def deployed(executor: str, conf: dict, work: Path, extra_env: dict[str, str], workers: int = 0) -> dict:
    conn = extra_env.pop("sql_alchemy_conn", None)
    with bench_site(work / f"home-{executor}", executor, extra_env, conn) as site:
        done = measured_run(site, conf, workers)
    return figures(executor, done.wall_seconds, _seconds(done.run["start_date"], done.run["end_date"]),
                   done.task_instances, done.report)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    input_dir = work / "specs"
    write_specs(input_dir, args.specs,
                [clip(*CLIP_SHAPES[i % len(CLIP_SHAPES)], 3, variant=i) for i in range(args.specs)], seed=1)
    if not args.dry_run:
        _warm_model_file()
    say(f"== {args.specs} specs, {'dry run' if args.dry_run else 'real local model'}; load {os.getloadavg()[0]:.2f}")

    def conf(mode: str) -> dict:
        return {"input_dir": str(input_dir), "output_dir": str(work / f"out-{mode}"), "dry_run": args.dry_run}

    results = {"specs": args.specs, "dry_run": args.dry_run, "loadavg_1m_at_start": os.getloadavg()[0]}
    results["dags_test"] = dags_test(conf("dags-test"), work)
    results["local"] = deployed("LocalExecutor", conf("local"), work, {})
    with ExitStack() as stack:
        redis_url = stack.enter_context(redis_server(work / "redis"))
        postgres_url = stack.enter_context(postgres_server())
        results["celery"] = deployed("CeleryExecutor", conf("celery"), work, {
            "sql_alchemy_conn": postgres_url, "AIRFLOW__CELERY__BROKER_URL": redis_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + postgres_url}, workers=2)
    results["loadavg_1m_at_end"] = os.getloadavg()[0]
    results["bench_seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
