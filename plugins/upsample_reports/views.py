"""What the pages and the JSON API show, built from a `RunRecord` and its typed `RunReport` (None: no report yet)."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import Any

from include.cosmos_upsample.report_model import FINAL_STATUSES, ReportItem, RunReport
from include.cosmos_upsample.run_summary import RunSummary
from upsample_reports import charts
from upsample_reports.progress import read_progress
from upsample_reports.records import RunRecord, parse_time
from upsample_reports.reports import RunIndex

PAGE_SIZE = 200
RUNS_PER_PAGE = 50
MAX_RUNS_PER_PAGE = 500
# A page of a run that is still going re-loads itself; no JS needed.
REFRESH_SECONDS = 30
COUNT_KEYS = ("discovered", *FINAL_STATUSES)
LIVE_STATES = {"running", "queued"}


def duration_seconds(record: RunRecord, report: RunSummary | None) -> float | None:
    start = parse_time(report.started_at) if report else None
    end = parse_time(report.finished_at) if report else None
    start, end = start or record.started_at, end or record.finished_at
    if start is None:
        return None
    if end is None:
        end = datetime.now(UTC) if record.state in LIVE_STATES else None
    return max((end - start).total_seconds(), 0.0) if end else None


def counts_of(report: RunSummary | None) -> dict[str, int]:
    counts = report.counts if report else {}
    return {key: counts[key] for key in COUNT_KEYS if counts.get(key) is not None}


def summary(record: RunRecord, report: RunSummary | None, now: float | None = None) -> dict[str, Any]:
    """One row of the run list (HTML and `/api/runs`), from the run's report summary (None: no report yet)."""
    now = time.time() if now is None else now
    progress = None
    if report is None and record.run_dir is not None:
        progress = read_progress(record.run_dir).as_dict(now)
    # The report's own times when there is one (they match its stage times), else the DagRun's.
    started = (parse_time(report.started_at) if report else None) or record.started_at
    finished = (parse_time(report.finished_at) if report else None) or record.finished_at
    return {
        "run_id": record.run_id,
        "dag_id": record.dag_id,
        "state": record.state or (report.state if report else None),
        "started_at": started.isoformat() if started else None,
        "finished_at": finished.isoformat() if finished else None,
        "duration_seconds": duration_seconds(record, report),
        "counts": counts_of(report),
        "model": report.model if report else None,
        "backend": report.backend if report else None,
        "has_report": report is not None,
        "progress": progress,
        "trigger": report.trigger.model_dump() if report and report.trigger else None,  # what started the run
    }


def filter_items(items: list[ReportItem], status: str | None) -> list[ReportItem]:
    return [item for item in items if item.status == status] if status else list(items)


def summaries(index: RunIndex, page: int = 1, per_page: int = RUNS_PER_PAGE) -> dict[str, Any]:
    """One page of the run list, newest first, and where it is among the pages."""
    listing = index.page(page, per_page)
    now = time.time()
    return {"runs": [summary(record, record.summary, now) for record in listing.records], "page": listing.number,
            "pages": listing.pages, "per_page": per_page, "total": listing.total}


def run_context(record: RunRecord, report: RunReport | None, status: str | None, page: int) -> dict[str, Any]:
    """The run page: progress while there is no report, else counts, charts and one page of items."""
    now = time.time()
    run = summary(record, RunSummary.of(report) if report else None, now)
    context: dict[str, Any] = {
        "run": run, "record": record, "report": report, "statuses": FINAL_STATUSES, "count_keys": COUNT_KEYS,
    }
    if report is None:
        progress = read_progress(record.run_dir) if record.run_dir else None
        context["progress"] = progress
        context["eta"] = progress.eta_seconds(now) if progress and record.state in LIVE_STATES else None
        context["refresh"] = REFRESH_SECONDS if record.state in LIVE_STATES else None
        return context
    items = filter_items(report.items, status)
    pages = max(math.ceil(len(items) / PAGE_SIZE), 1)
    page = min(page, pages)
    context.update(
        status=status,
        page=page,
        pages=pages,
        total_items=len(items),
        first_index=(page - 1) * PAGE_SIZE,
        items=items[(page - 1) * PAGE_SIZE : page * PAGE_SIZE],
        counts=run["counts"],
        stages=report.stages,
        token_chart=charts.token_chart(report.items),
        status_chart=charts.status_chart(run["counts"], FINAL_STATUSES),
        stage_chart=charts.stage_chart(report.stages),
        params=report.params,
        resolved=report.resolved.model_dump(mode="json") if report.resolved else {},
        tokens_equal=report.tokens_equal,
    )
    return context
