"""The real DAG (`airflow dags test`) with specs, videos, outputs and reports in S3 (the moto server): nested
prefixes, bad inputs with reasons, a fully cached re-run that downloads no video, the video cache on a re-validation,
the Asset event naming the output location, and the UI plugin showing the report from the bucket."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import pytest

from include.cosmos_upsample.layout import safe_name
from include.cosmos_upsample.settings import ASSET_URI
from include.cosmos_upsample.storage import path_from
from tests.helpers import make_video, run_dag
from tests.plugin.conftest import admin_token, auth_manager, inprocess_db  # noqa: F401  (plugin auth fixtures)
from tests.storage.conftest import CONN_ENV

pytestmark = pytest.mark.storage

GOOD = {"top": "top.mp4", "nested_a": "a.mp4", "nested_b": "../01/a.mp4"}  # spec -> video, next to it or not
BAD = {  # spec -> words its `invalid` reason must contain
    "missing_object": "not found under input_dir",
    "escapes": "leaves input_dir",
    "not_a_video": "unreadable video",
}


def _spec(stem: str, video: str) -> bytes:
    return json.dumps({"id": stem, "prompt": f"A robot arm picks up a red cup ({stem}).",
                       "input_video_path": video}).encode()


def bucket_digest(root) -> dict[str, str]:
    root.fs.invalidate_cache()
    return {key: hashlib.sha256(root.fs.cat_file(key)).hexdigest() for key in sorted(root.fs.find(root.path))}


@pytest.fixture(scope="module")
def s3_input(s3_conn, tmp_path_factory):
    """s3://cosmos-e2e/in with specs at the top and in dated prefixes, their videos beside them."""
    from airflow.sdk import ObjectStoragePath

    ObjectStoragePath("s3://cosmos-e2e/", conn_id=s3_conn).fs.mkdir("cosmos-e2e")
    root = path_from("s3://cosmos-e2e/in", s3_conn)
    clips = tmp_path_factory.mktemp("clips")
    (root / "top.mp4").write_bytes(make_video(clips / "wide.mp4", 640, 360).read_bytes())
    (root / "2026/01/a.mp4").write_bytes(make_video(clips / "portrait.mp4", 180, 320).read_bytes())
    (root / "top.json").write_bytes(_spec("top", GOOD["top"]))
    (root / "2026/01/nested_a.json").write_bytes(_spec("nested_a", GOOD["nested_a"]))
    (root / "2026/02/nested_b.json").write_bytes(_spec("nested_b", GOOD["nested_b"]))
    (root / "bad/missing_object.json").write_bytes(_spec("missing_object", "nope.mp4"))
    (root.parent / "outside.mp4").write_bytes((root / "top.mp4").read_bytes())  # exists, outside the prefix
    (root / "bad/escapes.json").write_bytes(_spec("escapes", "../../outside.mp4"))
    (root / "bad/notes.mp4").write_bytes(b"these are meeting notes, not a video\n" * 50)
    (root / "bad/not_a_video.json").write_bytes(_spec("not_a_video", "notes.mp4"))
    return root


@pytest.fixture(scope="module")
def runs(airflow_home, s3_conn, s3_input, moto_server, tmp_path_factory):
    """First run, then a re-run of the same conf; what each saw."""
    env = {**airflow_home, CONN_ENV: os.environ[CONN_ENV]}
    work = tmp_path_factory.mktemp("work")
    conf = {"input_dir": "s3://cosmos-e2e/in", "output_dir": "s3://cosmos-e2e/out", "storage_conn_id": s3_conn,
            "work_dir": str(work), "spec_pattern": "**/*.json", "max_output_tokens": 64}
    inputs_before = bucket_digest(s3_input)
    run_dag(env, conf)
    first = _latest_report(s3_conn)
    ledgers = {str(p): p.read_bytes() for p in sorted(work.glob("jobs/*/ledger.jsonl"))}
    cached_videos = {p.name: p.stat().st_size for p in (work / "cache" / "videos").iterdir()}
    video_gets = moto_server.gets_of(".mp4")
    run_dag(env, conf)
    second = _latest_report(s3_conn, exclude=first["run_id"])
    video_gets_rerun = moto_server.gets_of(".mp4") - video_gets
    return {"video_gets_rerun": video_gets_rerun, "env": env, "conf": conf, "work": work, "first": first,
            "second": second, "ledgers": ledgers,
            "cached_videos": cached_videos, "video_gets": video_gets, "inputs_before": inputs_before}


