"""The Upsample reports app through FastAPI's TestClient: auth, pages, escaping, item files, JSON API, DB lookup."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from upsample_fixtures import (
    DAG_ID,
    HOSTILE_NAME,
    HOSTILE_PROMPT,
    make_report,
    write_job_plans,
    write_progress,
    write_report,
)
from upsample_reports import charts
from upsample_reports.app import create_app
from upsample_reports.reports import (
    DatabaseRuns,
    DirectoryRuns,
    Progress,
    RunIndex,
    item_output_file,
    load_report,
    read_progress,
    report_file,
    run_dir_path,
)

from include.cosmos_upsample.report_model import ReportItem

RUN_ID = "manual__2026-11-28T10:00:00+00:00"
PREFIX = "/upsample-reports"
DESIGN_KEYS = {"run_id", "dag_id", "started_at", "finished_at", "params", "counts", "items", "stages"}


def mounted(index: RunIndex) -> FastAPI:
    """The plugin app under its prefix, as Airflow's api-server mounts it."""
    parent = FastAPI()
    parent.mount(PREFIX, create_app(index))
    return parent


@pytest.fixture
def report_dir(output_dir: Path) -> Path:
    write_report(output_dir, make_report(RUN_ID, output_dir))
    return output_dir


@pytest.fixture
def dir_index(report_dir: Path) -> RunIndex:
    return RunIndex(None, DirectoryRuns(lambda: [report_dir]))


@pytest.fixture
def client(dir_index: RunIndex, admin_token: str) -> TestClient:
    client = TestClient(mounted(dir_index))
    client.cookies.set("_token", admin_token)
    return client


@pytest.fixture
def anonymous(dir_index: RunIndex, auth_manager: Any) -> TestClient:
    return TestClient(mounted(dir_index))


def run_url(run_id: str = RUN_ID, suffix: str = "") -> str:
    from urllib.parse import quote

    return f"{PREFIX}/runs/{quote(run_id, safe='')}{suffix}"


