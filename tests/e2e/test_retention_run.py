"""Retention through the real DAG (`airflow dags test`, real ffmpeg and SmolLM2): the `prune_scratch` teardown of a
run removes the scratch an earlier run left weeks ago, never its outputs or report, and a run that fails stays failed
although its teardown succeeds."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from include.cosmos_upsample.layout import safe_name
from tests.helpers import make_video, run_dag, write_spec

pytestmark = pytest.mark.e2e

DAY = 86400


def age_tree(root: Path, days: float) -> None:
    when = time.time() - days * DAY
    for folder, dirs, files in os.walk(root, topdown=False):
        for name in [*files, *dirs]:
            os.utime(os.path.join(folder, name), (when, when), follow_symlinks=False)


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_id_of(output: str) -> str:
    return next(line.split("run_id=")[1].split(",")[0].strip()
                for line in output.splitlines() if "DagRun Finished" in line and "run_id=" in line)


@pytest.fixture(scope="module")
def two_runs(airflow_home, tmp_path_factory):
    """Run A upsamples spec `first`; weeks pass; run B gets spec `second` only, whose output path is blocked by a
    folder, so B fails (more than max_failure_ratio failed) after its teardown pruned A's scratch."""
    root = tmp_path_factory.mktemp("retention")
    input_dir, output_dir = root / "in", root / "out"
    make_video(input_dir / "first.mp4", 320, 180)
    write_spec(input_dir, "first", input_video_path="first.mp4")
    env = {**airflow_home, "COSMOS_UPSAMPLE_RETENTION_DAYS": "30"}
    conf = {"input_dir": str(input_dir), "output_dir": str(output_dir), "max_output_tokens": 32}
    first = run_dag(env, conf)
    scratch_a = {name: sorted(p.name for p in (output_dir / name).iterdir() if not p.name.startswith("."))
                 for name in ("runs", "jobs", "hints")}
    age_tree(output_dir, 40)
    (input_dir / "first.json").unlink()
    make_video(input_dir / "second.mp4", 256, 144)
    write_spec(input_dir, "second", input_video_path="second.mp4")
    (output_dir / "specs" / "second.json").mkdir(parents=True)
    kept = {name: digests(output_dir / name) for name in ("specs", "reports")}
    second = run_dag(env, conf, expect_success=False)
    return {"output_dir": output_dir, "env": env, "scratch_a": scratch_a, "kept": kept,
            "run_a": run_id_of(first.stdout + first.stderr), "run_b": run_id_of(second.stdout + second.stderr)}


def task_row(env: dict[str, str], run_id: str, task_id: str) -> tuple[str, object]:
    db = env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "").removeprefix("sqlite:///") or str(
        Path(env["AIRFLOW_HOME"]) / "airflow.db")
    with sqlite3.connect(db) as connection:
        state = connection.execute("SELECT state FROM task_instance WHERE dag_id='cosmos_prompt_upsample' AND "
                                   "run_id=? AND task_id=?", (run_id, task_id)).fetchone()[0]
        value = connection.execute("SELECT value FROM xcom WHERE dag_id='cosmos_prompt_upsample' AND run_id=? AND "
                                   "task_id=? AND key='return_value'", (run_id, task_id)).fetchone()
    decoded = json.loads(value[0]) if value else None
    return state, json.loads(decoded) if isinstance(decoded, str) else decoded


class TestRetentionInTheDag:
    def test_the_earlier_runs_scratch_is_pruned(self, two_runs):
        out, a = two_runs["output_dir"], two_runs["scratch_a"]
        assert safe_name(two_runs["run_a"]) in a["runs"] and len(a["jobs"]) == 2  # the job and by-item/
        assert sorted(p.name for p in (out / "runs").iterdir()) == [safe_name(two_runs["run_b"])]
        jobs_now = {p.name for p in (out / "jobs").iterdir() if not p.name.startswith(".")}
        assert not (set(a["jobs"]) - {"by-item"}) & jobs_now  # run A's job is gone
        assert not set(a["hints"]) & {p.name for p in (out / "hints").iterdir()}  # and its hint
        pointers = list((out / "jobs" / "by-item").iterdir())
        assert pointers and all((out / "jobs" / p.read_text().strip()).is_dir() for p in pointers)  # run B's only

    def test_outputs_and_reports_are_never_deleted(self, two_runs):
        out = two_runs["output_dir"]
        assert digests(out / "specs") == two_runs["kept"]["specs"] and (out / "specs" / "first.json").is_file()
        reports = digests(out / "reports")
        assert {k: v for k, v in reports.items() if k in two_runs["kept"]["reports"]} == two_runs["kept"]["reports"]
        assert f"{safe_name(two_runs['run_a'])}.json" in reports

    def test_the_teardown_ran_and_says_what_it_pruned(self, two_runs):
        state, pruned = task_row(two_runs["env"], two_runs["run_b"], "prune_scratch")
        assert state == "success"
        assert pruned["runs"]["pruned"] == 1 and pruned["jobs"]["pruned"] == 1 and pruned["hints"]["pruned"] == 1
        assert pruned["pointers"]["pruned"] == 1 and pruned["jobs"]["bytes"] > 0 and pruned["problems"] == []

    def test_a_failed_run_stays_failed_after_its_teardown(self, two_runs):
        assert task_row(two_runs["env"], two_runs["run_b"], "report")[0] == "failed"
        state, _ = task_row(two_runs["env"], two_runs["run_b"], "prune_scratch")
        assert state == "success"  # and yet run_dag saw the run finish as failed (expect_success=False)
