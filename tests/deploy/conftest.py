"""Fixtures of the deployment tests: a small spec folder, and Redis and PostgreSQL for the CeleryExecutor (real
Debian packages, started and stopped here; see services.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.services import postgres_server, redis_server
from tests.helpers import make_video, write_spec

PROMPTS = {
    "arm_cup": "A robot arm picks up a red cup from a wooden table.",
    "forklift": "A forklift carries a pallet of boxes across a warehouse.",
    "drone": "A drone flies low over a field of sunflowers at dusk.",
}


@pytest.fixture(scope="session")
def deploy_specs(tmp_path_factory) -> Path:
    """Three specs sharing one real clip: enough for mapped instances and a kill mid-job, short on 2 cores."""
    folder = tmp_path_factory.mktemp("deploy-specs")
    make_video(folder / "clip.mp4", 320, 180)
    for stem, prompt in PROMPTS.items():
        write_spec(folder, stem, prompt=prompt, input_video_path="clip.mp4")
    return folder


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url