class TestAuth:
    PATHS = ("/", "/runs/x", "/runs/x/items/y", "/api/runs", "/api/runs/x", "/static/report.css")

    @pytest.mark.parametrize("path", PATHS)
    def test_signed_out_is_refused(self, anonymous: TestClient, path: str) -> None:
        response = anonymous.get(PREFIX + path)
        assert response.status_code == 401
        assert "window" not in response.text

    @pytest.mark.parametrize("path", PATHS)
    def test_forged_token_is_refused(self, anonymous: TestClient, path: str) -> None:
        anonymous.cookies.set("_token", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZG1pbiJ9.forged")
        assert anonymous.get(PREFIX + path).status_code == 403

    def test_no_docs_routes_bypass_auth(self, anonymous: TestClient) -> None:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert anonymous.get(PREFIX + path).status_code in (401, 403, 404)

    def test_bearer_token_works_too(self, anonymous: TestClient, admin_token: str) -> None:
        response = anonymous.get(f"{PREFIX}/api/runs", headers={"Authorization": f"Bearer {admin_token}"})
        assert response.status_code == 200

    def test_cookie_signs_in(self, client: TestClient) -> None:
        assert client.get(f"{PREFIX}/").status_code == 200


class TestRunList:
    def test_lists_run_with_state_counts_duration_model(self, client: TestClient) -> None:
        page = client.get(f"{PREFIX}/").text
        assert f'href="{run_url()}"' in page
        assert "success" in page and "7m 30s" in page and "smollm2" in page
        row = re.search(r"<tr>\s*<td><a href=\"[^\"]+\">" + re.escape(RUN_ID) + r".*?</tr>", page, re.S)
        assert row is not None
        cells = re.findall(r'<td class="num">(\d+)', row.group(0))
        assert cells == ["24", "12", "4", "4", "4"]

    def test_newest_first(self, output_dir: Path, admin_token: str) -> None:
        for day in ("01", "03", "02"):
            report = make_report(f"manual__2026-10-{day}T00:00:00+00:00", output_dir, items=2)
            report["started_at"] = f"2026-10-{day}T00:00:00+00:00"
            write_report(output_dir, report)
        client = TestClient(mounted(RunIndex(None, DirectoryRuns(lambda: [output_dir]))))
        client.cookies.set("_token", admin_token)
        runs = client.get(f"{PREFIX}/api/runs").json()["runs"]
        assert [run["run_id"][8:18] for run in runs] == ["2026-10-03", "2026-10-02", "2026-10-01"]

    def test_empty(self, tmp_path: Path, admin_token: str) -> None:
        client = TestClient(mounted(RunIndex(None, DirectoryRuns(lambda: [tmp_path]))))
        client.cookies.set("_token", admin_token)
        assert "No runs yet" in client.get(f"{PREFIX}/").text


class TestRunPage:
    def test_counts_stages_and_charts(self, client: TestClient) -> None:
        page = client.get(run_url()).text
        assert '<svg class="chart tokens"' in page and '<svg class="chart hbars"' in page
        start = page.index('<svg class="chart tokens"')
        token_svg = page[start : page.index("</svg>", start)]
        assert token_svg.count('<rect class="bar status-') == 24
        assert 'class="budget"' in token_svg
        for stage in ("discover", "validate", "upsample", "merge"):
            assert f">{stage}</text>" in page
        assert "6m 42s" in page  # upsample stage, 401.5 s

    def test_resolved_settings_and_token_agreement_are_shown(self, client: TestClient) -> None:
        page = client.get(run_url()).text
        assert "Token counts equal (planned = engine): 11 of 12." in page
        resolved = page[page.index("Resolved settings"):page.index("</details>", page.index("Resolved settings"))]
        assert "<th>prompt_format</th><td><code>instruction</code>" in resolved
        assert "repetition_penalty" in resolved and "1.3" in resolved

    def test_hostile_strings_are_escaped(self, client: TestClient) -> None:
        page = client.get(run_url()).text
        assert HOSTILE_PROMPT not in page
        assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in page
        assert HOSTILE_NAME not in page and "&lt;img src=x onerror=" in page
        assert "&lt;b&gt;worker&lt;/b&gt;" in page
        # The only script is the page's own filter, carrying the CSP nonce.
        scripts = re.findall(r"<script[^>]*>", page)
        assert len(scripts) == 1 and "nonce=" in scripts[0]

    def test_content_security_policy(self, client: TestClient) -> None:
        response = client.get(run_url())
        policy = response.headers["content-security-policy"]
        nonce = re.search(r"'nonce-([^']+)'", policy).group(1)
        assert f'nonce="{nonce}"' in response.text
        assert "default-src 'none'" in policy and "unsafe-inline" not in policy
        assert client.get(run_url()).headers["content-security-policy"] != policy

    def test_status_filter_works_without_js(self, client: TestClient) -> None:
        page = client.get(run_url(), params={"status": "invalid"}).text
        statuses = re.findall(r'<tr data-status="([a-z]+)"', page)
        assert statuses == ["invalid"] * 4
        assert "prompt needs 4158 tokens" in page

    def test_unknown_status_is_rejected(self, client: TestClient) -> None:
        assert client.get(run_url(), params={"status": "bogus"}).status_code == 422

    def test_items_show_prompts_hint_frames_and_output_links(self, client: TestClient) -> None:
        page = client.get(run_url()).text
        assert "A robot arm picks up cup 3" in page and "slowly picks up red cup number 3" in page
        assert "320×180" in page
        assert f'href="{run_url(suffix="/items/spec-003")}"' in page

    def test_paging(self, output_dir: Path, admin_token: str) -> None:
        write_report(output_dir, make_report("big", output_dir, items=450))
        client = TestClient(mounted(RunIndex(None, DirectoryRuns(lambda: [output_dir]))))
        client.cookies.set("_token", admin_token)
        first = client.get(run_url("big")).text
        last = client.get(run_url("big"), params={"page": 3}).text
        assert len(re.findall(r"<tr data-status=", first)) == 200
        assert len(re.findall(r"<tr data-status=", last)) == 50 and "spec-449" in last

    def test_dry_run_and_empty_reports_render(self, output_dir: Path, admin_token: str) -> None:
        dry = make_report("dry", output_dir, items=3)
        for item in dry["items"]:
            item.update(status="planned", output_path=None, upsampled_prompt=None)
        dry["counts"] = {"discovered": 3, "upsampled": 0, "cached": 0, "invalid": 0, "failed": 0, "planned": 3}
        write_report(output_dir, dry)
        empty = make_report("empty", output_dir, items=0)
        empty["stages"] = {}
        write_report(output_dir, empty)
        client = TestClient(mounted(RunIndex(None, DirectoryRuns(lambda: [output_dir]))))
        client.cookies.set("_token", admin_token)
        page = client.get(run_url("dry")).text
        assert re.findall(r'<tr data-status="([a-z]+)"', page) == ["planned"] * 3
        assert '<span class="k">planned</span>' in page and "planned (3)" in page
        empty_page = client.get(run_url("empty"))
        assert empty_page.status_code == 200 and "No items" in empty_page.text and "No stage times" in empty_page.text
        assert "(3 planned)" in client.get(f"{PREFIX}/").text

    def test_unknown_run_is_404(self, client: TestClient) -> None:
        response = client.get(run_url("manual__nope"))
        assert response.status_code == 404 and "Run not found" in response.text

    def test_other_dags_run_says_not_an_upsampling_run(self, client: TestClient) -> None:
        response = client.get(run_url(), params={"dag_id": "some_other_dag"})
        assert response.status_code == 200
        assert "not an upsampling run" in response.text and "some_other_dag" in response.text

    def test_own_dag_id_shows_the_report(self, client: TestClient) -> None:
        assert "Token budget use" in client.get(run_url(), params={"dag_id": DAG_ID}).text


class TestItemFiles:
    def test_serves_the_output_spec_the_report_names(self, client: TestClient) -> None:
        response = client.get(run_url(suffix="/items/spec-003"))
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["id"] == "spec-003"

    @pytest.mark.parametrize(
        "spec_id",
        [
            "spec-001",  # named by the report, but outside its output_dir (/etc/hostname)
            "spec-004",  # invalid: no output
            "spec-999",  # not in the report
            "..%2F..%2F..%2Fetc%2Fpasswd",
            "%2Fetc%2Fpasswd",
        ],
    )
    def test_refuses_anything_else(self, client: TestClient, spec_id: str) -> None:
        assert client.get(f"{run_url()}/items/{spec_id}").status_code == 404

    def test_refuses_a_symlink_out_of_the_output_dir(self, report_dir: Path, tmp_path: Path) -> None:
        secret = tmp_path / "secret.json"
        secret.write_text("{}")
        target = report_dir / "specs" / "spec-003.json"
        target.unlink()
        target.symlink_to(secret)
        report_path = next((report_dir / "reports").glob("*.json"))
        assert item_output_file(load_report(report_path), report_path, "spec-003") is None


class TestApi:
    def test_list(self, client: TestClient) -> None:
        body = client.get(f"{PREFIX}/api/runs").json()
        assert body["dag_id"] == DAG_ID
        (run,) = body["runs"]
        assert run["run_id"] == RUN_ID and run["has_report"] and run["counts"]["invalid"] == 4
        assert run["duration_seconds"] == 450.0 and run["model"] == "smollm2"

    def test_run_returns_the_report_json(self, client: TestClient, report_dir: Path) -> None:
        body = client.get(f"{PREFIX}/api/runs/{RUN_ID}").json()
        assert DESIGN_KEYS <= set(body)
        assert body == json.loads(next((report_dir / "reports").glob("*.json")).read_text())
        assert body["items"][0]["original_prompt"] == HOSTILE_PROMPT  # JSON carries data as it is

    def test_unknown_run(self, client: TestClient) -> None:
        assert client.get(f"{PREFIX}/api/runs/nope").status_code == 404


class TestProgress:
    def test_done_total_and_eta_from_plan_and_ledgers(self, output_dir: Path) -> None:
        now = time.time()
        run_dir = output_dir / "runs" / "r1"
        write_progress(run_dir, output_dir, now=now)
        progress = read_progress(run_dir)
        # job-a: s1 ok, s2 failed then ok, s3 ok, s4 failed; job-b: t1..t3 ok; a half-written line is skipped.
        # The 4 specs of the chunk still in validation count in the total.
        assert (progress.total, progress.done, progress.failed, progress.jobs) == (20, 7, 1, 2)
        eta = progress.eta_seconds(now)
        assert eta == pytest.approx(13 / (6 / 70), abs=1)

    def test_no_plan_yet(self, tmp_path: Path) -> None:
        assert read_progress(tmp_path) == Progress(planned=False)

    def test_eta_unknown_before_two_items(self) -> None:
        one_done = Progress(planned=True, total=10, done=1, first_finished_at=5.0, last_finished_at=5.0)
        assert one_done.eta_seconds(9) is None
        assert Progress(planned=True, total=10, done=10).eta_seconds(0) == 0.0

    def test_ledger_outside_a_jobs_folder_is_not_read(self, tmp_path: Path) -> None:
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "ledger.jsonl").write_text('{"spec_id": "a", "status": "ok"}\n')
        write_job_plans(tmp_path, [{"job_key": "k", "job_dir": str(tmp_path / "elsewhere"), "items": 3}])
        assert read_progress(tmp_path).done == 0


