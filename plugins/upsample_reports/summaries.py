"""The runs on disk, indexed: each `reports/` folder's runs by id with their summaries (the report task writes one
beside each report, include/cosmos_upsample/run_summary.py), kept in memory between requests and read again only
where something changed. The run list then costs the same with a thousand reports as with ten.

- A summary is read once per (mtime, size) of the report and of its summary file. A report without a summary (it
  was written before summaries existed) or with an older one is read once and summarised in memory.
- A local folder's listing is kept while the modification times of `reports/` and `reports/summaries/` stay the
  same: the report task writes by renaming files into them, which changes those times. A listing made within
  RACY_SECONDS of such a change is not kept (a second change in the same clock tick would go unseen, as git's
  "racy" index entries). Object storage has no folder times: its listing is asked for on every request (one
  request per folder), its summaries only read when an object changed.
"""

from __future__ import annotations

import logging
import stat as stat_module
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from include.cosmos_upsample.layout import safe_name
from include.cosmos_upsample.report_model import RunReport
from include.cosmos_upsample.run_summary import SUMMARIES_DIR, RunSummary, summary_path
from include.cosmos_upsample.settings import DAG_ID
from include.cosmos_upsample.storage import is_remote
from upsample_reports.records import parse_time

log = logging.getLogger(__name__)

RACY_SECONDS = 2.0
MAX_SUMMARY_BYTES = 1024 * 1024
Stamp = tuple[int, int]  # (mtime in ns, size)


@dataclass(frozen=True)
class ListedRun:
    report_path: Path
    summary: RunSummary
    started: datetime | None  # the summary's started_at, parsed once

    @classmethod
    def of(cls, report_path: Path, summary: RunSummary) -> ListedRun:
        return cls(report_path, summary, parse_time(summary.started_at))


def stamp_of(stat: Any) -> Stamp:
    # Object storage (ObjectStoragePath.stat) has no st_mtime_ns; its st_mtime is the object's LastModified.
    return (getattr(stat, "st_mtime_ns", None) or int(stat.st_mtime * 1e9), stat.st_size)


def json_files(folder: Any) -> dict[str, Stamp]:
    """The `*.json` files directly in `folder` (not hidden) with their stamps; {} for a missing folder."""
    found: dict[str, Stamp] = {}
    try:
        if is_remote(folder):  # fsspec keeps listings per process: the api-server must see new reports
            folder.fs.invalidate_cache(folder.path)
        for child in folder.iterdir():
            if child.name.endswith(".json") and not child.name.startswith("."):
                info = child.stat()
                if is_remote(child) or stat_module.S_ISREG(info.st_mode):
                    found[child.name] = stamp_of(info)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return found


def _folder_stamp(reports_dir: Path) -> tuple[int, int] | None:
    """The times of `reports/` and `reports/summaries/` if a listing made now may be kept; None if it may not."""
    if is_remote(reports_dir):
        return None
    now = time.time_ns()
    try:
        stamps = (reports_dir.stat().st_mtime_ns, _mtime_ns(reports_dir / SUMMARIES_DIR))
    except OSError:
        return None
    return stamps if now - max(stamps) > RACY_SECONDS * 1e9 else None


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


class ReportSummaries:
    """Summaries of report files and listings of report folders, cached as the module docstring says."""

    def __init__(self, load_report: Callable[[Path], RunReport | None]) -> None:
        self._load_report = load_report
        self._summaries: dict[Path, tuple[Stamp, Stamp | None, RunSummary | None]] = {}
        self._folders: dict[Path, tuple[tuple[int, int], dict[str, ListedRun]]] = {}
        self._lock = threading.Lock()

    def in_folder(self, reports_dir: Path) -> dict[str, ListedRun]:
        """The runs of DAG_ID whose reports are in `reports_dir`, by run id."""
        stamp = _folder_stamp(reports_dir)
        with self._lock:
            cached = self._folders.get(reports_dir)
        if stamp is not None and cached is not None and cached[0] == stamp:
            return cached[1]
        reports, summaries = json_files(reports_dir), json_files(reports_dir / SUMMARIES_DIR)
        runs: dict[str, ListedRun] = {}
        for name, report_stamp in sorted(reports.items()):
            path = reports_dir / name
            summary = self._summary(path, report_stamp, summaries.get(name))
            if summary is None or summary.dag_id != DAG_ID or not summary.run_id:
                continue
            # Two files may hold one run id (a copied report): the one named after the run wins, as before.
            if summary.run_id not in runs or path.stem == safe_name(summary.run_id):
                runs[summary.run_id] = ListedRun.of(path, summary)
        with self._lock:
            self._forget_missing(reports_dir, {reports_dir / name for name in reports})
            if stamp is not None:
                self._folders[reports_dir] = (stamp, runs)
        return runs

    def of(self, report_path: Path) -> RunSummary | None:
        """The summary of one report file (a run the metadata DB names), or None when it cannot be read."""
        try:
            if is_remote(report_path):
                report_path.fs.invalidate_cache(report_path.path)
            report_stamp = stamp_of(report_path.stat())
        except OSError:
            return None
        try:
            summary_stamp = stamp_of(summary_path(report_path).stat())
        except OSError:
            summary_stamp = None
        return self._summary(report_path, report_stamp, summary_stamp)

    def _summary(self, path: Path, report_stamp: Stamp, summary_stamp: Stamp | None) -> RunSummary | None:
        with self._lock:
            cached = self._summaries.get(path)
        if cached is not None and cached[:2] == (report_stamp, summary_stamp):
            return cached[2]
        summary = None
        # A summary at least as new as its report describes it (the report task writes the report first).
        if summary_stamp is not None and summary_stamp[0] >= report_stamp[0] and summary_stamp[1] <= MAX_SUMMARY_BYTES:
            summary = self._read_summary(summary_path(path))
        if summary is None:
            report = self._load_report(path)
            summary = RunSummary.of(report) if report is not None else None
        with self._lock:
            self._summaries[path] = (report_stamp, summary_stamp, summary)
        return summary

    @staticmethod
    def _read_summary(path: Path) -> RunSummary | None:
        try:
            return RunSummary.from_text(path.read_bytes())
        except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            log.warning("Cannot read run summary %s (%s); reading its report instead", path, exc)
            return None

    def _forget_missing(self, reports_dir: Path, present: set[Path]) -> None:
        """Drop cached summaries of reports that left this folder (called with the lock held)."""
        for path in [path for path in self._summaries if path.parent == reports_dir and path not in present]:
            del self._summaries[path]
