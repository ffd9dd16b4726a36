"""How soon a spec put into a watched bucket is upsampled: put -> run start and put -> spec planned (dry run), medians
over N puts, beside the same moments of a run triggered by hand through the REST API (the trigger form's request).

    .venv/bin/python bench/events.py              # 10 puts and 10 manual triggers, alternating
    .venv/bin/python bench/events.py --puts 5     # last stdout line: one JSON object of figures

A real deployment (tests/deploy/airflow_site.py: api-server, scheduler, dag-processor and triggerer; LocalExecutor,
SQLite), a bucket on the moto server whose ObjectCreated notifications go to an SQS queue
(tests/deploy/bucket_events.py), and the DAG's AssetWatcher reading it (include/cosmos_upsample/events.py). Each put
waits for its run to end before the next, so every put is a run of its own. Times: the put's start (this process),
the run's `queued_at` and `start_date`, and the `report` task's end (the spec's item is final then), all from the
same machine's clock.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# Run as a script: make the project root importable, for `bench`, `include` and `tests` alike.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import CACHE_DIR, say  # noqa: E402
from bench.storage import start_moto  # noqa: E402
from include.cosmos_upsample.settings import DAG_ID  # noqa: E402
from tests.deploy.airflow_site import AirflowSite  # noqa: E402
from tests.deploy.bucket_events import events_env, notifying_bucket  # noqa: E402
from tests.helpers import make_video  # noqa: E402

CONN_ID = "bench_events"
EVENT_PUTS = 10
RUN_TIMEOUT_S = 600


def _epoch(value: str) -> float:
    return dt.datetime.fromisoformat(value).timestamp()


def _spec(stem: str) -> bytes:
    return json.dumps({"id": stem, "prompt": f"A drone flies over field number {stem} at dusk.",
                       "input_video_path": "clip.mp4"}).encode()


def _moments(site: AirflowSite, run: dict, began: float) -> dict[str, float]:
    """Seconds from `began` to the run's creation, its start, and the end of its report task."""
    finished = site.wait_run(run["dag_run_id"], RUN_TIMEOUT_S)
    assert finished["state"] == "success", (finished, site.services.tails())
    [report] = [ti for ti in site.task_instances(run["dag_run_id"]) if ti["task_id"] == "report"]
    return {"to_run_created": _epoch(finished["queued_at"]) - began,
            "to_run_start": _epoch(finished["start_date"]) - began,
            "to_planned": _epoch(report["end_date"]) - began}


def _new_run(site: AirflowSite, run_type: str, known: set[str]) -> dict:
    return site.wait(lambda: next((run for run in site.runs(run_type) if run["dag_run_id"] not in known), None),
                     RUN_TIMEOUT_S, f"a new {run_type} run", interval=0.2)


def event_figures(work: Path, puts: int = EVENT_PUTS) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    moto, endpoint = start_moto(work / "moto.log")
    site = None
    try:
        clip = make_video(work / "clip.mp4", 320, 180).read_bytes()
        bucket = notifying_bucket(endpoint, "cosmos-bench-events", before={"clip.mp4": clip})
        home = work / "airflow"
        site = AirflowSite(home=home, executor="LocalExecutor", sql_alchemy_conn=f"sqlite:///{home}/airflow.db",
                           extra_env={**events_env(bucket, CONN_ID), "COSMOS_UPSAMPLE_INPUT_DIR": bucket.url,
                                      "COSMOS_UPSAMPLE_OUTPUT_DIR": str(work / "outputs"),
                                      "COSMOS_UPSAMPLE_DRY_RUN": "true",
                                      "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5"})
        site.prepare({})
        site.start_core(triggerer=True)
        site.unpause()
        # Before measuring: the @daily run of the unpause, and the run of S3's s3:TestEvent (the watcher is live).
        for run_type in ("scheduled", "asset_triggered"):
            site.wait_run(_new_run(site, run_type, set())["dag_run_id"], RUN_TIMEOUT_S)
        say(f"  deployment up, watcher live; {puts} puts and {puts} manual triggers, alternating")
        events, manual = [], []
        for index in range(puts):
            known = {run["dag_run_id"] for run in site.runs()}
            began = bucket.put(f"spec-{index:02d}.json", _spec(f"{index:02d}"))
            events.append(_moments(site, _new_run(site, "asset_triggered", known), began))
            began = time.time()
            site.trigger(site.form_conf())
            manual.append(_moments(site, _new_run(site, "manual", known), began))
            say(f"  put {index}: run start {events[-1]['to_run_start']:.2f} s, planned {events[-1]['to_planned']:.2f}"
                f" s; manual trigger: run start {manual[-1]['to_run_start']:.2f} s")
    finally:
        if site is not None:
            site.stop()
        moto.terminate()
        moto.wait(timeout=10)
    return summarise(events, manual)


def summarise(events: list[dict[str, float]], manual: list[dict[str, float]]) -> dict:
    def med(rows: list[dict[str, float]], key: str) -> float:
        return round(statistics.median(row[key] for row in rows), 2)

    figures = {"events_puts": len(events),
               "events_put_to_run_created_seconds": med(events, "to_run_created"),
               "events_put_to_run_start_seconds": med(events, "to_run_start"),
               "events_put_to_planned_seconds": med(events, "to_planned"),
               "events_manual_trigger_to_run_start_seconds": med(manual, "to_run_start"),
               "events_manual_trigger_to_planned_seconds": med(manual, "to_planned")}
    figures["events_vs_manual_run_start"] = round(
        figures["events_put_to_run_start_seconds"] / figures["events_manual_trigger_to_run_start_seconds"], 2)
    figures["events_put_to_run_start_seconds_max"] = round(max(row["to_run_start"] for row in events), 2)
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--puts", type=int, default=EVENT_PUTS)
    parser.add_argument("--workdir", type=Path, default=CACHE_DIR / "events", help="scratch (replaced)")
    args = parser.parse_args(argv)
    say(f"== bucket events -> runs of {DAG_ID}, dry run")
    print(json.dumps(event_figures(args.workdir, args.puts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
