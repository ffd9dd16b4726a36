"""Fixtures for the Upsample reports plugin: report files, a real Airflow metadata DB with runs, a live api-server.

The DB fixture is real Airflow: a temporary AIRFLOW_HOME is migrated with `airflow db migrate`, and a small
stand-in for `cosmos_prompt_upsample` (same dag_id, same `discover`/`report` XCom shapes) is run with `dag.test()`,
so the plugin finds the reports the way it does in production: through the XComs of real DagRuns.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"
VENV_BIN = Path(sys.executable).parent
JWT_SECRET = "upsample-reports-tests-only-" + "0123456789abcdef" * 4

for _path in (PLUGINS, Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
from upsample_fixtures import ROOT, make_report, write_progress, write_report  # noqa: E402

from tests.processes import Service, free_port, http_ok, run_checked, simple_auth_password, wait_for  # noqa: E402

# In-process Airflow (auth manager, token checks) reads its config when first imported: give it a throwaway home
# and SQLite DB unless the session already chose one. The api-server tests use their own home (`airflow_site`).
if "airflow" not in sys.modules and not os.environ.get("AIRFLOW_HOME"):
    _home = tempfile.mkdtemp(prefix="upsample-reports-home-")
    os.environ["AIRFLOW_HOME"] = _home
    os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_home}/airflow.db"
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "browser: drives Debian chromium headless against a real `airflow api-server` (slow)"
    )


@pytest.fixture
def output_dir(tmp_path: Path) -> Path:
    path = tmp_path / "outputs"
    path.mkdir()
    return path


# --- auth -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def inprocess_db(airflow_home: dict[str, str]) -> None:
    """Token checks look up revoked tokens in the metadata DB, so the in-process one must be migrated (the
    session's `airflow_home` fixture migrates it)."""


@pytest.fixture(scope="session")
def auth_manager(inprocess_db: None) -> Iterator[Any]:
    """Airflow's SimpleAuthManager with a known JWT secret, as the api-server creates it."""
    saved = {key: os.environ.get(key) for key in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__AUTH_MANAGER")}
    os.environ["AIRFLOW__API_AUTH__JWT_SECRET"] = JWT_SECRET
    os.environ["AIRFLOW__CORE__AUTH_MANAGER"] = (
        "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
    )
    from airflow.api_fastapi.app import create_auth_manager, purge_cached_app

    purge_cached_app()
    yield create_auth_manager()
    purge_cached_app()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def admin_token(auth_manager: Any) -> str:
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return auth_manager.generate_jwt(SimpleAuthManagerUser(username="admin", role="admin"))


# --- a real Airflow with runs of the DAG ----------------------------------------------------------------------

STANDIN_DAG = textwrap.dedent(
    '''
    """Stand-in for cosmos_prompt_upsample: the same dag_id, task ids and XCom shapes, driven by dag_run.conf."""
    from __future__ import annotations

    import json
    import re
    from pathlib import Path

    from airflow.sdk import dag, get_current_context, task
    from airflow.sdk.exceptions import AirflowSkipException


    def _safe(run_id):
        return re.sub(r"[^A-Za-z0-9._+=:@-]", "_", run_id).lstrip(".") or "_"


    @dag(dag_id="cosmos_prompt_upsample", schedule=None, catchup=False, tags=["test-stand-in"])
    def standin():
        @task(multiple_outputs=True)
        def discover():
            context = get_current_context()
            conf = context["dag_run"].conf
            run_dir = Path(conf["output_dir"]) / "runs" / _safe(context["run_id"])
            run_dir.mkdir(parents=True, exist_ok=True)
            return {"run_dir": str(run_dir), "chunks": []}

        @task
        def report(run_dir):
            context = get_current_context()
            conf = context["dag_run"].conf
            if not conf.get("report"):
                raise AirflowSkipException("in-progress scenario: no report yet")
            body = dict(conf["report"], run_id=context["run_id"])
            reports = Path(conf["output_dir"]) / "reports"
            reports.mkdir(parents=True, exist_ok=True)
            json_path = reports / (_safe(context["run_id"]) + ".json")
            json_path.write_text(json.dumps(body))
            html_path = json_path.with_suffix(".html")
            html_path.write_text("<html></html>")
            location = {"report_json": str(json_path), "report_html": str(html_path), "counts": body["counts"]}
            context["ti"].xcom_push(key="report_location", value=location)
            return location

        report(discover()["run_dir"])


    upsample_dag = standin()
    '''
)

SETUP_SCRIPT = textwrap.dedent(
    '''
    """Runs the stand-in DAG twice with dag.test(); marks the second run as still running."""
    import importlib.util
    import json
    import sys

    spec = importlib.util.spec_from_file_location("standin_dag", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = module.upsample_dag
    scenarios = json.loads(open(sys.argv[2]).read())
    run_ids = {}
    for name, conf in scenarios.items():
        run = dag.test(run_conf=conf)
        run_ids[name] = run.run_id

    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        running = session.query(DagRun).filter(DagRun.dag_id == dag.dag_id, DagRun.run_id == run_ids["running"]).one()
        running.state = "running"
        running.end_date = None
    print("RUN_IDS=" + json.dumps(run_ids))
    '''
)


@dataclass
class AirflowSite:
    home: Path
    env: dict[str, str]
    db_path: Path
    output_dir: Path
    fallback_dir: Path
    finished_run_id: str
    running_run_id: str
    fallback_run_id: str

    def session_factory(self) -> Any:
        from sqlalchemy import create_engine
        from sqlalchemy.orm import sessionmaker

        engine = create_engine(f"sqlite:///{self.db_path}")
        maker = sessionmaker(bind=engine, expire_on_commit=False)
        return maker.begin


@pytest.fixture(scope="session")
def airflow_site(tmp_path_factory: pytest.TempPathFactory, migrated_db: Path) -> AirflowSite:
    """A migrated SQLite metadata DB in its own AIRFLOW_HOME holding a finished and a running DAG run."""
    home = tmp_path_factory.mktemp("airflow-home")
    dags = home / "standin-dags"
    dags.mkdir()
    (dags / "cosmos_prompt_upsample_standin.py").write_text(STANDIN_DAG)
    # The DAG's output_dir differs from the deployment default: the plugin must find it through XCom.
    output_dir = home / "custom-outputs"
    fallback_dir = home / "default-outputs"
    db_path = home / "airflow.db"
    env = {
        **{key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")},
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{db_path}",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__API_AUTH__JWT_SECRET": JWT_SECRET,
        "COSMOS_UPSAMPLE_OUTPUT_DIR": str(fallback_dir),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    shutil.copyfile(migrated_db, db_path)
    report = make_report("placeholder", output_dir)
    write_report(output_dir, report, file_stem="spec-files-only")  # the stand-in writes the report itself
    (output_dir / "reports" / "spec-files-only.json").unlink()
    (output_dir / "reports" / "spec-files-only.html").unlink()
    scenarios = {
        "finished": {"output_dir": str(output_dir), "report": report},
        "running": {"output_dir": str(output_dir), "report": None},
    }
    scenario_file = home / "scenarios.json"
    scenario_file.write_text(json.dumps(scenarios))
    script = home / "setup_runs.py"
    script.write_text(SETUP_SCRIPT)
    dag_file = dags / "cosmos_prompt_upsample_standin.py"
    stdout = run_checked([sys.executable, str(script), str(dag_file), str(scenario_file)], env)
    run_ids = json.loads(next(line for line in stdout.splitlines() if line.startswith("RUN_IDS="))[8:])
    running_dir = output_dir / "runs" / run_ids["running"].replace("/", "_")
    write_progress(running_dir, output_dir, now=time.time())
    # A report only on disk in the default output dir (its DB rows cleaned up long ago).
    fallback_run_id = "manual__2026-01-02T03:04:05+00:00"
    fallback = make_report(fallback_run_id, fallback_dir, items=6)
    fallback["started_at"] = "2026-01-02T03:04:05+00:00"
    fallback["finished_at"] = "2026-01-02T03:05:00+00:00"
    write_report(fallback_dir, fallback)
    return AirflowSite(
        home=home,
        env=env,
        db_path=db_path,
        output_dir=output_dir,
        fallback_dir=fallback_dir,
        finished_run_id=run_ids["finished"],
        running_run_id=run_ids["running"],
        fallback_run_id=fallback_run_id,
    )


@dataclass
class ApiServer:
    url: str
    username: str
    password: str
    log: Path


@pytest.fixture(scope="session")
def api_server(airflow_site: AirflowSite) -> Iterator[ApiServer]:
    """`airflow api-server` on 127.0.0.1 with the project's plugins and dags folders and SimpleAuthManager."""
    port = free_port()
    env = {
        **airflow_site.env,
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__API__WORKERS": "1",
    }
    url = f"http://127.0.0.1:{port}"
    # Its own process group (it forks workers): stopping it stops exactly that group.
    server = Service("api-server", [str(VENV_BIN / "airflow"), "api-server", "--host", "127.0.0.1", "--port",
                                    str(port)], env, airflow_site.home / "api-server.log")
    server.start()
    try:
        wait_for(lambda: http_ok(f"{url}/api/v2/monitor/health"), 120, "the api-server to answer",
                 logs=server.tail, services=[server])
        yield ApiServer(url=url, username="admin", password=simple_auth_password(airflow_site.home),
                        log=server.log)
    finally:
        server.stop()
