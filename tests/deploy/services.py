"""Redis and PostgreSQL from Debian's packages, each on a free loopback port with a data folder of its own, for the
CeleryExecutor deployment (tests/deploy and bench/deploy_runs.py). Started here, stopped with their whole process
group whatever happened."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.processes import Service, free_port, run_checked, wait_for


def _redis_pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """`redis-server` without persistence (the broker's queues live as long as the test); yields its URL."""
    server = shutil.which("redis-server")
    assert server, "redis-server is missing: run `scripts/setup.sh --test` (installs Debian's redis-server)"
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    service = Service("redis", [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                                "--save", "", "--appendonly", "no", "--daemonize", "no"], {}, folder / "redis.log")
    service.start()
    try:
        wait_for(lambda: _redis_pong(port), 30, "redis-server to answer PING", logs=service.tail, services=[service])
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        service.stop()


def _postgres_bin() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    assert versions, "PostgreSQL is missing: run `scripts/setup.sh --test` (installs Debian's postgresql)"
    return versions[-1].parent


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway cluster owned by the `postgres` user (PostgreSQL refuses to run as root), trust auth on loopback;
    yields the SQLAlchemy URL of its `airflow` database."""
    bin_dir, port = _postgres_bin(), free_port()
    # Not under pytest's tmp folder: that is private to root, and the server runs as `postgres`.
    data = Path(tempfile.mkdtemp(prefix="cosmos-deploy-pg-"))
    shutil.chown(data, "postgres", "postgres")
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    service = Service("postgres", [str(bin_dir / "postgres"), "-D", str(data / "db"), "-p", str(port),
                                   "-k", str(data), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                                   "-c", "max_connections=200"], env, data / "postgres.log", user="postgres")
    try:
        run_checked([str(bin_dir / "initdb"), "-D", str(data / "db"), "-U", "postgres", "--auth=trust",
                     "-E", "UTF8", "--locale=C.UTF-8"], env, user="postgres")
        service.start()
        wait_for(lambda: subprocess.run([str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)],
                                        check=False).returncode == 0,
                 60, "postgres to accept connections", logs=service.tail, services=[service])
        run_checked([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "airflow"], env)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/airflow"
    finally:
        service.stop()
        shutil.rmtree(data, ignore_errors=True)
