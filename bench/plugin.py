"""The UI plugin with many runs, through the real app: the run list with 1,000 reports against 10, and the run page
of a 10,000-item run.

Each site is what a deployment leaves behind: report files written by the report code (`report.build_report` and
`write_report`, so each has its summary beside it when the code writes one) in one output folder, and a migrated
SQLite metadata DB holding a DagRun of `cosmos_prompt_upsample` per report with the `discover` and `report` XComs the
DAG pushes (rows made through Airflow's models, `DagRun` and `XComModel.set`). Requests go through FastAPI's
TestClient into the plugin app as Airflow mounts it, signed in with a SimpleAuthManager JWT, so the auth checks, the
DB queries, the file reads and the page rendering are all timed.

    plugin_list_ratio_1000_vs_10 = median seconds of GET /upsample-reports/ with 1,000 runs
                                   / the same with 10 runs (same process, side by side)

    .venv/bin/python bench/plugin.py [--runs 1000] [--items 10000]   # last stdout line: one JSON object of figures
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# Run as a script: make the project root and the plugins folder importable.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "plugins"))

from bench.common import CACHE_DIR, PYTHON, median, say  # noqa: E402

DAG_ID = "cosmos_prompt_upsample"
PREFIX = "/upsample-reports"
JWT_SECRET = "upsample-reports-bench-only-" + "0123456789abcdef" * 4
SMALL_RUNS = 10
ITEMS_PER_LISTED_RUN = 100


def report_items(count: int, output_dir: Path) -> list:
    """Items of every status, with prompts of a realistic length (what makes a report heavy to read)."""
    from include.cosmos_upsample.items import Hint, Item, Tokens

    statuses = ("upsampled", "upsampled", "cached", "upsampled", "invalid", "failed")
    items = []
    for index in range(count):
        status = statuses[index % len(statuses)]
        done = status in ("upsampled", "cached")
        items.append(Item(
            spec_id=f"spec-{index:05d}", source_path=f"/data/in/spec-{index:05d}.json", status=status,
            reason=None if done else "video 'clip.mp4' not found under input_dir",
            tokens=Tokens(prompt=500 + index % 3000, budget=3796, engine=500 + index % 3000 if done else None),
            hint=Hint(width=320, height=180, frames=2, source="input_video", times=[0.0, 0.04]),
            output_path=str(output_dir / "specs" / f"spec-{index:05d}.json") if done else None,
            name=f"clip {index}", original_prompt=f"A robot arm picks up red cup number {index} from the table.",
            upsampled_prompt=("In a bright laboratory, a robot arm slowly reaches for a red cup on a white table, "
                              "grips it and lifts it while the camera holds still. " * 3) if done else None,
        ))
    return items


def write_reports(output_dir: Path, runs: int, items: int, first_day: dt.datetime) -> list[dict]:
    """`runs` reports of `items` items each, one per day, as the report task writes them; returns their XComs."""
    from include.cosmos_upsample.report import build_report, write_report
    from include.cosmos_upsample.settings import Settings
    from include.cosmos_upsample.storage import output_layout

    settings = Settings(output_dir=str(output_dir), backend="vllm")
    layout = output_layout(str(output_dir))
    shared_items = report_items(items, output_dir)
    written = []
    for index in range(runs):
        started = first_day + dt.timedelta(days=index)
        run_id = f"scheduled__{started.isoformat()}"
        report = build_report(run_id=run_id, dag_id=DAG_ID, started_at=started.isoformat(),
                              finished_at=(started + dt.timedelta(minutes=42)).isoformat(), settings=settings,
                              items=shared_items, stages={"discover": 0.5, "validate": 30.0, "upsample": 2400.0})
        json_path, html_path = write_report(layout, report)
        written.append({"run_id": run_id, "started": started,
                        "location": {"report_json": str(json_path), "report_html": str(html_path),
                                     "counts": report.counts.as_dict(), "output_dir": str(output_dir),
                                     "specs_dir": str(output_dir / "specs"), "storage_conn_id": ""},
                        "run_dir": str(output_dir / "runs" / run_id)})
    return written


def insert_runs(db_path: Path, runs: list[dict]) -> None:
    """A finished DagRun per report, with the XComs the plugin reads (discover's run_dir, report's location)."""
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunType
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    engine = create_engine(f"sqlite:///{db_path}")
    with Session(engine) as session, session.begin():
        for run in runs:
            session.add(DagRun(dag_id=DAG_ID, run_id=run["run_id"], run_type=DagRunType.SCHEDULED,
                               logical_date=run["started"], run_after=run["started"], start_date=run["started"],
                               state=DagRunState.SUCCESS))
        session.flush()
        for run in runs:  # stored as the Task Execution API stores a task's XComs: plain JSON
            XComModel.set("run_dir", run["run_dir"], dag_id=DAG_ID, task_id="discover", run_id=run["run_id"],
                          serialize=False, session=session)
            XComModel.set("report_location", run["location"], dag_id=DAG_ID, task_id="report",
                          run_id=run["run_id"], serialize=False, session=session)
    engine.dispose()


def make_site(work: Path, name: str, migrated_db: Path, runs: int, items: int) -> dict:
    site = work / name
    shutil.rmtree(site, ignore_errors=True)
    output_dir = site / "outputs"
    started = time.perf_counter()
    written = write_reports(output_dir, runs, items, dt.datetime(2023, 1, 1, 6, tzinfo=dt.UTC))
    db_path = site / "airflow.db"
    shutil.copyfile(migrated_db, db_path)
    insert_runs(db_path, written)
    say(f"  site {name}: {runs} report(s) of {items} items and their DagRuns ({time.perf_counter() - started:.1f}s)")
    return {"output_dir": str(output_dir), "db_path": str(db_path), "run_ids": [run["run_id"] for run in written]}


def signed_in_client(site: dict):
    """The plugin app mounted as Airflow mounts it, finding runs in the site's DB and output folder."""
    from airflow.api_fastapi.app import create_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker
    from upsample_reports.app import create_app
    from upsample_reports.reports import DatabaseRuns, DirectoryRuns, RunIndex

    engine = create_engine(f"sqlite:///{site['db_path']}")
    sessions = sessionmaker(bind=engine, expire_on_commit=False).begin
    index = RunIndex(DatabaseRuns(sessions), DirectoryRuns(lambda: [Path(site["output_dir"])]))
    parent = FastAPI()
    parent.mount(PREFIX, create_app(index))
    client = TestClient(parent)
    token = create_auth_manager().generate_jwt(SimpleAuthManagerUser(username="admin", role="admin"))
    client.cookies.set("_token", token)
    return client