def _latest_report(conn_id: str, exclude: str | None = None) -> dict:
    reports = path_from("s3://cosmos-e2e/out/reports", conn_id)
    reports.fs.invalidate_cache()
    found = [json.loads(p.read_text()) for p in reports.glob("*.json")]
    found = [report for report in found if report["run_id"] != exclude]
    return max(found, key=lambda report: report["finished_at"])


def _items(report: dict) -> dict[str, dict]:
    return {Path(item["source_path"]).stem: item for item in report["items"]}


class TestS3Run:
    def test_every_spec_in_every_prefix_is_one_item(self, runs, s3_input):
        report = runs["first"]
        listed = sorted(str(p) for p in s3_input.glob("**/*.json"))
        assert sorted(item["source_path"] for item in report["items"]) == listed and len(listed) == 6
        assert report["counts"] == {"discovered": 6, "upsampled": 3, "cached": 0, "invalid": 3, "failed": 0,
                                    "flagged": 0}

    def test_bad_inputs_have_reasons_naming_the_file(self, runs):
        items = _items(runs["first"])
        for stem, words in BAD.items():
            assert items[stem]["status"] == "invalid", items[stem]
            assert items[stem]["reason"].startswith(f"{stem}.json: "), items[stem]["reason"]
            assert words in items[stem]["reason"], items[stem]["reason"]

    def test_outputs_and_reports_are_in_the_bucket(self, runs, s3_conn):
        out = path_from("s3://cosmos-e2e/out", s3_conn)
        out.fs.invalidate_cache()
        keys = sorted(key.split("/out/", 1)[1] for key in out.fs.find(out.path))
        run_ids = {runs["first"]["run_id"], runs["second"]["run_id"]}
        assert [key for key in keys if key.startswith("specs/")] == [f"specs/{stem}.json" for stem in sorted(GOOD)]
        assert len([key for key in keys if key.startswith("reports/")]) == 3 * len(run_ids)  # json, html, summary
        assert {f"reports/summaries/{safe_name(run_id)}.json" for run_id in run_ids} <= set(keys)
        assert all(key.startswith(("specs/", "reports/")) for key in keys), keys  # no scratch, no temp objects
        for stem in GOOD:
            item = _items(runs["first"])[stem]
            spec = json.loads(path_from(item["output_path"]).read_text())
            assert item["status"] == "upsampled" and spec["is_upsampled"] is True
            assert spec["parent_prompt_text"] == f"A robot arm picks up a red cup ({stem})."
            assert spec["metadata"]["upsampling"]["content_key"]

    def test_scratch_is_in_work_dir(self, runs):
        work = runs["work"]
        assert list(work.glob("runs/*/settings.json")) and runs["ledgers"] and list(work.glob("hints/*/frame-00.jpg"))

    def test_inputs_are_untouched(self, runs, s3_input):
        assert bucket_digest(s3_input) == runs["inputs_before"]

    def test_rerun_is_fully_cached_calls_no_model_and_downloads_no_video(self, runs, moto_server):
        assert runs["second"]["counts"] == {"discovered": 6, "upsampled": 0, "cached": 3, "invalid": 3, "failed": 0,
                                            "flagged": 0}
        work = runs["work"]
        assert {str(p): p.read_bytes() for p in sorted(work.glob("jobs/*/ledger.jsonl"))} == runs["ledgers"]
        assert runs["video_gets"] >= 3 and runs["video_gets_rerun"] == 0  # the first run did fetch them
        assert {p.name: p.stat().st_size for p in (work / "cache" / "videos").iterdir()} == runs["cached_videos"]
        # Only the invalid specs are validated again: notes.mp4 (not a video) comes from the cache.
        stats = [json.loads(p.read_text()) for p in
                 (work / "runs" / safe_name(runs["second"]["run_id"])).glob("video_cache/*.json")]
        assert stats and sum(s["downloads"] for s in stats) == 0 and sum(s["hits"] for s in stats) == 1

    def test_revalidation_takes_every_video_from_the_cache(self, runs, moto_server):
        """A forced dry run validates every spec again: each video comes from work_dir's cache, none from S3."""
        gets = moto_server.gets_of(".mp4")
        run_dag(runs["env"], {**runs["conf"], "force": True, "dry_run": True})
        stats_files = sorted(runs["work"].glob("runs/*/video_cache/*.json"), key=lambda p: p.stat().st_mtime_ns)
        latest_run = stats_files[-1].parent.parent
        stats = [json.loads(p.read_text()) for p in latest_run.glob("video_cache/*.json")]
        assert sum(s["downloads"] for s in stats) == 0 and sum(s["hits"] for s in stats) == 4  # 3 good + notes.mp4
        assert moto_server.gets_of(".mp4") == gets

    def test_the_asset_event_names_the_output_location(self, runs, s3_conn):
        db = Path(runs["env"]["AIRFLOW_HOME"]) / "airflow.db"
        with sqlite3.connect(db) as connection:
            extra = connection.execute(
                "SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id WHERE a.name = ? "
                "ORDER BY e.id DESC LIMIT 1", (ASSET_URI,)).fetchone()[0]
        extra = json.loads(extra)
        assert extra["output_dir"] == "s3://cosmos-e2e/out" and extra["storage_conn_id"] == s3_conn
        # What a downstream DAG scheduled on the asset does with it.
        specs = path_from(extra["specs_dir"], extra["storage_conn_id"])
        assert sorted(p.name for p in specs.glob("*.json")) == [f"{stem}.json" for stem in sorted(GOOD)]