class TestPathShapes:
    def test_report_paths(self) -> None:
        assert report_file("/o/reports/r.json") == Path("/o/reports/r.json")
        for bad in ("/etc/passwd", "/o/reports/r.html", "relative/reports/r.json", "s3://b/other/r.json",
                    "s3://b/reports/r.html", None, 3):
            assert report_file(bad) is None
        # Reports in object storage (issue 13) are read through ObjectStoragePath, same shape rule.
        assert report_file("s3://conn@b/reports/r.json").path == "b/reports/r.json"

    def test_run_dir_paths(self) -> None:
        assert run_dir_path("/o/runs/r") == Path("/o/runs/r")
        assert run_dir_path("/etc") is None and run_dir_path("runs/r") is None


class TestCharts:
    def test_token_bars_scale_to_budget(self) -> None:
        items = [
            {"spec_id": "a", "status": "upsampled", "tokens": {"prompt": 50, "budget": 100}},
            {"spec_id": "b", "status": "invalid", "tokens": {"prompt": 300, "budget": 100}},
            {"spec_id": "c", "status": "invalid", "tokens": {"prompt": None, "budget": 100}},
        ]
        chart = charts.token_chart([ReportItem.model_validate({"source_path": "", **item}) for item in items])
        full = chart.height - chart.budget_y
        assert chart.bars[0].height == pytest.approx(full / 2, abs=0.01)
        assert chart.bars[1].height == pytest.approx(full * charts.TOKEN_CHART_CEILING, abs=0.01)  # clipped
        assert (chart.counted, chart.uncounted, chart.over_budget) == (2, 1, 1)
        assert chart.bars[0].title == "a: 50 of 100 tokens (50%)"

    def test_format_seconds(self) -> None:
        assert [charts.format_seconds(s) for s in (None, 4.25, 65, 7500)] == ["–", "4.2 s", "1m 05s", "2h 05m"]


