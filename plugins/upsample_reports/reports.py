"""Find run reports and in-progress runs of `cosmos_prompt_upsample`: the DB first (it knows every output dir), then a
scan of output dirs on disk.

The finders live by concern: `db_runs` (metadata DB), `disk_runs` (report files, typed as `RunReport`), `progress`
(ledgers of runs without a report), `views` (what the pages show). Everything here is blocking I/O; the app calls it
from sync routes, which FastAPI runs in a threadpool.
"""

from __future__ import annotations

import logging

from include.cosmos_upsample.settings import DAG_ID
from upsample_reports.db_runs import DatabaseRuns
from upsample_reports.disk_runs import (
    DirectoryRuns,
    configured_output_dirs,
    item_output_file,
    load_report,
    output_dir_of,
    report_file,
)
from upsample_reports.progress import Progress, read_progress, run_dir_path
from upsample_reports.records import ReportNotFound, RunRecord, parse_time

__all__ = [
    "DAG_ID", "DatabaseRuns", "DirectoryRuns", "Progress", "ReportNotFound", "RunIndex", "RunRecord",
    "configured_output_dirs", "item_output_file", "load_report", "parse_time", "read_progress", "report_file",
    "run_dir_path",
]

log = logging.getLogger(__name__)


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


def _newest_first(record: RunRecord) -> tuple[float, str]:
    started = record.started_at.timestamp() if record.started_at else 0.0
    return (-started, record.run_id)
