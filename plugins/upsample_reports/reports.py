"""Find run reports and in-progress runs of `cosmos_prompt_upsample`.

Where a run's files live is decided at run time (Param, Variable, environment), so the metadata DB is the index:
the `report` task's `report_location` XCom (pushed before any too-many-failures error) names the
report file and the `discover` task's `run_dir` XCom names the run's
plan. A scan of the default output dir (and of every output dir seen in the DB) finds reports whose DB rows are
gone. Everything here is blocking I/O; the app calls it from sync routes, which FastAPI runs in a threadpool.

Paths read from XCom or a report are only followed when they have the shape the DAG writes
(`<output_dir>/reports/*.json`, `<output_dir>/runs/<run>/plan.json`, `<output_dir>/jobs/<job>/ledger.jsonl`,
an item's `output_path` inside that report's `output_dir`); nothing from a request is ever joined into a path.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from include.cosmos_upsample.settings import (
    DAG_ID,
    DEFAULT_OUTPUT_DIR,
    DISCOVER_TASK_ID,
    ENV_PREFIX,
    REPORT_TASK_ID,
    REPORT_XCOM_KEY,
    RUN_DIR_XCOM_KEY,
    VARIABLE_PREFIX,
)

log = logging.getLogger(__name__)

ITEM_STATUSES = ("upsampled", "cached", "invalid", "failed", "planned")
COUNT_KEYS = ("discovered", "upsampled", "cached", "invalid", "failed", "planned")
OUTPUT_DIR_VARIABLE = VARIABLE_PREFIX + "output_dir"
OUTPUT_DIR_ENV = ENV_PREFIX + "OUTPUT_DIR"
MAX_REPORT_BYTES = 256 * 1024 * 1024
MAX_SPEC_BYTES = 16 * 1024 * 1024


class ReportNotFound(LookupError):
    """No report, run dir or DB run is known for this run id."""


# --- reading files --------------------------------------------------------------------------------------------


class _JsonCache:
    """Parsed JSON keyed by (path, mtime, size): the run list re-reads a report only after the DAG rewrites it."""

    def __init__(self, max_entries: int = 64) -> None:
        self._entries: dict[Path, tuple[tuple[int, int], Any]] = {}
        self._lock = threading.Lock()
        self._max_entries = max_entries

    def load(self, path: Path) -> Any:
        if "://" in str(path):  # fsspec caches listings per process: the api-server must see a rewritten report
            path.fs.invalidate_cache(path.path)
        stat = path.stat()
        if stat.st_size > MAX_REPORT_BYTES:
            raise ValueError(f"{path} is larger than {MAX_REPORT_BYTES} bytes")
        # Object storage (ObjectStoragePath.stat) has no st_mtime_ns; its st_mtime is the object's LastModified.
        stamp = (getattr(stat, "st_mtime_ns", None) or int(stat.st_mtime * 1e9), stat.st_size)
        with self._lock:
            cached = self._entries.get(path)
            if cached and cached[0] == stamp:
                return cached[1]
        data = json.loads(path.read_text(encoding="utf-8"))
        with self._lock:
            if len(self._entries) >= self._max_entries:
                self._entries.pop(next(iter(self._entries)))
            self._entries[path] = (stamp, data)
        return data


_REPORTS = _JsonCache()


def _local_path(value: Any) -> Path | None:
    """An absolute local path from an XCom or report value; object-storage URLs and relative paths are refused."""
    if not isinstance(value, str) or not value or "://" in value or "\x00" in value:
        return None
    path = Path(value)
    return path if path.is_absolute() else None


def _object_path(value: Any) -> Any:
    """An object-storage location as the DAG records it (`s3://conn_id@bucket/key`, see include/.../storage.py),
    read through Airflow's ObjectStoragePath with that connection; None for anything else."""
    if not isinstance(value, str) or "://" not in value or value.startswith("file://") or "\x00" in value:
        return None
    from include.cosmos_upsample.storage import path_from

    try:
        return path_from(value)
    except Exception as exc:  # an unknown scheme or a provider that is not installed
        log.warning("Cannot open %r: %s", value, exc)
        return None