def timed_get(client, url: str) -> tuple[float, int]:
    started = time.perf_counter()
    response = client.get(url)
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"GET {url}: {response.status_code} {response.text[:300]}")
    return seconds, len(response.content)


def side_by_side(clients: dict, urls: dict[str, str], rounds: int) -> dict[str, dict]:
    """Per side: the first request (cold caches), then `rounds` requests taken in turn with the other sides', so a
    burst of load on the shared machine hits every side alike; the median of those."""
    first = {name: timed_get(clients[name], url) for name, url in urls.items()}
    samples: dict[str, list[float]] = {name: [] for name in urls}
    for _ in range(rounds):
        for name, url in urls.items():
            samples[name].append(timed_get(clients[name], url)[0])
    return {name: {"first": first[name][0], "bytes": first[name][1], "median": median(samples[name])}
            for name in urls}


def measure(work: Path, runs: int, items: int, rounds: int) -> dict:
    """Inside the private Airflow home: make the three sites, then time the list and run pages side by side."""
    import logging
    from urllib.parse import quote

    for name in ("httpx", "httpx2"):  # one line per request would bury the figures
        logging.getLogger(name).setLevel(logging.WARNING)
    migrated = Path(os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].removeprefix("sqlite:///"))
    small = make_site(work, f"runs-{SMALL_RUNS}", migrated, SMALL_RUNS, ITEMS_PER_LISTED_RUN)
    large = make_site(work, f"runs-{runs}", migrated, runs, ITEMS_PER_LISTED_RUN)
    big_run = make_site(work, f"items-{items}", migrated, 1, items)
    clients = {"small": signed_in_client(small), "large": signed_in_client(large), "big": signed_in_client(big_run)}
    lists = side_by_side(clients, {"small": f"{PREFIX}/", "large": f"{PREFIX}/"}, rounds)
    api = side_by_side(clients, {"small": f"{PREFIX}/api/runs", "large": f"{PREFIX}/api/runs"}, rounds)
    big_url = f"{PREFIX}/runs/{quote(big_run['run_ids'][0], safe='')}"
    pages = side_by_side({**clients, "big_last": clients["big"]},
                         {"small": f"{PREFIX}/runs/{quote(small['run_ids'][0], safe='')}", "big": big_url,
                          "big_last": f"{big_url}?page={-(-items // 200)}"}, rounds)
    return {
        "plugin_list_ratio_1000_vs_10": round(lists["large"]["median"] / lists["small"]["median"], 3),
        "plugin_list_seconds_10": round(lists["small"]["median"], 4),
        "plugin_list_seconds_1000": round(lists["large"]["median"], 4),
        "plugin_list_first_seconds_10": round(lists["small"]["first"], 3),
        "plugin_list_first_seconds_1000": round(lists["large"]["first"], 3),
        "plugin_list_bytes_1000": lists["large"]["bytes"],
        "plugin_api_runs_ratio_1000_vs_10": round(api["large"]["median"] / api["small"]["median"], 3),
        "plugin_runs_listed": runs,
        "plugin_run_page_seconds_10000_items": round(pages["big"]["median"], 4),
        "plugin_run_page_first_seconds_10000_items": round(pages["big"]["first"], 3),
        "plugin_run_page_last_page_seconds_10000_items": round(pages["big_last"]["median"], 4),
        "plugin_run_page_bytes_10000_items": pages["big"]["bytes"],
        "plugin_run_page_seconds_100_items": round(pages["small"]["median"], 4),
        "plugin_run_page_ratio_10000_vs_100_items": round(pages["big"]["median"] / pages["small"]["median"], 3),
        "plugin_run_items": items,
    }


