"""The run folder names every file of a run, and stages work from the folder they are given."""

from __future__ import annotations

from pathlib import Path

import pytest

from include.cosmos_upsample import stages
from include.cosmos_upsample.layout import OutputLayout, RunFolder, _Under, read_json


class TestRunFolder:
    def test_every_path_of_a_run(self, tmp_path):
        run = OutputLayout.at(tmp_path).run_folder("manual__2026-01-01T00:00:00+00:00")
        assert run.path == tmp_path.resolve() / "runs" / "manual__2026-01-01T00:00:00+00:00"
        assert [p.relative_to(run.path).as_posix() for p in (run.settings, run.discovered, run.merged)] == [
            "settings.json", "discovered.json", "merged.json"]
        assert run.chunk(3).relative_to(run.path).as_posix() == "chunks/chunk-0003.json"
        assert run.validated(run.chunk(3)).relative_to(run.path).as_posix() == "validated/chunk-0003.json"
        assert run.job_plan(run.chunk(3)).relative_to(run.path).as_posix() == "plans/chunk-0003.json"
        assert run.stage_record("validate", 3).relative_to(run.path).as_posix() == "stages/validate-0003.json"
        assert run.stage_record("merge").name == "merge.json"
        assert RunFolder.chunk_index(run.chunk(12)) == 12

    def test_a_run_id_with_a_slash_stays_one_folder(self, tmp_path):
        run = OutputLayout.at(tmp_path).run_folder("../../etc")
        assert run.path.parent == tmp_path.resolve() / "runs"

    def test_listings_are_sorted_and_empty_before_the_run(self, tmp_path):
        run = RunFolder.at(tmp_path / "runs" / "r")
        assert run.chunks() == [] and run.validated_files() == [] and run.stage_records() == []
        assert run.job_plans() == [] and run.planned_jobs() == ([], {})
        for index in (2, 0, 1):
            run.chunk(index).parent.mkdir(parents=True, exist_ok=True)
            run.chunk(index).write_text("[]")
        assert [RunFolder.chunk_index(path) for path in run.chunks()] == [0, 1, 2]


class TestObjectStorageLayout:
    """The output folder may be an ObjectStoragePath (s3://...): a fixed path under it that came back as a local Path
    would send every file of an S3 run to the local disk."""

    @pytest.mark.parametrize("layout_class", [OutputLayout, RunFolder])
    def test_every_fixed_path_keeps_the_folder_type_and_protocol(self, layout_class):
        from airflow.sdk import ObjectStoragePath

        folder = ObjectStoragePath("memory://bucket/out")  # fsspec's in-memory store: no server, no connection
        layout = layout_class(folder)
        fixed = [name for name, value in vars(layout_class).items() if isinstance(value, _Under)]
        assert {"specs_dir", "settings"} & set(fixed)
        for name in fixed:
            path = getattr(layout, name)
            assert isinstance(path, ObjectStoragePath) and path.protocol == "memory", name
            assert str(path).startswith("memory://bucket/out/"), name


class TestStagesUseTheGivenRunFolder:
    """validate and batch take the run folder as an argument; nothing is worked out from a chunk's path."""

    def test_discover_validate_batch_merge_report(self, tmp_path):
        inputs, outputs = tmp_path / "in", tmp_path / "out"
        inputs.mkdir()
        (inputs / "broken.json").write_text("{not json")
        params = {"input_dir": str(inputs), "output_dir": str(outputs), "dry_run": True}
        run_dir, chunks = stages.discover(params, "manual__r1", lambda _key: None, {})
        run = RunFolder.at(run_dir)
        assert run_dir == OutputLayout.at(outputs).run_dir("manual__r1") and run.settings.is_file()
        assert chunks == [str(run.chunk(0))]
        # A copy of the chunk elsewhere: its results still go to the run folder the stage was given.
        elsewhere = tmp_path / "elsewhere" / "x" / "chunk-0000.json"
        elsewhere.parent.mkdir(parents=True)
        elsewhere.write_text(Path(chunks[0]).read_text())
        validated = stages.validate_chunk(str(run_dir), str(elsewhere))
        assert validated == str(run.validated(run.chunk(0)))
        job = stages.batch(str(run_dir), str(elsewhere), validated)
        plan = {"job_key": None, "job_dir": None, "conn_id": None, "slot": None, "devices": None, "items": 0}
        assert job.model_dump(mode="json") == plan
        assert read_json(run.job_plan(run.chunk(0))) == {"job": plan, "answered": {}}
        assert stages.upsample(str(run_dir), job, 0, {}) == {"job_key": None, "ran": False}
        assert stages.merge(str(run_dir), "manual__r1") == str(run.merged)
        location = stages.report(str(run_dir), "manual__r1", "dag", "2026-01-01T00:00:00+00:00")
        report = read_json(Path(location["report_json"]))
        assert [item["status"] for item in report["items"]] == ["invalid"]
        assert set(report["stages"]) == {"discover", "validate", "batch", "merge", "report"}
