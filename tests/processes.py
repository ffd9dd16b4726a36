"""Long-running processes for tests (Airflow components, Redis, PostgreSQL): started in their own process group with
a log file, waited for with a bounded wait whose timeout message carries the log's tail, and always stopped."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_checked(cmd: Sequence[str], env: dict[str, str], timeout: int = 300, **kwargs: Any) -> str:
    """Run a command to completion; a failure raises with the end of its output."""
    result = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
    if result.returncode != 0:
        output = f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{output}")
    return result.stdout


def log_tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"(no log: {exc})"


@dataclass
class Service:
    """A process started in a session of its own, so stopping it (or killing it) takes every child with it."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log: Path
    user: str | None = None  # PostgreSQL refuses to run as root
    cwd: Path | None = None
    process: subprocess.Popen | None = field(default=None, init=False)
    killed: bool = field(default=False, init=False)  # on purpose: waits no longer treat its death as a failure

    def start(self) -> Service:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as handle:
            self.process = subprocess.Popen(self.cmd, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True, user=self.user,
                                            cwd=self.cwd)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self, chars: int = 4000) -> str:
        return f"--- {self.name} log ({self.log}), last {chars} characters ---\n{log_tail(self.log, chars)}"

    def descendants(self) -> list[int]:
        """Every living process forked from this one. Airflow's task supervisor puts each task process in a process
        group of its own, so the service's group alone does not reach the task processes (nor their children)."""
        return descendants_of(self.pid) if self.process is not None else []

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (the component and the processes it forked into that group)."""
        self.killed = self.killed or sig == signal.SIGKILL
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def kill_all(self) -> None:
        """SIGKILL the process group and every descendant, as when the machine or container of a worker dies."""
        tree = self.descendants()
        self.kill_group(signal.SIGKILL)
        _kill(tree)

    def stop(self, grace: float = 20) -> None:
        if self.process is None:
            return
        tree = self.descendants()
        self.kill_group(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        # Children may outlive a leader that exited on SIGTERM (task processes in groups of their own, Celery pool
        # workers, the model worker): take down everything that descended from it, the late-born ones too.
        tree += self.descendants()
        self.kill_group(signal.SIGKILL)
        _kill(tree)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def descendants_of(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Services:
    """Every process a test bed started, stopped in reverse order whatever happened."""

    def __init__(self) -> None:
        self.started: list[Service] = []

    def start(self, service: Service) -> Service:
        self.started.append(service.start())
        return service

    def tails(self, chars: int = 3000) -> str:
        return "\n".join(service.tail(chars) for service in self.started)

    def stop_all(self) -> None:
        for service in reversed(self.started):
            service.stop()


def wait_for(check: Callable[[], T | None], timeout: float, what: str, logs: Callable[[], str] = lambda: "",
             interval: float = 0.5, services: Sequence[Service] = ()) -> T:
    """Poll `check` until it returns something truthy; a timeout (or a service dying) raises with log tails."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        dead = [service.name for service in services if not service.alive()]
        if dead:
            raise AssertionError(f"{', '.join(dead)} exited while waiting for {what}\n{logs()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs()}")
        time.sleep(interval)


def http_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def simple_auth_password(airflow_home: Path, username: str = "admin") -> str:
    """SimpleAuthManager writes the generated passwords here when the api-server starts."""
    return json.loads((airflow_home / "simple_auth_manager_passwords.json.generated").read_text())[username]
