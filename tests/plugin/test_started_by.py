"""The run list and the run page say what started each run (the report's `trigger`), escaped like every string."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from upsample_fixtures import HOSTILE_NAME, make_report, write_report
from upsample_reports.app import create_app
from upsample_reports.reports import DirectoryRuns, RunIndex

PREFIX = "/upsample-reports"
EVENT_RUN, DAILY_RUN, OLD_RUN = ("asset_triggered__2026-11-28T10:00:00+00:00", "scheduled__2026-11-28T00:00:00+00:00",
                                 "manual__2026-11-01T00:00:00+00:00")
OBJECTS = ["s3://specs/incoming/arm.json", f"s3://specs/incoming/{HOSTILE_NAME}.json"]


@pytest.fixture
def client(output_dir: Path, admin_token: str) -> TestClient:
    reports: list[dict[str, Any]] = [make_report(run_id, output_dir, items=2) for run_id in (EVENT_RUN, DAILY_RUN,
                                                                                            OLD_RUN)]
    reports[0]["trigger"] = {"kind": "asset_event", "run_type": "asset_triggered", "prefix": "s3://specs/incoming",
                             "objects": OBJECTS, "ignored": ["message m-1: s3:TestEvent"]}
    reports[1]["trigger"] = {"kind": "schedule", "run_type": "scheduled"}
    for report in reports:  # the third is a report from before `trigger` existed
        write_report(output_dir, report)
    app = FastAPI()
    app.mount(PREFIX, create_app(RunIndex(None, DirectoryRuns(lambda: [output_dir]))))
    client = TestClient(app)
    client.cookies.set("_token", admin_token)
    return client


def test_the_run_list_says_what_started_each_run(client):
    rows = {row["run_id"]: row for row in client.get(f"{PREFIX}/api/runs").json()["runs"]}
    assert rows[EVENT_RUN]["trigger"] == {"kind": "asset_event", "objects": 2,
                                          "label": "bucket event: 2 specs announced under s3://specs/incoming"}
    assert rows[DAILY_RUN]["trigger"]["label"] == "the @daily schedule"
    assert rows[OLD_RUN]["trigger"] is None
    page = client.get(f"{PREFIX}/").text
    assert "<th>Started by</th>" in page and "bucket event: 2 specs announced" in page and "the @daily schedule" in page


def test_the_run_page_lists_the_announced_objects_escaped(client):
    page = client.get(f"{PREFIX}/runs/{quote(EVENT_RUN, safe='')}").text
    assert "<dt>Started by</dt>" in page and "<code>s3://specs/incoming/arm.json</code>" in page
    assert HOSTILE_NAME not in page and "&lt;img src=x onerror=" in page
    assert "Started by" not in client.get(f"{PREFIX}/runs/{quote(OLD_RUN, safe='')}").text
