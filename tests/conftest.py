"""Shared fixtures: real videos made by ffmpeg, spec folders, and an isolated Airflow home for DAG runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# In-process Airflow (DagBag, dag.test) reads its config at import: point it at this project, not ~/airflow.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="cosmos-airflow-home-"))
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(ROOT / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "docker" / "upsampler"))

from include.cosmos_upsample.deployment import RETRY_DELAY_ENV  # noqa: E402
from tests.helpers import QUALITY_ENV, RELAXED_QUALITY, make_video  # noqa: E402

# The quality gate's content checks are off by default in tests of other concerns (see tests/helpers.py); the gate's
# own tests pass the `quality` Param.
os.environ.setdefault(QUALITY_ENV, json.dumps(RELAXED_QUALITY))


@pytest.fixture(scope="session")
def sample_video(tmp_path_factory) -> Path:
    return make_video(tmp_path_factory.mktemp("videos") / "clip.mp4", 640, 360)


@pytest.fixture(scope="session")
def airflow_home() -> dict[str, str]:
    """Environment for Airflow in and out of process: this session's own migrated SQLite home."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        # Retries are tested by count, never by time: the first retry after 1 s instead of 5.
        RETRY_DELAY_ENV: "1",
    }
    subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], env=env, check=True,
                   capture_output=True)
    return env


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    """One empty SQLite metadata DB, migrated once per session: a fixture that needs an Airflow home of its own
    copies it (`shutil.copyfile(migrated_db, home / "airflow.db")`) instead of migrating again."""
    home = tmp_path_factory.mktemp("migrated-home")
    env = {**os.environ, "AIRFLOW_HOME": str(home),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}"}
    subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], env=env, check=True,
                   capture_output=True)
    return home / "airflow.db"


# The fast tier (`pytest -m fast`, about a minute here): unit tests, DAG integrity and in-process stage runs, all on
# real ffmpeg, the real tokenizer and SQLite; the end-to-end tiers (e2e, remote, browser, vllm, deploy, storage) prove
# the wiring with a few whole runs each.
FAST_FOLDERS = ("unit", "dags", "stages")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).relative_to(ROOT / "tests").parts[0] in FAST_FOLDERS:
            item.add_marker(pytest.mark.fast)