def report_file(value: Any) -> Path | None:
    """`<output_dir>/reports/<name>.json`, the only shape of report path the plugin will read (local or object
    storage)."""
    path = _local_path(value) or _object_path(value)
    if path is None or path.suffix != ".json" or path.parent.name != "reports":
        return None
    return path


def load_report(path: Path) -> dict[str, Any] | None:
    """The parsed report, or None when it is missing, unreadable or not a report."""
    try:
        data = _REPORTS.load(path)
    except (OSError, ValueError) as exc:
        log.warning("Cannot read report %s: %s", path, exc)
        return None
    if not isinstance(data, dict) or not isinstance(data.get("items", []), list):
        log.warning("%s is not a run report", path)
        return None
    return data


def output_dir_of(report_path: Path) -> Path:
    return report_path.parent.parent


def item_output_file(report: dict[str, Any], report_path: Path, spec_id: str) -> Path | None:
    """The output spec the report names for `spec_id`, if it is a JSON file inside the report's output dir."""
    root = output_dir_of(report_path).resolve()
    remote = "://" in str(report_path)
    for item in report.get("items") or []:
        if not isinstance(item, dict) or item.get("spec_id") != spec_id:
            continue
        path = _object_path(item.get("output_path")) if remote else _local_path(item.get("output_path"))
        if path is None or path.suffix != ".json":
            return None
        resolved = path.resolve()
        if remote and (type(resolved) is not type(root) or resolved.protocol != root.protocol
                       or getattr(resolved, "conn_id", None) != getattr(root, "conn_id", None)):
            return None
        if not resolved.is_relative_to(root) or not resolved.is_file():
            return None
        if resolved.stat().st_size > MAX_SPEC_BYTES:
            return None
        return resolved
    return None


# --- progress of a run without a report -----------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """How far the model jobs of a run are: items finished (ok or failed) out of the items planned for the GPU."""

    planned: bool
    total: int = 0
    done: int = 0
    failed: int = 0
    jobs: int = 0
    first_finished_at: float | None = None
    last_finished_at: float | None = None

    @property
    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total else 0.0

    def eta_seconds(self, now: float) -> float | None:
        """Remaining items at the rate seen so far (first to last finished item); None until there is a rate."""
        if not self.total or self.done >= self.total:
            return 0.0 if self.total else None
        if self.done < 2 or self.first_finished_at is None or self.last_finished_at is None:
            return None
        span = self.last_finished_at - self.first_finished_at
        if span <= 0:
            return None
        rate = (self.done - 1) / span
        since_last = max(now - self.last_finished_at, 0.0)
        return max((self.total - self.done) / rate - since_last, 0.0)

    def as_dict(self, now: float) -> dict[str, Any]:
        return {
            "planned": self.planned,
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "jobs": self.jobs,
            "eta_seconds": self.eta_seconds(now),
        }


def _ledger_entries(path: Path) -> Iterator[dict[str, Any]]:
    try:
        handle = path.open(encoding="utf-8")
    except OSError:
        return
    with handle:
        for line in handle:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # the worker may be half-way through writing the last line
            if isinstance(entry, dict):
                yield entry


