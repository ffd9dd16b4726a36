"""What only a person can fix fails on its first try, naming the fix (real `airflow dags test` runs, retries on).

Each case is a deployment mistake: a missing input folder, a Variable that is not a number, a GPU connection id
Airflow does not know, a GPU declaration that cannot be used, object storage without a scratch folder, and a worker
interpreter without the backend's library. Airflow would retry each 3 times with backoff; none can succeed, so the
task must fail at once (try_number 1, read from the run's metadata DB) with a message saying what to change.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pytest

from include.cosmos_upsample.settings import DAG_ID
from tests.helpers import latest_report, make_video, run_dag, write_spec

pytestmark = pytest.mark.e2e

BAD_GPU_HOST = json.dumps({"conn_type": "ssh", "host": "gpu.invalid", "login": "cosmos",
                           "extra": {"gpus": [0, 1], "gpus_per_job": 0}})
# conf, extra environment, the task that must fail at once, words its failure must hold
CASES = {
    "missing_input_dir": ({"input_dir": "/nonexistent/cosmos-specs"}, {}, "discover",
                          ["input_dir '/nonexistent/cosmos-specs' is not a folder", "cosmos_upsample_input_dir"]),
    "bad_variable": ({}, {"AIRFLOW_VAR_COSMOS_UPSAMPLE_MAX_MODEL_LEN": "lots"}, "discover",
                     ["max_model_len (from the Variable cosmos_upsample_max_model_len)", "fix that value"]),
    "unknown_connection": ({"runner": "docker", "gpu_conn_ids": ["gpu_nowhere"]}, {}, "discover",
                           ["'gpu_nowhere' (named in gpu_conn_ids) is not defined", "AIRFLOW_CONN_GPU_NOWHERE"]),
    "gpu_declaration": ({"runner": "docker", "gpu_conn_ids": ["gpu_bad"]}, {"AIRFLOW_CONN_GPU_BAD": BAD_GPU_HOST},
                        "discover", ["connection gpu_bad: extra 'gpus_per_job' must be at least 1"]),
    "object_storage_without_scratch": ({"output_dir": "s3://cosmos-bucket/out"}, {}, "discover",
                                       ["needs a separate scratch folder", "cosmos_upsample_work_dir"]),
}


def task_tries(airflow_home: dict[str, str]) -> dict[str, tuple[int, str]]:
    """task_id -> (try_number, state) of the latest run's task instances (first map index), from the metadata DB."""
    with sqlite3.connect(Path(airflow_home["AIRFLOW_HOME"]) / "airflow.db") as db:
        (run_id,) = db.execute("SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1",
                               (DAG_ID,)).fetchone()
        rows = db.execute("SELECT task_id, try_number, state FROM task_instance WHERE dag_id = ? AND run_id = ? "
                          "AND map_index <= 0", (DAG_ID, run_id)).fetchall()
    return {task_id: (try_number, state) for task_id, try_number, state in rows}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_deployment_mistake_fails_its_task_on_the_first_try_naming_the_fix(airflow_home, tmp_path, case):
    conf, env, task_id, words = CASES[case]
    result = run_dag(airflow_home, {"output_dir": str(tmp_path / "out"), **conf}, extra_env=env,
                     expect_success=False)
    log = result.stdout + result.stderr
    assert task_tries(airflow_home)[task_id] == (1, "failed"), log[-5000:]
    for word in words:
        assert word in log, (word, log[-5000:])


def test_a_worker_interpreter_without_the_model_library_fails_at_once_and_says_so(airflow_home, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    make_video(folder / "clip.mp4", 160, 90, seconds=1)
    for index in range(2):
        write_spec(folder, f"spec_{index}", input_video_path="clip.mp4")
    bare = Path(sys.base_prefix) / "bin" / "python3"  # this venv's base interpreter: no llama_cpp
    result = run_dag(airflow_home, {"input_dir": str(folder), "output_dir": str(out)},
                     extra_env={"COSMOS_UPSAMPLE_WORKER_PYTHON": str(bare)}, expect_success=False)
    tries = task_tries(airflow_home)
    assert tries["upsample"] == (1, "failed") and tries["report"] == (1, "failed"), result.stdout[-5000:]
    report = latest_report(out)
    assert report["counts"]["failed"] == 2
    for item in report["items"]:
        assert "refusing job" in item["reason"] and "llama-cpp-python" in item["reason"], item["reason"]
        assert str(bare) in item["reason"] and "worker_python" in item["reason"], item["reason"]
