"""Hint-frame thumbnails: the signed-in route serves only the JPEG files a run's own items name, inside that work
dir's hints/ folder; the run page shows them beside each answer, flagged items with their failed checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from upsample_fixtures import make_report, write_report
from upsample_reports.reports import DirectoryRuns, RunIndex
from upsample_reports.views import PAGE_SIZE

from include.cosmos_upsample.layout import safe_name
from tests.plugin.test_reports_app import RUN_ID, mounted, run_url

JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 64


@pytest.fixture
def run_with_frames(output_dir: Path) -> dict[str, Any]:
    """A report, and the run folder's merged items naming their hint frames (as merge leaves them)."""
    report = make_report(RUN_ID, output_dir, items=6)
    report["items"][3].update(status="flagged", reason="the answer failed the quality checks (meta) after 3 attempts",
                              quality={"verdict": "flagged", "failed_checks": ["meta", "too_short"], "attempts": 3,
                                       "words": 4, "finish_reason": "stop", "cleaned": False},
                              output_path=str(output_dir / "review" / "spec-003.json"))
    report["counts"].update(upsampled=report["counts"]["upsampled"] - 1, flagged=1)
    write_report(output_dir, report)
    (output_dir / "review" / "spec-003.json").write_text(json.dumps({"spec_id": "spec-003", "answer": "x"}))
    hints = output_dir / "hints" / "abc"
    hints.mkdir(parents=True)
    good = [hints / "frame-00.jpg", hints / "frame-01.jpg"]
    for path in good:
        path.write_bytes(JPEG)
    outside = output_dir.parent / "secret.jpg"
    outside.write_bytes(b"secret")
    (hints / "link.jpg").symlink_to(outside)
    (hints / "frame.png").write_bytes(b"png")
    frames = {"spec-000": [str(path) for path in good], "spec-001": [str(outside), str(hints / "link.jpg"),
                                                                      str(hints / "frame.png"), "relative.jpg"],
              "spec-003": [str(good[1])]}
    run_dir = output_dir / "runs" / safe_name(RUN_ID)
    run_dir.mkdir(parents=True)
    (run_dir / "merged.json").write_text(json.dumps(
        [{"spec_id": item["spec_id"], "frame_paths": frames.get(item["spec_id"], [])} for item in report["items"]]))
    return {"output_dir": output_dir, "good": good}


@pytest.fixture
def frames_client(run_with_frames, admin_token) -> TestClient:
    client = TestClient(mounted(RunIndex(None, DirectoryRuns(lambda: [run_with_frames["output_dir"]]))))
    client.cookies.set("_token", admin_token)
    return client


def test_a_frame_the_run_names_is_served_as_jpeg(frames_client, run_with_frames):
    response = frames_client.get(run_url(suffix="/items/spec-000/frames/1"))
    assert response.status_code == 200 and response.content == JPEG
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("suffix", [
    "/items/spec-001/frames/0",  # a file outside hints/ named by an item
    "/items/spec-001/frames/1",  # a symlink in hints/ leading outside
    "/items/spec-001/frames/2",  # not a JPEG
    "/items/spec-001/frames/3",  # a relative path
    "/items/spec-000/frames/2",  # no such frame
    "/items/nobody/frames/0",
    "/items/..%2F..%2Fsecret/frames/0",
])
def test_nothing_else_is_served(frames_client, suffix):
    response = frames_client.get(run_url(suffix=suffix))
    assert response.status_code == 404 and b"secret" not in response.content


def test_an_index_out_of_bounds_is_refused(frames_client):
    assert frames_client.get(run_url(suffix="/items/spec-000/frames/-1")).status_code == 422


def test_signed_out_gets_no_frame(run_with_frames, auth_manager):
    client = TestClient(mounted(RunIndex(None, DirectoryRuns(lambda: [run_with_frames["output_dir"]]))))
    assert client.get(run_url(suffix="/items/spec-000/frames/0")).status_code in (401, 403)


def test_the_run_page_shows_thumbnails_checks_and_a_flagged_filter(frames_client):
    html = frames_client.get(run_url()).text
    assert html.count('class="thumb"') == 3  # spec-000's two frames, spec-003's one; none of spec-001's
    assert 'src="/upsample-reports/runs/' in html and "/items/spec-000/frames/0" in html
    assert '<span class="check">meta</span>' in html and '<span class="check">too_short</span>' in html
    assert "status=flagged" in html and "review JSON" in html
    flagged = frames_client.get(run_url() + "?status=flagged").text
    assert flagged.count('data-status="flagged"') == 1 and 'data-status="upsampled"' not in flagged
    assert PAGE_SIZE >= 6
