"""A run started by bucket events, stage by stage in this process against the moto S3 server: it takes exactly the
announced spec objects of the watched prefix (never a listing of the bucket), reports an announced object deleted
before the run and a spec whose video has not arrived yet, each with a reason, and sets non-specs aside."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from include.cosmos_upsample import stages
from include.cosmos_upsample.events import Announcement, RunStart
from include.cosmos_upsample.report_model import RunReport
from include.cosmos_upsample.settings import DAG_ID
from include.cosmos_upsample.storage import clean_url, path_from
from tests.helpers import make_video

pytestmark = pytest.mark.storage


def spec(stem: str, video: str = "clip.mp4") -> bytes:
    return json.dumps({"id": stem, "prompt": f"A robot arm picks up a red cup ({stem}).",
                       "input_video_path": video}).encode()


def run_stages(started: RunStart, output_dir: Path, s3_conn: str, run_id: str, **params) -> RunReport:
    """discover -> per chunk validate/batch -> merge -> report, as the DAG runs them (dry run: no model)."""
    params = {"output_dir": str(output_dir), "storage_conn_id": s3_conn, "dry_run": True, **params}
    run_dir, chunks = stages.discover(params, run_id, lambda _key: None, {}, started=started)
    for chunk in chunks:
        stages.batch(run_dir, chunk, stages.validate_chunk(run_dir, chunk))
    stages.merge(str(run_dir), run_id)
    location = stages.report(str(run_dir), run_id, DAG_ID, "2026-01-01T00:00:00+00:00")
    return RunReport.from_text(Path(location["report_json"]).read_text())


@pytest.fixture
def prefix(bucket, s3_conn, tmp_path):
    """s3://BUCKET/incoming with a clip, three specs, a nested one, and one outside the prefix."""
    root = path_from(f"s3://{bucket}/incoming", s3_conn)
    (root / "clip.mp4").write_bytes(make_video(tmp_path / "clip.mp4", 320, 180).read_bytes())
    for stem in ("a", "b", "c"):
        (root / f"{stem}.json").write_bytes(spec(stem))
    (root / "2026/nested.json").write_bytes(spec("nested", "../clip.mp4"))
    (root.parent / "outside.json").write_bytes(spec("outside"))
    return root


def announced(root, *names: str) -> RunStart:
    """A run started by one new message announcing `names` under `root` (events.run_start makes these from the
    watcher's asset events), after S3's test event."""
    base = f"s3://{root.path}"
    message = Announcement(str(uuid.uuid4()), objects=tuple(f"{base}/{name}" for name in names))
    return RunStart(kind="asset_event", run_type="asset_triggered", prefix=base, announcements=(
        Announcement("m-0", ignored=("message m-0: s3:TestEvent (...)",)), message))


def by_stem(report: RunReport) -> dict[str, object]:
    return {Path(item.source_path).stem: item for item in report.items}


def test_only_the_announced_specs_of_the_prefix(prefix, s3_conn, tmp_path):
    report = run_stages(announced(prefix, "a.json", "clip.mp4", "2026/nested.json"), tmp_path / "out", s3_conn,
                        "asset_triggered__1")
    assert set(by_stem(report)) == {"a"}  # b and c are in the prefix, but nobody announced them
    assert report.counts.as_dict() == {"discovered": 1, "upsampled": 0, "cached": 0, "invalid": 0, "failed": 0,
                                       "flagged": 0, "planned": 1}
    # The watched prefix is the run's input_dir, whatever the defaults say.
    assert clean_url(path_from(report.params["input_dir"])) == f"s3://{prefix.path}"
    base = f"s3://{prefix.path}"
    assert report.trigger.kind == "asset_event" and report.trigger.objects == [f"{base}/a.json"]
    # What the events held besides: kept from the messages, plus the objects that are not specs of this run.
    assert report.trigger.ignored[0].startswith("message m-0")
    assert any(line.startswith(f"{base}/clip.mp4: not a spec") for line in report.trigger.ignored)
    assert any(line.startswith(f"{base}/2026/nested.json: not a spec") for line in report.trigger.ignored)


def test_spec_pattern_decides_what_is_a_spec(prefix, s3_conn, tmp_path):
    report = run_stages(announced(prefix, "2026/nested.json", "clip.mp4"), tmp_path / "out", s3_conn,
                        "asset_triggered__2", spec_pattern="**/*.json")
    assert set(by_stem(report)) == {"nested"} and by_stem(report)["nested"].status == "planned"


def test_an_object_deleted_before_the_run_is_an_item_with_a_reason(prefix, s3_conn, tmp_path):
    (prefix / "b.json").unlink()
    report = run_stages(announced(prefix, "a.json", "b.json"), tmp_path / "out", s3_conn, "asset_triggered__3")
    items = by_stem(report)
    assert items["a"].status == "planned"
    assert items["b"].status == "invalid"
    assert items["b"].reason.startswith("b.json: announced by a bucket event") and "deleted" in items["b"].reason
    assert report.trigger.objects == [f"s3://{prefix.path}/{name}" for name in ("a.json", "b.json")]


def test_a_spec_whose_video_is_still_missing_is_invalid_then_taken_when_announced_again(prefix, s3_conn, tmp_path):
    (prefix / "early.json").write_bytes(spec("early", "late.mp4"))
    first = by_stem(run_stages(announced(prefix, "early.json"), tmp_path / "out", s3_conn, "asset_triggered__4"))
    assert first["early"].status == "invalid" and "'late.mp4' not found under input_dir" in first["early"].reason
    (prefix / "late.mp4").write_bytes((prefix / "clip.mp4").read_bytes())
    second = by_stem(run_stages(announced(prefix, "early.json"), tmp_path / "out", s3_conn, "asset_triggered__5"))
    assert second["early"].status == "planned"


def test_a_run_not_started_by_events_lists_the_input_dir(prefix, s3_conn, tmp_path):
    report = run_stages(RunStart(kind="schedule", run_type="scheduled"), tmp_path / "out", s3_conn, "scheduled__1",
                        input_dir=f"s3://{prefix.path}")
    assert set(by_stem(report)) == {"a", "b", "c"}
    assert report.trigger.model_dump() == {"kind": "schedule", "run_type": "scheduled", "prefix": None,
                                           "objects": [], "ignored": []}