class TestPluginShowsReportsFromTheBucket:
    @pytest.fixture
    def app(self, runs):
        from fastapi import FastAPI
        from upsample_reports.app import create_app
        from upsample_reports.reports import DatabaseRuns, RunIndex

        parent = FastAPI()
        parent.mount("/upsample-reports", create_app(RunIndex(DatabaseRuns(), None)))
        return parent

    def test_signed_in_user_sees_the_s3_report_and_output(self, app, runs, admin_token):  # noqa: F811
        from fastapi.testclient import TestClient

        client = TestClient(app)
        client.cookies.set("_token", admin_token)
        run_id = runs["first"]["run_id"]
        report = client.get(f"/upsample-reports/api/runs/{run_id}")
        assert report.status_code == 200 and report.json()["counts"]["upsampled"] == 3
        page = client.get(f"/upsample-reports/runs/{run_id}")
        assert page.status_code == 200 and "missing_object.json" in page.text
        spec = client.get(f"/upsample-reports/runs/{run_id}/items/nested_a")
        assert spec.status_code == 200 and spec.json()["is_upsampled"] is True

    def test_the_run_list_shows_the_runs_from_their_summaries_in_the_bucket(self, app, runs, admin_token):  # noqa: F811
        from fastapi.testclient import TestClient

        client = TestClient(app)
        client.cookies.set("_token", admin_token)
        listed = {run["run_id"]: run for run in client.get("/upsample-reports/api/runs").json()["runs"]}
        first = listed[runs["first"]["run_id"]]
        assert first["has_report"] and first["counts"] == runs["first"]["counts"]
        assert listed[runs["second"]["run_id"]]["counts"]["cached"] == 3

    def test_signed_out_is_refused(self, app, runs, auth_manager):  # noqa: F811
        from fastapi.testclient import TestClient

        run_id = runs["first"]["run_id"]
        for path in (f"/upsample-reports/api/runs/{run_id}", f"/upsample-reports/runs/{run_id}/items/nested_a"):
            assert TestClient(app).get(path).status_code == 401
