"""How soon the first model job starts: 1,000 specs through a real deployment (api-server, scheduler, dag-processor,
LocalExecutor with the test sites' 4 worker slots), dry run, runner docker with 2 GPU hosts x 8 GPUs declared in
their connections (16 slots, so 16 chunks) and the `cosmos_gpu` pool sized to the slots.

    first_job_start_fraction = (first upsample task instance's start - first validate's start)
                               / (last validate's end - first validate's start)

Each chunk runs validate -> batch -> upsample on its own (a mapped task group), so a job can start while later
chunks are still validated; with one batch after every validate (the DAG before issue 10) it was >= 1.0 by
construction. A dry run starts each job's task and sends nothing, so Airflow's own scheduling is what is measured.
Side by side, the same run with COSMOS_UPSAMPLE_VALIDATE_CONCURRENCY=0 (no limit on validate tasks at once): the
figures with the suffix `_unlimited`. The task instances of each run are kept in the work folder.

    .venv/bin/python bench/overlap.py [--specs 1000]      # last stdout line: one JSON object of figures
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

# Run as a script: make the project root importable, for `bench`, `include` and `tests` alike.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import CACHE_DIR, say  # noqa: E402
from bench.deploy_runs import bench_site, measured_run  # noqa: E402
from bench.scale import shared_clips  # noqa: E402
from bench.specs import write_specs  # noqa: E402
from include.cosmos_upsample.settings import GPU_POOL  # noqa: E402
from tests.deploy.airflow_site import AIRFLOW  # noqa: E402
from tests.processes import run_checked  # noqa: E402

HOSTS = ("gpu_host_1", "gpu_host_2")
GPUS_PER_HOST = 8


def _time(value: str) -> float:
    return dt.datetime.fromisoformat(value).timestamp()


def start_fraction(task_instances: list[dict]) -> dict:
    """The first upsample's start within the validation window (first validate start -> last validate end)."""
    validates = [ti for ti in task_instances if ti["task_id"] == "validate"]
    upsamples = [ti for ti in task_instances if ti["task_id"] == "upsample"]
    began = min(_time(ti["start_date"]) for ti in validates)
    window = max(_time(ti["end_date"]) for ti in validates) - began
    first_job = min(_time(ti["start_date"]) for ti in upsamples) - began
    return {"first_job_start_fraction": round(first_job / window, 3),
            "first_job_start_seconds": round(first_job, 1), "validate_window_seconds": round(window, 1),
            "overlap_chunks": len(validates),
            "jobs_started_before_validation_ended": sum(_time(ti["start_date"]) < began + window for ti in upsamples)}


def overlap_figures(work: Path, specs: int) -> dict:
    input_dir = work / f"specs-{specs}"
    if not input_dir.is_dir():
        write_specs(input_dir, specs, shared_clips())
    figures = deployed_run(work, input_dir, "default", {})
    unlimited = deployed_run(work, input_dir, "unlimited", {"COSMOS_UPSAMPLE_VALIDATE_CONCURRENCY": "0"})
    figures.update({f"{name}_unlimited": value for name, value in unlimited.items()})
    return figures


def deployed_run(work: Path, input_dir: Path, name: str, extra_env: dict[str, str]) -> dict:
    connections = {f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(
        {"conn_type": "ssh", "host": "127.0.0.1", "extra": {"gpus": list(range(GPUS_PER_HOST)), "gpus_per_job": 1}})
        for conn_id in HOSTS}
    home = work / f"home-overlap-{name}"
    shutil.rmtree(home, ignore_errors=True)
    conf = {"input_dir": str(input_dir), "output_dir": str(work / f"out-overlap-{name}"), "dry_run": True,
            "backend": "vllm", "runner": "docker", "gpu_conn_ids": list(HOSTS)}
    say(f"  {name}: dry run on 2 hosts x {GPUS_PER_HOST} GPUs declared, LocalExecutor, {extra_env or 'defaults'}")
    with bench_site(home, "LocalExecutor", {**connections, **extra_env}) as site:
        run_checked([AIRFLOW, "pools", "set", GPU_POOL, str(len(HOSTS) * GPUS_PER_HOST), "GPU slots"], site.env)
        done = measured_run(site, conf)
    (work / f"overlap-task-instances-{name}.json").write_text(json.dumps(done.task_instances, indent=1))
    figures = {**start_fraction(done.task_instances), "overlap_run_wall_seconds": round(done.wall_seconds, 1),
               "overlap_planned": done.report["counts"].get("planned", 0)}
    say(f"  {name}: first job started {figures['first_job_start_seconds']} s into "
        f"{figures['validate_window_seconds']} s of validation ({figures['overlap_chunks']} chunks): fraction "
        f"{figures['first_job_start_fraction']}; {figures['jobs_started_before_validation_ended']} job(s) started "
        "before validation ended")
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, default=CACHE_DIR / "overlap", help="scratch")
    args = parser.parse_args(argv)
    print(json.dumps(overlap_figures(args.workdir, args.specs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
