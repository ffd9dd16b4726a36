"""The run list a page at a time, from the runs' summaries (include/cosmos_upsample/run_summary.py) and the metadata DB,
through FastAPI's TestClient; the report folders' index (plugins/upsample_reports/summaries.py) on real files."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from upsample_fixtures import make_report, write_report
from upsample_reports import summaries as summaries_module
from upsample_reports.app import create_app
from upsample_reports.reports import DatabaseRuns, DirectoryRuns, RunIndex
from upsample_reports.summaries import RACY_SECONDS, ReportSummaries

from include.cosmos_upsample.report_model import RunReport
from include.cosmos_upsample.run_summary import SUMMARIES_DIR, RunSummary, summary_path, write_summary

PREFIX = "/upsample-reports"


def client_for(index: RunIndex, token: str) -> TestClient:
    parent = FastAPI()
    parent.mount(PREFIX, create_app(index))
    client = TestClient(parent)
    client.cookies.set("_token", token)
    return client


def daily_report(output_dir: Path, day: int, *, summary: bool = True, items: int = 6) -> Path:
    """A report of a run started `day` days into 2026, with its summary as the report task writes it."""
    started = time.strftime("%Y-%m-%dT06:00:00+00:00", time.gmtime(1767225600 + day * 86400))
    report = make_report(f"scheduled__{started}", output_dir, items=items)
    report["started_at"] = started
    path = write_report(output_dir, report)
    if summary:
        write_summary(path, RunReport.model_validate(report))
    return path


def age(*paths: Path, seconds: float = 10 * RACY_SECONDS) -> None:
    """Make files and folders older than the racy window, as any report folder is a moment after a run."""
    moment = time.time() - seconds
    for path in paths:
        os.utime(path, (moment, moment))


@pytest.fixture
def many_runs(output_dir: Path) -> Path:
    for day in range(120):
        daily_report(output_dir, day)
    return output_dir


class TestPaging:
    def test_pages_of_the_list_newest_first(self, many_runs: Path, admin_token: str) -> None:
        client = client_for(RunIndex(None, DirectoryRuns(lambda: [many_runs])), admin_token)
        first = client.get(f"{PREFIX}/api/runs").json()
        assert (first["total"], first["pages"], first["page"], first["per_page"]) == (120, 3, 1, 50)
        assert first["runs"][0]["run_id"].startswith("scheduled__2026-04-30")  # day 119, the newest
        last = client.get(f"{PREFIX}/api/runs", params={"page": 3}).json()
        assert len(last["runs"]) == 20 and last["runs"][-1]["run_id"].startswith("scheduled__2026-01-01")
        every = [run["run_id"] for page in (1, 2, 3)
                 for run in client.get(f"{PREFIX}/api/runs", params={"page": page}).json()["runs"]]
        assert len(set(every)) == 120 and every == sorted(every, reverse=True)
        assert client.get(f"{PREFIX}/api/runs", params={"per_page": 500}).json()["pages"] == 1
        assert client.get(f"{PREFIX}/api/runs", params={"per_page": 501}).status_code == 422

    def test_html_list_shows_one_page_with_links_to_the_others(self, many_runs: Path, admin_token: str) -> None:
        client = client_for(RunIndex(None, DirectoryRuns(lambda: [many_runs])), admin_token)
        page = client.get(f"{PREFIX}/", params={"page": 2}).text
        rows = re.findall(r'<tr>\s*<td><a href="[^"]+/runs/([^"]+)">', page)
        assert len(rows) == 50
        assert "page <strong>2</strong> of 3 (120 runs)" in page
        assert f'href="{PREFIX}/?page=1" rel="prev"' in page and f'href="{PREFIX}/?page=3" rel="next"' in page
        # A page past the end shows the last one.
        assert "page <strong>3</strong> of 3" in client.get(f"{PREFIX}/", params={"page": 99}).text

    def test_rows_carry_the_summarys_counts(self, many_runs: Path, admin_token: str) -> None:
        client = client_for(RunIndex(None, DirectoryRuns(lambda: [many_runs])), admin_token)
        run = client.get(f"{PREFIX}/api/runs").json()["runs"][0]
        assert run["has_report"] and run["model"] == "smollm2" and run["state"] == "success"
        assert run["counts"] == {"discovered": 6, "upsampled": 3, "cached": 1, "invalid": 1, "failed": 1}


class TestSummariesInsteadOfReports:
    def test_the_list_reads_no_report_when_summaries_exist(self, many_runs: Path, admin_token: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
        """Before summaries, every request parsed every report beyond a 64-entry cache."""
        parsed: list[Any] = []
        original = RunReport.from_text.__func__
        monkeypatch.setattr(RunReport, "from_text", classmethod(lambda cls, text: parsed.append(1) or
                                                                original(cls, text)))
        client = client_for(RunIndex(None, DirectoryRuns(lambda: [many_runs])), admin_token)
        for page in (1, 2, 3, 1):
            assert client.get(f"{PREFIX}/", params={"page": page}).status_code == 200
        assert parsed == []

    def test_a_report_without_a_summary_is_read_once(self, output_dir: Path, admin_token: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
        """Reports written before summaries existed still list, each parsed once, not on every request."""
        for day in range(3):
            daily_report(output_dir, day, summary=False)
        age(output_dir / "reports")
        parsed: list[Any] = []
        original = RunReport.from_text.__func__
        monkeypatch.setattr(RunReport, "from_text", classmethod(lambda cls, text: parsed.append(1) or
                                                                original(cls, text)))
        client = client_for(RunIndex(None, DirectoryRuns(lambda: [output_dir])), admin_token)
        for _ in range(3):
            runs = client.get(f"{PREFIX}/api/runs").json()["runs"]
            assert len(runs) == 3 and all(run["counts"]["discovered"] == 6 for run in runs)
        assert len(parsed) == 3

    def test_a_summary_older_than_its_report_is_not_trusted(self, output_dir: Path) -> None:
        """A re-run rewrote the report; until its new summary is written the report itself is summarised."""
        path = daily_report(output_dir, 0)
        rewritten = json.loads(path.read_text())
        rewritten["counts"]["failed"] = 99
        path.write_text(json.dumps(rewritten))
        summary = summary_path(path)
        moment = path.stat().st_mtime - 5
        os.utime(summary, (moment, moment))
        index = ReportSummaries(lambda p: RunReport.from_text(p.read_bytes()))
        assert index.of(path).counts["failed"] == 99


class TestFolderIndex:
    def test_a_quiet_folder_is_not_listed_again(self, many_runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        age(many_runs / "reports", many_runs / "reports" / SUMMARIES_DIR)
        index = ReportSummaries(lambda p: None)
        listed: list[Path] = []
        original = summaries_module.json_files
        monkeypatch.setattr(summaries_module, "json_files", lambda folder: listed.append(folder) or original(folder))
        assert len(index.in_folder(many_runs / "reports")) == 120
        assert len(listed) == 2  # reports/ and reports/summaries/
        assert len(index.in_folder(many_runs / "reports")) == 120
        assert len(listed) == 2  # nothing changed: not listed again

    def test_a_new_report_shows_at_once(self, many_runs: Path) -> None:
        age(many_runs / "reports", many_runs / "reports" / SUMMARIES_DIR)
        index = ReportSummaries(lambda p: None)
        assert len(index.in_folder(many_runs / "reports")) == 120
        new = daily_report(many_runs, 500)
        runs = index.in_folder(many_runs / "reports")
        assert len(runs) == 121 and runs[RunSummary.from_text(summary_path(new).read_bytes()).run_id]

    def test_a_report_written_in_the_clock_tick_of_the_listing_is_seen(self, many_runs: Path) -> None:
        """Folder times have a granularity: a second report renamed in within the same tick leaves them unchanged.
        A listing taken that close to the folder's last change is not kept, so the next request lists again."""
        reports, summaries = many_runs / "reports", many_runs / "reports" / SUMMARIES_DIR
        index = ReportSummaries(lambda p: None)
        assert len(index.in_folder(reports)) == 120
        times = {folder: folder.stat().st_mtime_ns for folder in (reports, summaries)}
        daily_report(many_runs, 501)
        for folder, mtime in times.items():  # as if written in the same tick as the listing above
            os.utime(folder, ns=(mtime, mtime))
        assert len(index.in_folder(reports)) == 121

    def test_a_deleted_report_leaves_the_list(self, many_runs: Path) -> None:
        index = ReportSummaries(lambda p: None)
        victim = sorted((many_runs / "reports").glob("*.json"))[0]
        victim.unlink()
        assert len(index.in_folder(many_runs / "reports")) == 119

    def test_summaries_of_other_dags_and_broken_files_are_left_out(self, output_dir: Path) -> None:
        daily_report(output_dir, 0)
        other = daily_report(output_dir, 1)
        other_summary = json.loads(summary_path(other).read_text())
        summary_path(other).write_text(json.dumps({**other_summary, "dag_id": "another_dag"}))
        broken = output_dir / "reports" / "broken.json"
        broken.write_text("{not json")
        index = ReportSummaries(lambda p: None)  # a report without a usable summary reads as nothing here
        assert [run.summary.dag_id for run in index.in_folder(output_dir / "reports").values()] == [
            "cosmos_prompt_upsample"]


