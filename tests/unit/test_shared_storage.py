from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowFailException

from include.cosmos_upsample import stages
from include.cosmos_upsample.batching import PlannedJob
from include.cosmos_upsample.errors import NotRetryable, fails_fast
from include.cosmos_upsample.shared_storage import MARKER_NAME, SharedStorageError, require_shared, write_marker
from tests.helpers import write_spec


class TestMarker:
    def test_written_record_names_the_writer(self, tmp_path):
        path = write_marker(tmp_path / "runs" / "manual__1")
        record = json.loads(path.read_text())
        assert path.name == MARKER_NAME
        assert record["host"] == socket.gethostname() and record["pid"] > 0 and record["written_at"]
        assert require_shared(path.parent) == record
        assert [p.name for p in path.parent.iterdir()] == [MARKER_NAME]  # no temp file left behind

    def test_missing_marker_fails_at_once_naming_folder_and_host(self, tmp_path):
        with pytest.raises(SharedStorageError) as caught:
            require_shared(tmp_path)
        message = str(caught.value)
        assert str(tmp_path) in message and repr(socket.gethostname()) in message and "flock" in message
        # Not retryable: every DAG task's `fails_fast` turns it into Airflow's "fail now, do not retry".
        assert isinstance(caught.value, NotRetryable)
        with pytest.raises(AirflowFailException, match="does not share that storage"):
            fails_fast(require_shared)(tmp_path)

    def test_unreadable_marker_counts_as_missing(self, tmp_path):
        (tmp_path / MARKER_NAME).write_text("{half")
        with pytest.raises(SharedStorageError):
            require_shared(tmp_path)


class TestStagesCheckTheMarker:
    @pytest.fixture
    def discovered(self, tmp_path, sample_video) -> tuple[Path, list[str]]:
        folder = tmp_path / "in"
        folder.mkdir()
        (folder / "clip.mp4").write_bytes(sample_video.read_bytes())
        write_spec(folder, "one", input_video_path="clip.mp4")
        params = {"input_dir": str(folder), "output_dir": str(tmp_path / "out"), "dry_run": True}
        return stages.discover(params, "manual__shared", lambda _key: None, {})

    def test_discover_writes_it_and_later_stages_run(self, discovered):
        run_dir, chunks = discovered
        assert (run_dir / MARKER_NAME).is_file()
        assert Path(stages.validate_chunk(run_dir, chunks[0])).is_file()

    @pytest.mark.parametrize("stage", ["validate", "batch", "upsample", "merge", "report"])
    def test_a_worker_without_the_run_folder_does_nothing(self, discovered, stage):
        run_dir, chunks = discovered
        validated = stages.validate_chunk(run_dir, chunks[0])
        (run_dir / MARKER_NAME).unlink()  # as a worker with its own local output_dir sees it
        before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
        calls = {
            "validate": lambda: stages.validate_chunk(run_dir, chunks[0]),
            "batch": lambda: stages.batch(run_dir, chunks[0], validated),
            "upsample": lambda: stages.upsample(run_dir, PlannedJob(job_key="k", job_dir=None, conn_id=None, items=1),
                                                0, {}),
            "merge": lambda: stages.merge(str(run_dir), "manual__shared"),
            "report": lambda: stages.report(str(run_dir), "manual__shared", "dag", "2026-01-01T00:00:00+00:00"),
        }
        with pytest.raises(SharedStorageError, match=str(run_dir)):
            calls[stage]()
        assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
