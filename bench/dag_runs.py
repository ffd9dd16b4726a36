"""Real `airflow dags test` runs and what they left: the metadata DB, the run folder, the report."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from bench.common import AIRFLOW_CLI, DAG_ID, BenchError, metadata_db, run_logged
from include.cosmos_upsample.layout import OutputLayout, read_json

# The worker prints this once per job, right after its one model load.
MODEL_LOADED = re.compile(r"model \S+ \(\w+\) loaded in")


@dataclass(frozen=True)
class DagRun:
    run_id: str
    wall_seconds: float  # the whole `airflow dags test` command, as a user waits for it
    run_seconds: float  # dag_run start to end in the metadata DB
    output: str
    output_dir: Path

    @property
    def run_dir(self) -> Path:
        return OutputLayout.at(self.output_dir).run_dir(self.run_id)

    def report(self) -> dict:
        return read_json(OutputLayout.at(self.output_dir).report_paths(self.run_id)[0])

    def plan_jobs(self) -> list[dict]:
        return OutputLayout.at(self.output_dir).run_folder(self.run_id).planned_jobs()[0]

    def model_loaded_lines(self) -> int:
        return len(MODEL_LOADED.findall(self.output))


def run_dag(env: dict[str, str], conf: dict, log_path: Path) -> DagRun:
    """`airflow dags test cosmos_prompt_upsample -c CONF`, exactly as a user runs it; must succeed."""
    output, wall = run_logged([AIRFLOW_CLI, "dags", "test", DAG_ID, "-c", json.dumps(conf)], env, log_path)
    if "state=success" not in output:
        raise BenchError(f"the DAG run did not succeed; see {log_path}")
    run_id, seconds = _latest_run(env)
    return DagRun(run_id, wall, seconds, output, Path(conf["output_dir"]))


def _latest_run(env: dict[str, str]) -> tuple[str, float]:
    with metadata_db(env) as db:
        run_id, start, end = db.execute(
            "SELECT run_id, start_date, end_date FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1", (DAG_ID,)
        ).fetchone()
    return run_id, (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def task_instances(env: dict[str, str], run_id: str) -> dict[str, int]:
    """Task instances of one DAG run per task id; each mapped instance is its own row, so counted one by one."""
    with metadata_db(env) as db:
        rows = db.execute("SELECT task_id, COUNT(*) FROM task_instance WHERE dag_id = ? AND run_id = ? "
                          "GROUP BY task_id ORDER BY task_id", (DAG_ID, run_id)).fetchall()
    return dict(rows)