class TestDatabaseIndex:
    """Runs of a real metadata DB (the plugin conftest's `airflow_site`) a page at a time."""

    def test_a_report_whose_rows_are_gone_is_found_in_an_output_dir_the_db_names(
        self, airflow_site: Any, admin_token: str
    ) -> None:
        """Its output dir is not the deployment's: only another run's XCom names it."""
        orphan = make_report("manual__2025-06-01T00:00:00+00:00", airflow_site.output_dir, items=2)
        orphan["started_at"] = "2025-06-01T00:00:00+00:00"
        path = write_report(airflow_site.output_dir, orphan)
        try:
            index = RunIndex(DatabaseRuns(airflow_site.session_factory()), DirectoryRuns(lambda: []))
            body = client_for(index, admin_token).get(f"{PREFIX}/api/runs").json()
            ids = [run["run_id"] for run in body["runs"]]
            assert ids[-1] == orphan["run_id"] and body["total"] == 3
            assert airflow_site.finished_run_id in ids and airflow_site.running_run_id in ids
        finally:
            path.unlink()
            path.with_suffix(".html").unlink()

    def test_pages_hold_db_runs_and_disk_runs_in_one_order(self, airflow_site: Any, admin_token: str) -> None:
        index = RunIndex(DatabaseRuns(airflow_site.session_factory()),
                         DirectoryRuns(lambda: [airflow_site.fallback_dir]))
        client = client_for(index, admin_token)
        pages = [client.get(f"{PREFIX}/api/runs", params={"page": n, "per_page": 1}).json() for n in (1, 2, 3)]
        assert [page["total"] for page in pages] == [3, 3, 3]
        ids = [page["runs"][0]["run_id"] for page in pages]
        assert ids[-1] == airflow_site.fallback_run_id  # 2026-01-02, older than the two DagRuns
        assert set(ids) == {airflow_site.finished_run_id, airflow_site.running_run_id, airflow_site.fallback_run_id}
        finished = next(page["runs"][0] for page in pages if page["runs"][0]["run_id"] == airflow_site.finished_run_id)
        assert finished["has_report"] and finished["counts"]["discovered"] == 24  # a report without a summary