def read_progress(run_dir: Path) -> Progress:
    """Done/total from `plan.json` and the jobs' `ledger.jsonl` (the last entry per item counts)."""
    plan_path = run_dir / "plan.json"
    try:
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return Progress(planned=False)
    jobs = [job for job in (plan.get("jobs") or []) if isinstance(job, dict)] if isinstance(plan, dict) else []
    total = done = failed = 0
    finished: list[float] = []
    for job in jobs:
        items = job.get("items")
        total += items if isinstance(items, int) and items > 0 else 0
        job_dir = _local_path(job.get("job_dir"))
        if job_dir is None or job_dir.parent.name != "jobs":
            continue
        last: dict[str, dict[str, Any]] = {}
        for index, entry in enumerate(_ledger_entries(job_dir / "ledger.jsonl")):
            key = entry.get("key") or entry.get("spec_id") or f"line-{index}"
            if last.get(str(key), {}).get("status") != "ok":
                last[str(key)] = entry
        done += len(last)
        failed += sum(1 for entry in last.values() if entry.get("status") == "failed")
        finished += [float(e["finished_at"]) for e in last.values() if isinstance(e.get("finished_at"), int | float)]
    return Progress(
        planned=True,
        total=total,
        done=min(done, total) if total else done,
        failed=failed,
        jobs=len(jobs),
        first_finished_at=min(finished) if finished else None,
        last_finished_at=max(finished) if finished else None,
    )


def run_dir_path(value: Any) -> Path | None:
    """`<output_dir>/runs/<run>`, the only shape of run dir the plugin will read."""
    path = _local_path(value)
    return path if path is not None and path.parent.name == "runs" else None


# --- the run index --------------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """One run as the UI shows it; `state` is the DagRun's when the DB knows the run, else the report's."""

    run_id: str
    dag_id: str = DAG_ID
    state: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    report_path: Path | None = None
    run_dir: Path | None = None


def parse_time(value: Any) -> datetime | None:
    """ISO-8601 strings or epoch seconds, as reports may carry either; naive times are taken as UTC."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        moment = datetime.fromtimestamp(value, tz=UTC)
    elif isinstance(value, str) and value:
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    else:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class DatabaseRuns:
    """DagRuns of the DAG with their `report` return value and `discover` run_dir XComs, from the metadata DB."""

    def __init__(self, session_factory: Callable[[], AbstractContextManager[Any]] | None = None) -> None:
        self._session_factory = session_factory

    def _session(self) -> AbstractContextManager[Any]:
        if self._session_factory is not None:
            return self._session_factory()
        from airflow.utils.session import create_session

        return create_session()

    def runs(self, limit: int) -> list[RunRecord]:
        from airflow.models.dagrun import DagRun
        from sqlalchemy import select

        query = (
            select(DagRun.run_id, DagRun.state, DagRun.start_date, DagRun.end_date, DagRun.run_after)
            .where(DagRun.dag_id == DAG_ID)
            .order_by(DagRun.run_after.desc(), DagRun.id.desc())
            .limit(limit)
        )
        with self._session() as session:
            rows = session.execute(query).all()
            records = [self._record(row) for row in rows]
            self._attach_xcoms(session, records)
        return records

    def run(self, run_id: str) -> RunRecord | None:
        from airflow.models.dagrun import DagRun
        from sqlalchemy import select

        query = select(DagRun.run_id, DagRun.state, DagRun.start_date, DagRun.end_date, DagRun.run_after).where(
            DagRun.dag_id == DAG_ID, DagRun.run_id == run_id
        )
        with self._session() as session:
            row = session.execute(query).first()
            if row is None:
                return None
            record = self._record(row)
            self._attach_xcoms(session, [record])
        return record

    @staticmethod
    def _record(row: Any) -> RunRecord:
        state = getattr(row.state, "value", row.state)
        return RunRecord(
            run_id=row.run_id,
            state=str(state) if state else None,
            started_at=parse_time(row.start_date or row.run_after),
            finished_at=parse_time(row.end_date),
        )

    @staticmethod
    def _attach_xcoms(session: Any, records: list[RunRecord]) -> None:
        from airflow.models.xcom import XComModel
        from sqlalchemy import and_, or_, select

        by_run = {record.run_id: record for record in records}
        if not by_run:
            return
        query = select(XComModel.run_id, XComModel.task_id, XComModel.key, XComModel.value).where(
            XComModel.dag_id == DAG_ID,
            XComModel.run_id.in_(list(by_run)),
            XComModel.map_index == -1,
            or_(
                and_(XComModel.task_id == REPORT_TASK_ID, XComModel.key == REPORT_XCOM_KEY),
                and_(XComModel.task_id == DISCOVER_TASK_ID, XComModel.key == RUN_DIR_XCOM_KEY),
            ),
        )
        for row in session.execute(query):
            value = XComModel.deserialize_value(row)
            record = by_run[row.run_id]
            if row.task_id == REPORT_TASK_ID and isinstance(value, dict):
                record.report_path = report_file(value.get("report_json"))
            elif row.task_id == DISCOVER_TASK_ID:
                record.run_dir = run_dir_path(value)


def configured_output_dirs(environ: dict[str, str] | None = None) -> list[Path]:
    """The deployment's default output dir: Variable `cosmos_upsample_output_dir`, env, then `<root>/outputs`."""
    environ = dict(os.environ) if environ is None else environ
    found: list[Path] = []
    try:
        from airflow.models.variable import Variable

        value = Variable.get(OUTPUT_DIR_VARIABLE, default_var=None)
    except Exception as exc:  # a missing DB or secrets backend must not hide the reports on disk
        log.debug("Variable %s unavailable: %s", OUTPUT_DIR_VARIABLE, exc)
        value = None
    for candidate in (value, environ.get(OUTPUT_DIR_ENV), str(DEFAULT_OUTPUT_DIR)):
        path = _local_path(candidate)
        if path is not None and path not in found:
            found.append(path)
    return found


