"""Reports on disk: reading a report file into the typed `RunReport`, and finding reports in
`<output_dir>/reports/*.json` (the deployment's default output dir and every output dir seen in the DB) through their
summaries, so reports whose DB rows are gone still show. A report names output specs; only those inside its own
output dir are served."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from include.cosmos_upsample.layout import REPORTS, OutputLayout
from include.cosmos_upsample.report_model import RunReport
from include.cosmos_upsample.settings import DEFAULT_OUTPUT_DIR, ENV_PREFIX, VARIABLE_PREFIX
from include.cosmos_upsample.storage import is_remote, is_url, path_from
from upsample_reports.records import RunRecord, local_path, parse_time
from upsample_reports.summaries import ListedRun, ReportSummaries, stamp_of

log = logging.getLogger(__name__)

OUTPUT_DIR_VARIABLE = VARIABLE_PREFIX + "output_dir"
OUTPUT_DIR_ENV = ENV_PREFIX + "OUTPUT_DIR"
MAX_REPORT_BYTES = 256 * 1024 * 1024
MAX_SPEC_BYTES = 16 * 1024 * 1024


class _ReportCache:
    """Reports keyed by (path, mtime, size): a run page re-reads its report only after the DAG rewrites it."""

    def __init__(self, max_entries: int = 64) -> None:
        self._entries: dict[Path, tuple[tuple[int, int], RunReport]] = {}
        self._lock = threading.Lock()
        self._max_entries = max_entries

    def load(self, path: Path) -> RunReport:
        if is_remote(path):  # fsspec caches listings per process: the api-server must see a rewritten report
            path.fs.invalidate_cache(path.path)
        stamp = stamp_of(path.stat())
        if stamp[1] > MAX_REPORT_BYTES:
            raise ValueError(f"{path} is larger than {MAX_REPORT_BYTES} bytes")
        with self._lock:
            cached = self._entries.get(path)
            if cached and cached[0] == stamp:
                return cached[1]
        report = RunReport.from_text(path.read_bytes())
        with self._lock:
            if len(self._entries) >= self._max_entries:
                self._entries.pop(next(iter(self._entries)))
            self._entries[path] = (stamp, report)
        return report


_REPORTS = _ReportCache()


def object_path(value: object) -> Path | None:
    """An object-storage location as the DAG records it (`s3://conn_id@bucket/key`, see include/.../storage.py),
    read through Airflow's ObjectStoragePath with that connection; None for anything else."""
    if not isinstance(value, str) or not is_url(value) or "\x00" in value:
        return None
    try:
        return path_from(value)
    except Exception as exc:  # an unknown scheme or a provider that is not installed
        log.warning("Cannot open %r: %s", value, exc)
        return None


def report_file(value: object) -> Path | None:
    """`<output_dir>/reports/<name>.json`, the only shape of report path the plugin will read (local or object
    storage)."""
    path = local_path(value) or object_path(value)
    if path is None or path.suffix != ".json" or path.parent.name != REPORTS:
        return None
    return path


def load_report(path: Path) -> RunReport | None:
    """The report, or None when it is missing, unreadable or not a run report."""
    try:
        return _REPORTS.load(path)
    except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        log.warning("Cannot read report %s: %s", path, exc)
        return None


def output_dir_of(report_path: Path) -> Path:
    return report_path.parent.parent


def item_output_file(report: RunReport, report_path: Path, spec_id: str) -> Path | None:
    """The output spec the report names for `spec_id`, if it is a JSON file inside the report's output dir."""
    root = output_dir_of(report_path).resolve()
    remote = is_remote(report_path)
    item = next((item for item in report.items if item.spec_id == spec_id), None)
    path = (object_path if remote else local_path)(item.output_path) if item else None
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
        path = local_path(candidate)
        if path is not None and path not in found:
            found.append(path)
    return found


class DirectoryRuns:
    """Reports found in `<output_dir>/reports/`, indexed by their summaries (summaries.py); run ids come from the
    reports' content, not from file names."""

    def __init__(self, output_dirs: Callable[[], Iterable[Path]],
                 summaries: ReportSummaries | None = None) -> None:
        self._output_dirs = output_dirs
        self.summaries = summaries or ReportSummaries(load_report)

    def listed(self, extra_dirs: Iterable[Path] = ()) -> dict[str, ListedRun]:
        """Every run with a report in the configured output dirs and `extra_dirs`, by run id (the first dir that
        holds a run wins: the configured ones come first)."""
        folders = [self.summaries.in_folder(reports_dir) for reports_dir in
                   dict.fromkeys(OutputLayout(output_dir).reports_dir for output_dir in
                                 [*self._output_dirs(), *extra_dirs])]
        folders = [runs for runs in folders if runs]
        if len(folders) == 1:
            return folders[0]  # the usual case: one output dir; the folder's (cached) index as it is
        runs: dict[str, ListedRun] = {}
        for folder in folders:
            for run_id, listed in folder.items():
                runs.setdefault(run_id, listed)
        return runs

    def run(self, run_id: str, extra_dirs: Iterable[Path] = ()) -> RunRecord | None:
        listed = self.listed(extra_dirs).get(run_id)
        return record_of(listed) if listed else None


def record_of(listed: ListedRun) -> RunRecord:
    """A run known only from its report on disk: its state and times are the report's."""
    summary = listed.summary
    return RunRecord(run_id=summary.run_id, state=summary.state, started_at=listed.started,
                     finished_at=parse_time(summary.finished_at), report_path=listed.report_path, summary=summary)