class TestBigRun:
    def test_the_run_page_of_a_10000_item_run_draws_400_bars_and_200_rows(self, output_dir: Path,
                                                                            admin_token: str) -> None:
        """Before, the token chart drew one bar per item: 10,000 SVG bars with tooltips on every request."""
        write_report(output_dir, make_report("big", output_dir, items=10_000))
        client = client_for(RunIndex(None, DirectoryRuns(lambda: [output_dir])), admin_token)
        page = client.get(f"{PREFIX}/runs/big").text
        start = page.index('<svg class="chart tokens"')
        token_svg = page[start:page.index("</svg>", start)]
        assert token_svg.count('<rect class="bar status-') == 400
        assert len(re.findall(r"<tr data-status=", page)) == 200
        assert "10000 items counted" in page and "over budget" in page
        # spec-004 (4158 tokens, over the budget) is the largest of its run of items: its bar shows it.
        assert "spec-000 to spec-024 (25 items), largest spec-004: 4158 of 3796 tokens" in token_svg


class TestTokenChartGroups:
    def test_groups_cover_every_item_once_and_keep_the_largest(self) -> None:
        from upsample_reports import charts

        from include.cosmos_upsample.report_model import ReportItem

        items = [ReportItem.model_validate({"spec_id": f"s{n}", "source_path": "", "status": "upsampled",
                                            "tokens": {"prompt": 1000 + (n == 777) * 5000, "budget": 4000}})
                 for n in range(1001)]
        chart = charts.token_chart(items)
        assert len(chart.bars) == charts.TOKEN_CHART_MAX_BARS and chart.counted == 1001 and chart.over_budget == 1
        groups = charts._groups(1001, charts.TOKEN_CHART_MAX_BARS)
        assert groups[0][0] == 0 and groups[-1][1] == 1001
        assert all(a[1] == b[0] for a, b in zip(groups, groups[1:], strict=False))
        assert {end - start for start, end in groups} == {2, 3}
        assert sum("largest s777: 6000 of 4000" in bar.title for bar in chart.bars) == 1
        assert len(charts.token_chart(items[:24]).bars) == 24  # small runs: one bar per item, as before