class DirectoryRuns:
    """Reports found by scanning `<output_dir>/reports/*.json`; run ids are matched by the report's content."""

    def __init__(self, output_dirs: Callable[[], Iterable[Path]]) -> None:
        self._output_dirs = output_dirs

    def _reports(
        self, extra_dirs: Iterable[Path] = (), likely_stem: str | None = None
    ) -> Iterator[tuple[Path, dict[str, Any]]]:
        seen: set[Path] = set()
        for output_dir in [*self._output_dirs(), *extra_dirs]:
            reports_dir = output_dir / "reports"
            if "://" in str(reports_dir):  # object storage: list afresh, not from fsspec's per-process cache
                reports_dir.fs.invalidate_cache(reports_dir.path)
            if reports_dir in seen or not reports_dir.is_dir():
                continue
            seen.add(reports_dir)
            # The file named after the run is read first; the others only if it does not hold that run.
            for path in sorted(reports_dir.glob("*.json"), key=lambda p: (p.stem != likely_stem, p.name)):
                report = load_report(path)
                if report is not None and report.get("dag_id", DAG_ID) == DAG_ID and report.get("run_id"):
                    yield path, report

    def runs(self, limit: int, extra_dirs: Iterable[Path] = ()) -> list[RunRecord]:
        records = [self._record(path, report) for path, report in self._reports(extra_dirs)]
        return records[:limit] if len(records) > limit else records

    def run(self, run_id: str, extra_dirs: Iterable[Path] = ()) -> RunRecord | None:
        for path, report in self._reports(extra_dirs, likely_stem=_file_stem(run_id)):
            if report.get("run_id") == run_id:
                return self._record(path, report)
        return None

    @staticmethod
    def _record(path: Path, report: dict[str, Any]) -> RunRecord:
        return RunRecord(
            run_id=str(report["run_id"]),
            state=report.get("state"),
            started_at=parse_time(report.get("started_at")),
            finished_at=parse_time(report.get("finished_at")),
            report_path=path,
        )


