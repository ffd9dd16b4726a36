"""A real Airflow deployment on loopback: api-server, scheduler, dag-processor (and a triggerer, Celery workers), driven
only through the public REST API (v2) with a SimpleAuthManager JWT, as a user's browser or script drives it."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from include.cosmos_upsample.settings import DAG_ID, ENDPOINT_POOL, GPU_POOL
from tests.helpers import QUALITY_ENV, RELAXED_QUALITY
from tests.processes import Service, Services, free_port, http_ok, run_checked, simple_auth_password, wait_for

ROOT = Path(__file__).resolve().parents[2]
AIRFLOW = str(Path(sys.executable).parent / "airflow")
JWT_SECRET = "cosmos-deploy-tests-only-" + "0123456789abcdef" * 4
TERMINAL = {"success", "failed"}


@dataclass
class AirflowSite:
    """One Airflow home with its own metadata DB; `env` is what every component and task process gets."""

    home: Path
    executor: str
    sql_alchemy_conn: str
    extra_env: dict[str, str] = field(default_factory=dict)
    services: Services = field(default_factory=Services)
    port: int = field(default_factory=free_port)
    _token: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        inherited = {key: value for key, value in os.environ.items()
                     if not key.startswith(("AIRFLOW", "COSMOS_UPSAMPLE_"))}
        return {
            **inherited,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.sql_alchemy_conn,
            "AIRFLOW__CORE__EXECUTOR": self.executor,
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__AUTH_MANAGER":
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            # Task processes reach the api-server's Execution API with JWTs the scheduler signs: one secret for all.
            "AIRFLOW__API_AUTH__JWT_SECRET": JWT_SECRET,
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            # Few slots: this machine has 2 cores shared with other engineers.
            "AIRFLOW__CORE__PARALLELISM": "4",
            # Log servers of several components on one machine must not collide with each other or other suites.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "PYTHONPATH": str(ROOT),
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            QUALITY_ENV: json.dumps(RELAXED_QUALITY),  # the test model cannot pass the gate: see tests/helpers.py
            **self.extra_env,
        }

    # --- set-up -------------------------------------------------------------------------------------------------

    def prepare(self, variables: dict[str, str], migrated_sqlite: Path | None = None) -> None:
        """A migrated DB (a copy of the session's migrated SQLite file when given and this site uses SQLite), the
        pools (the upsample tasks wait for a slot there; the scheduler never runs a task of a pool that does not
        exist, the skipping one included) and Variables."""
        self.home.mkdir(parents=True, exist_ok=True)
        sqlite_file = self.sql_alchemy_conn.removeprefix("sqlite:///")
        if migrated_sqlite is not None and sqlite_file != self.sql_alchemy_conn:
            shutil.copyfile(migrated_sqlite, sqlite_file)
        else:
            run_checked([AIRFLOW, "db", "migrate"], self.env, timeout=600)
        run_checked([AIRFLOW, "pools", "set", GPU_POOL, "1", "Model jobs"], self.env)
        run_checked([AIRFLOW, "pools", "set", ENDPOINT_POOL, "1", "Jobs of runner endpoint"], self.env)
        for key, value in variables.items():
            run_checked([AIRFLOW, "variables", "set", key, value], self.env)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Service:
        service = Service(name, [AIRFLOW, *args], env or self.env, self.home / "logs-components" / f"{name}.log")
        if cwd:
            cwd.mkdir(parents=True, exist_ok=True)
            service.cwd = cwd
        return self.services.start(service)

    def start_core(self, triggerer: bool = False) -> None:
        """api-server, scheduler and dag-processor; and the triggerer, which runs the AssetWatchers of bucket events."""
        self.start("api-server", ["api-server", "--host", "127.0.0.1", "--port", str(self.port)])
        self.start("scheduler", ["scheduler"])
        self.start("dag-processor", ["dag-processor"])
        if triggerer:
            self.start("triggerer", ["triggerer"])
        self.wait(lambda: http_ok(f"{self.url}/api/v2/monitor/health"), 180, "the api-server to answer")
        self.wait(lambda: self.get_or_none(f"/dags/{DAG_ID}"), 240, f"the dag-processor to parse {DAG_ID}")

    def wait(self, check, timeout: float, what: str, interval: float = 0.5):
        return wait_for(check, timeout, what, logs=self.services.tails, interval=interval,
                        services=[s for s in self.services.started if not s.killed])

    def stop(self) -> None:
        self.services.stop_all()

    # --- REST API -----------------------------------------------------------------------------------------------

    def token(self) -> str:
        if self._token is None:
            response = httpx.post(f"{self.url}/auth/token", timeout=30, json={
                "username": "admin", "password": simple_auth_password(self.home)})
            response.raise_for_status()
            self._token = response.json()["access_token"]
        return self._token

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        url = path if path.startswith("/upsample-reports") else f"/api/v2{path}"
        return httpx.request(method, f"{self.url}{url}", timeout=30, **kwargs,
                             headers={"Authorization": f"Bearer {self.token()}"})

    def get(self, path: str, **params: Any) -> Any:
        response = self.request("GET", path, params=params)
        assert response.status_code == 200, f"GET {path}: {response.status_code} {response.text[:2000]}"
        return response.json()

    def get_or_none(self, path: str) -> Any:
        try:
            response = self.request("GET", path)
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    def form_conf(self, **values: Any) -> dict[str, Any]:
        """The conf the UI's trigger form sends: every Param the DAG declares, with the form's value (its default,
        null for an empty field) unless the user typed one."""
        params = self.get(f"/dags/{DAG_ID}/details")["params"]
        unknown = set(values) - set(params)
        assert not unknown, f"not Params of the DAG: {unknown}"
        return {name: values.get(name, spec.get("value")) for name, spec in params.items()}

    def trigger(self, conf: dict[str, Any]) -> str:
        """POST the body the UI's trigger form posts (airflow/ui/src/queries/useTrigger.ts)."""
        body = {"conf": conf, "logical_date": dt.datetime.now(dt.UTC).isoformat(), "data_interval_start": None,
                "data_interval_end": None}
        response = self.request("POST", f"/dags/{DAG_ID}/dagRuns", json=body)
        assert response.status_code == 200, f"trigger: {response.status_code} {response.text[:2000]}"
        return response.json()["dag_run_id"]

    def unpause(self) -> None:
        response = self.request("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False})
        assert response.status_code == 200, f"unpause: {response.status_code} {response.text[:2000]}"

    def run(self, run_id: str) -> dict[str, Any]:
        return self.get(f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}")

    def wait_run(self, run_id: str, timeout: float) -> dict[str, Any]:
        return self.wait(lambda: (run := self.run(run_id))["state"] in TERMINAL and run, timeout,
                         f"DAG run {run_id} to finish", interval=2)

    def task_instances(self, run_id: str) -> list[dict[str, Any]]:
        return self.get(f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances",
                        limit=1000)["task_instances"]

    def tries(self, run_id: str, task_id: str, map_index: int = -1) -> list[dict[str, Any]]:
        path = f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}/{map_index}/tries"
        return self.get(path)["task_instances"]

    def xcom(self, run_id: str, task_id: str, key: str) -> Any:
        path = f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}/xcomEntries/{key}"
        return self.get(path, deserialize=True, stringify=False)["value"]

    def runs(self, run_type: str | None = None) -> list[dict[str, Any]]:
        runs = self.get(f"/dags/{DAG_ID}/dagRuns", limit=100)["dag_runs"]
        return [run for run in runs if run_type is None or run["run_type"] == run_type]


def hosts_of(task_instances: Iterable[dict[str, Any]]) -> set[str]:
    return {ti["hostname"] for ti in task_instances if ti.get("hostname")}
