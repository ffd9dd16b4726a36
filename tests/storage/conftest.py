"""Object storage for the tests: a real moto S3 server on loopback (`python -m moto.server`), the S3 stand-in the
Airflow Amazon provider's own tests use; no S3-compatible server binary is available from the registries here.

The server runs for the session on a free 127.0.0.1 port, its request log kept (a re-run must not GET a video
again), and is stopped at the end. Airflow reaches it through a connection from the environment
(`AIRFLOW_CONN_COSMOS_S3`), in this process and in `airflow dags test` alike.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CONN_ID = "cosmos_s3"
CONN_ENV = "AIRFLOW_CONN_" + CONN_ID.upper()
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 10


@dataclass(frozen=True)
class MotoServer:
    endpoint: str
    log_path: Path

    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request the server logged so far."""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        # werkzeug colours some lines (e.g. 206 range reads) with ANSI codes inside the quotes.
        return re.findall(r'"(?:\x1b\[[\d;]*m)*(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/[\d.]+', text)

    def gets_of(self, suffix: str) -> int:
        return sum(1 for method, path in self.requests() if method == "GET" and path.split("?")[0].endswith(suffix))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory) -> Iterator[MotoServer]:
    port = _free_port()
    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on {endpoint}; see {log_path}") from None
                time.sleep(0.2)
        yield MotoServer(endpoint, log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)


@pytest.fixture(scope="session")
def s3_conn(moto_server: MotoServer) -> str:
    """The Airflow connection, from the environment, for this process and every Airflow subprocess."""
    os.environ[CONN_ENV] = json.dumps({
        "conn_type": "aws", "login": "testing", "password": "testing",
        "extra": {"endpoint_url": moto_server.endpoint, "region_name": "us-east-1"},
    })
    return CONN_ID


@pytest.fixture
def bucket(s3_conn: str, request) -> str:
    """A fresh bucket per test, named after it."""
    from airflow.sdk import ObjectStoragePath

    name = re.sub(r"[^a-z0-9-]+", "-", request.node.originalname.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    ObjectStoragePath(f"s3://{name}/", conn_id=s3_conn).fs.mkdir(name)
    return name