class RunIndex:
    """The DB first (it knows every output dir), then the directory scan; either may be absent or failing."""

    def __init__(self, database: DatabaseRuns | None, directories: DirectoryRuns | None) -> None:
        self._database = database
        self._directories = directories

    @classmethod
    def default(cls) -> RunIndex:
        return cls(DatabaseRuns(), DirectoryRuns(configured_output_dirs))

    def runs(self, limit: int = 200) -> list[RunRecord]:
        records: list[RunRecord] = []
        if self._database is not None:
            try:
                records = self._database.runs(limit)
            except Exception:  # the page still lists the reports on disk when the DB is unreachable
                log.exception("Reading runs of %s from the metadata DB failed", DAG_ID)
        known = {record.run_id for record in records}
        if self._directories is not None:
            seen_dirs = {output_dir_of(r.report_path) for r in records if r.report_path is not None}
            for record in self._directories.runs(limit, extra_dirs=seen_dirs):
                if record.run_id not in known:
                    known.add(record.run_id)
                    records.append(record)
        records.sort(key=_newest_first)
        return records[:limit]

    def run(self, run_id: str) -> RunRecord:
        record: RunRecord | None = None
        if self._database is not None:
            try:
                record = self._database.run(run_id)
            except Exception:
                log.exception("Reading run %s of %s from the metadata DB failed", run_id, DAG_ID)
        if record is not None and record.report_path is not None and record.report_path.is_file():
            return record
        if self._directories is not None:
            scanned = self._directories.run(run_id)
            if scanned is not None:
                if record is None:
                    return scanned
                record.report_path = scanned.report_path
                return record
        if record is None:
            raise ReportNotFound(run_id)
        return record


def _file_stem(run_id: str) -> str:
    """The report file name the DAG gives a run id (`layout.safe_name`); only used to order a scan."""
    return re.sub(r"[^A-Za-z0-9._+=:@-]", "_", run_id).lstrip(".") or "_"


def _newest_first(record: RunRecord) -> tuple[float, str]:
    started = record.started_at.timestamp() if record.started_at else 0.0
    return (-started, record.run_id)


# --- what the pages show --------------------------------------------------------------------------------------


def duration_seconds(record: RunRecord, report: dict[str, Any] | None) -> float | None:
    start = parse_time(report.get("started_at")) if report else None
    end = parse_time(report.get("finished_at")) if report else None
    start, end = start or record.started_at, end or record.finished_at
    if start is None:
        return None
    if end is None:
        end = datetime.now(UTC) if record.state in {"running", "queued"} else None
    return max((end - start).total_seconds(), 0.0) if end else None


def counts_of(report: dict[str, Any] | None) -> dict[str, int]:
    counts = (report or {}).get("counts") or {}
    return {key: int(counts[key]) for key in COUNT_KEYS if isinstance(counts.get(key), int)}


def model_of(report: dict[str, Any] | None) -> str | None:
    if not report:
        return None
    params = report.get("params") if isinstance(report.get("params"), dict) else {}
    model = report.get("model") or params.get("model")
    return str(model) if model else None


def summary(record: RunRecord, report: dict[str, Any] | None, now: float | None = None) -> dict[str, Any]:
    """One row of the run list (HTML and `/api/runs`)."""
    now = time.time() if now is None else now
    progress = None
    if report is None and record.run_dir is not None:
        progress = read_progress(record.run_dir).as_dict(now)
    # The report's own times when there is one (they match its stage times), else the DagRun's.
    started = (parse_time(report.get("started_at")) if report else None) or record.started_at
    finished = (parse_time(report.get("finished_at")) if report else None) or record.finished_at
    return {
        "run_id": record.run_id,
        "dag_id": record.dag_id,
        "state": record.state or (report or {}).get("state"),
        "started_at": started.isoformat() if started else None,
        "finished_at": finished.isoformat() if finished else None,
        "duration_seconds": duration_seconds(record, report),
        "counts": counts_of(report),
        "model": model_of(report),
        "backend": (report or {}).get("backend"),
        "has_report": report is not None,
        "progress": progress,
    }


def filter_items(items: list[Any], status: str | None) -> list[dict[str, Any]]:
    rows = [item for item in items if isinstance(item, dict)]
    return [item for item in rows if item.get("status") == status] if status else rows