class TestPluginRegistration:
    def test_mounts_app_and_external_views(self) -> None:
        from upsample_reports_plugin import UpsampleReportsPlugin, build_external_views

        (app,) = UpsampleReportsPlugin.fastapi_apps
        assert app["url_prefix"] == "/upsample-reports" and isinstance(app["app"], FastAPI)
        nav, tab = UpsampleReportsPlugin.external_views
        assert nav["destination"] == "nav" and nav["href"].endswith("/upsample-reports/") and nav["url_route"]
        assert tab["destination"] == "dag_run" and tab["url_route"]
        assert tab["href"].endswith("/upsample-reports/runs/{RUN_ID}?dag_id={DAG_ID}")
        assert build_external_views("/prefix")[1]["href"].startswith("/prefix/upsample-reports/runs/")


class TestMetadataDb:
    """Runs found through real DagRuns and XComs of `cosmos_prompt_upsample` in a migrated Airflow DB."""

    @pytest.fixture
    def db_client(self, airflow_site: Any, admin_token: str) -> TestClient:
        index = RunIndex(
            DatabaseRuns(airflow_site.session_factory()), DirectoryRuns(lambda: [airflow_site.fallback_dir])
        )
        client = TestClient(mounted(index))
        client.cookies.set("_token", admin_token)
        return client

    def test_report_in_a_non_default_output_dir_is_found_through_xcom(
        self, db_client: TestClient, airflow_site: Any
    ) -> None:
        body = db_client.get(f"{PREFIX}/api/runs/{airflow_site.finished_run_id}").json()
        assert body["run_id"] == airflow_site.finished_run_id
        assert body["params"]["output_dir"] == str(airflow_site.output_dir)
        assert "custom-outputs" not in str(airflow_site.fallback_dir)

    def test_list_holds_db_runs_and_on_disk_reports_newest_first(
        self, db_client: TestClient, airflow_site: Any
    ) -> None:
        runs = db_client.get(f"{PREFIX}/api/runs").json()["runs"]
        ids = [run["run_id"] for run in runs]
        assert set(ids) == {airflow_site.finished_run_id, airflow_site.running_run_id, airflow_site.fallback_run_id}
        assert ids[-1] == airflow_site.fallback_run_id
        by_id = {run["run_id"]: run for run in runs}
        assert by_id[airflow_site.finished_run_id]["state"] == "success"
        running = by_id[airflow_site.running_run_id]
        assert running["state"] == "running" and not running["has_report"]
        assert running["progress"]["done"] == 7 and running["progress"]["total"] == 20  # 4 specs still in validation

    def test_running_run_shows_progress_and_eta(self, db_client: TestClient, airflow_site: Any) -> None:
        page = db_client.get(run_url(airflow_site.running_run_id)).text
        assert "<strong>7</strong> of <strong>20</strong> items done" in page
        assert "ETA <strong>" in page
        assert '<meta http-equiv="refresh"' in page
        response = db_client.get(f"{PREFIX}/api/runs/{airflow_site.running_run_id}")
        assert response.status_code == 404 and response.json()["progress"]["done"] == 7

    def test_finished_run_page_and_item_from_db(self, db_client: TestClient, airflow_site: Any) -> None:
        page = db_client.get(run_url(airflow_site.finished_run_id)).text
        assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in page
        item = db_client.get(run_url(airflow_site.finished_run_id, "/items/spec-002"))
        assert item.status_code == 200 and item.json()["id"] == "spec-002"

    def test_fallback_report_without_db_rows(self, db_client: TestClient, airflow_site: Any) -> None:
        assert db_client.get(run_url(airflow_site.fallback_run_id)).status_code == 200


