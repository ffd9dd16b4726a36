"""Where everything lives under `output_dir`; the one place that names these folders.

    specs/<spec_id>.json              upsampled PromptSpecs (the product)
    reports/<run_id>.json|.html       run reports
    review/<spec_id>.json             flagged answers with their failed checks and attempts, for a person; never
                                      consumed downstream
    hints/<hint_key>/frame-NN.jpg     hint frames, cached by content key (shared by runs)
    jobs/<job_key>/                   one model job: manifest.json, ledger.jsonl (the checkpoint), logs
    jobs/by-item/<item_key>           which job was given the item, so a later run reuses its answer
    runs/<run_id>/                    one run's folder (RunFolder): settings.json, discovered.json, chunks/,
                                      validated/, plans/, merged.json, stages/
    events/claims/<message_id>        the run that took a bucket-event message (events.claim_messages)
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from functools import reduce
from operator import truediv
from pathlib import Path
from typing import Any, ClassVar, overload

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._+=:@-]")
# Folder names under output_dir that readers (the UI plugin) check paths against.
SPECS, REPORTS, HINTS, JOBS, RUNS, REVIEW = "specs", "reports", "hints", "jobs", "runs", "review"
EVENTS = "events"


def safe_name(value: str) -> str:
    """A run id as a single path component: Airflow run ids hold ':' and '+', which are fine; '/' is not."""
    cleaned = _UNSAFE_NAME.sub("_", value).lstrip(".")
    return cleaned or "_"


class _Under:
    """A fixed path under a layout's folder (the field its class names in FOLDER). Joined with the folder's own `/`:
    the output folder may be an ObjectStoragePath (s3://...), which `Path(folder, name)` would silently make a local
    path."""

    def __init__(self, *parts: str) -> None:
        self.parts = parts

    @overload
    def __get__(self, layout: None, owner: type) -> _Under: ...

    @overload
    def __get__(self, layout: object, owner: type | None = None) -> Path: ...

    def __get__(self, layout: object | None, owner: type | None = None) -> Path | _Under:
        if layout is None:
            return self
        return reduce(truediv, self.parts, getattr(layout, layout.FOLDER))


@dataclass(frozen=True)
class OutputLayout:
    FOLDER: ClassVar[str] = "root"
    root: Path
    specs_dir = _Under(SPECS)
    reports_dir = _Under(REPORTS)
    hints_dir = _Under(HINTS)
    jobs_dir = _Under(JOBS)
    review_dir = _Under(REVIEW)
    message_claims_dir = _Under(EVENTS, "claims")

    @classmethod
    def at(cls, output_dir: str | Path) -> OutputLayout:
        return cls(Path(output_dir).expanduser().resolve())

    def spec_path(self, spec_id: str) -> Path:
        return self.specs_dir / f"{spec_id}.json"

    def review_path(self, spec_id: str) -> Path:
        return self.review_dir / f"{spec_id}.json"

    def report_paths(self, run_id: str) -> tuple[Path, Path]:
        name = safe_name(run_id)
        return self.reports_dir / f"{name}.json", self.reports_dir / f"{name}.html"

    def run_dir(self, run_id: str) -> Path:
        return self.root / RUNS / safe_name(run_id)

    def run_folder(self, run_id: str) -> RunFolder:
        return RunFolder(self.run_dir(run_id))

    def job_dir(self, job_key: str) -> Path:
        return self.jobs_dir / job_key

    def hint_dir(self, hint_key: str) -> Path:
        return self.hints_dir / hint_key

    def answer_pointer(self, item_key: str) -> Path:
        """jobs/by-item/<item_key>: the key of the job that was given this item (see merge.earlier_answers)."""
        return self.jobs_dir / "by-item" / item_key


@dataclass(frozen=True)
class RunFolder:
    """runs/<run_id>/: everything one run plans and records. discover makes it and the DAG hands its path to every
    later stage, which is why no stage works it out from a file inside it.

        settings.json           the settings discover resolved; every later stage reads them back
        trigger.json            what started the run (report_model.RunTrigger): schedule, manual, bucket events
        discovered.json         items final at discovery (cached, duplicate ids)
        chunks/chunk-NNNN.json  the spec files of one future model job and the GPU slot it is planned on; each
                                chunk runs its own validate -> batch -> upsample (a mapped task group)
        validated/chunk-NNNN.json  the items a validate task made of that chunk
        plans/chunk-NNNN.json   the model job batch made of that chunk, and its items earlier jobs already answered
        review.json             the spec ids of the run's review requests, in the review task's map-index order
        merged.json             every item after merge: what the report shows
        stages/<stage>.json     seconds of work per stage (and per mapped index)
        notes/<stage>-chunk-NNNN.txt  why a chunk's validate or batch did not finish (stage_notes), while it has not
        video_cache/chunk-NNNN.json  video cache hits and downloads of a validate task (object-storage input)
    """

    FOLDER: ClassVar[str] = "path"
    path: Path
    settings = _Under("settings.json")
    trigger = _Under("trigger.json")
    discovered = _Under("discovered.json")
    merged = _Under("merged.json")
    review_requests = _Under("review.json")
    chunks_dir = _Under("chunks")
    validated_dir = _Under("validated")
    plans_dir = _Under("plans")
    stages_dir = _Under("stages")

    @classmethod
    def at(cls, run_dir: str | Path) -> RunFolder:
        return cls(Path(run_dir))

    def chunk(self, index: int) -> Path:
        return self.chunks_dir / f"chunk-{index:04d}.json"

    @staticmethod
    def chunk_index(chunk: Path) -> int:
        return int(chunk.stem.rsplit("-", 1)[-1])

    def chunks(self) -> list[Path]:
        return sorted(self.chunks_dir.glob("*.json"))

    def validated(self, chunk: Path) -> Path:
        """Where validation of `chunk` (a file of chunks/) writes its items."""
        return self.validated_dir / chunk.name

    def validated_files(self) -> list[Path]:
        return sorted(self.validated_dir.glob("*.json"))

    def job_plan(self, chunk: Path) -> Path:
        """Where batch writes the model job it made of `chunk` (a file of chunks/)."""
        return self.plans_dir / chunk.name

    def job_plans(self) -> list[Path]:
        return sorted(self.plans_dir.glob("*.json"))

    def planned_jobs(self) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """The jobs batch made so far (one per planned chunk that has items to send), and the items earlier jobs
        already answered (item key -> that job's folder)."""
        jobs: list[dict[str, Any]] = []
        answered: dict[str, str] = {}
        for path in self.job_plans():
            plan = read_json(path)
            jobs.extend([plan["job"]] if plan["job"]["job_key"] else [])
            answered.update(plan["answered"])
        return jobs, answered

    def stage_note(self, stage: str, chunk: Path) -> Path:
        """Where `stage` (validate, batch) of `chunk` keeps why it did not finish (see stage_notes)."""
        return self.path / "notes" / f"{stage}-{chunk.stem}.txt"

    def stage_record(self, stage: str, index: int | None = None) -> Path:
        name = stage if index is None else f"{stage}-{index:04d}"
        return self.stages_dir / f"{name}.json"

    def stage_records(self) -> list[Path]:
        return sorted(self.stages_dir.glob("*.json"))

    def video_cache_stats(self, chunk: Path) -> Path:
        return self.path / "video_cache" / chunk.name


def json_text(data: Any) -> str:
    """Readable UTF-8 JSON; a file name that is not UTF-8 (Python keeps its bytes as lone surrogates) cannot be
    encoded that way, so such data is written with \\u escapes instead of failing the whole run."""
    text = json.dumps(data, indent=2, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(data, indent=2)
    return text + "\n"


def write_local_atomic(path: Path, chunks: Iterable[bytes]) -> None:
    """Readers never see a half-written file: write a temp file in the same folder, fsync, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; outputs are read by other users (the UI, downstream DAGs)
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_local_atomic(path, [json_text(data).encode("utf-8")])


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