def plugin_figures(env: dict[str, str], work: Path, runs: int = 1000, items: int = 10_000,
                   rounds: int = 9) -> dict:
    """Run `measure` in a child process on the private, migrated Airflow home `env` (Airflow reads its
    configuration once per process, and the auth checks look tokens up in that home's DB)."""
    env = {**env, "AIRFLOW__API_AUTH__JWT_SECRET": JWT_SECRET,
           "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager."
                                          "SimpleAuthManager"}
    command = [PYTHON, str(Path(__file__).resolve()), "--measure", "--workdir", str(work), "--runs", str(runs),
               "--items", str(items), "--rounds", str(rounds)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"bench/plugin.py --measure exited with {done.returncode}:\n{done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    for line in lines[:-1]:
        say(line)
    figures = json.loads(lines[-1])
    say(f"  run list (GET {PREFIX}/): {figures['plugin_list_seconds_1000'] * 1000:.1f} ms with {runs} runs, "
        f"{figures['plugin_list_seconds_10'] * 1000:.1f} ms with {SMALL_RUNS} (medians) -> ratio "
        f"{figures['plugin_list_ratio_1000_vs_10']:.2f}; first request with {runs}: "
        f"{figures['plugin_list_first_seconds_1000']:.2f}s")
    say(f"  run page of a {items}-item run: {figures['plugin_run_page_seconds_10000_items'] * 1000:.1f} ms "
        f"(first {figures['plugin_run_page_first_seconds_10000_items']:.2f}s, "
        f"{figures['plugin_run_page_bytes_10000_items'] / 1024:.0f} KiB); 100-item run "
        f"{figures['plugin_run_page_seconds_100_items'] * 1000:.1f} ms")
    return figures


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="runs in the large site (default 1000)")
    parser.add_argument("--items", type=int, default=10_000, help="items of the big run (default 10000)")
    parser.add_argument("--rounds", type=int, default=9, help="timed requests per page (default 9)")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: bench/.cache/plugin, replaced)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the child process
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.workdir, args.runs, args.items, args.rounds)))
        return 0
    from bench.run import prepare

    env, work = prepare(argparse.Namespace(workdir=args.workdir or CACHE_DIR / "plugin"))
    figures = plugin_figures(env, work, args.runs, args.items, args.rounds)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