class TestLiveApiServer:
    """The plugin inside a real `airflow api-server`: mounted, signed-out refused, signed-in served."""

    def test_auth_and_json_api(self, api_server: Any, airflow_site: Any) -> None:
        import httpx

        assert httpx.get(f"{api_server.url}{PREFIX}/api/runs").status_code == 401
        token = httpx.post(
            f"{api_server.url}/auth/token", json={"username": api_server.username, "password": api_server.password}
        ).json()["access_token"]
        body = httpx.get(f"{api_server.url}{PREFIX}/api/runs", cookies={"_token": token}).json()
        assert {run["run_id"] for run in body["runs"]} >= {airflow_site.finished_run_id, airflow_site.running_run_id}
        bearer = {"Authorization": f"Bearer {token}"}
        plugins = httpx.get(f"{api_server.url}/api/v2/plugins", headers=bearer).json()
        ours = next(plugin for plugin in plugins["plugins"] if plugin["name"] == "upsample_reports")
        assert {view["destination"] for view in ours["external_views"]} == {"nav", "dag_run"}
        # plugins/.airflowignore keeps the loader from importing the package's modules as plugin files.
        errors = httpx.get(f"{api_server.url}/api/v2/plugins/importErrors", headers=bearer)
        assert errors.status_code == 200 and errors.json()["total_entries"] == 0, errors.text
