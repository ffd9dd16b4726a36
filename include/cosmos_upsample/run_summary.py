"""A run's summary: the few fields of its report that a list of runs shows, written by the report task beside the
report (`reports/summaries/<name>.json`), so the UI lists a thousand runs by reading a thousand small files once,
never a thousand reports of thousands of items each.

The summaries sit in a folder of their own, not as `reports/<name>.summary.json`: that name is also the report of a
run whose id ends in `.summary`, and `reports/*.json` is the report files' pattern. No report is named `summaries`
(report files end in `.json` or `.html`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from include.cosmos_upsample.report_model import RunReport

SUMMARIES_DIR = "summaries"


class StartedBy(BaseModel):
    """What started the run, as the run list shows it: the report's `trigger` without its object list."""

    kind: str
    label: str
    objects: int  # how many spec objects the bucket events announced (0 for other kinds)


class RunSummary(BaseModel):
    """What the run list shows of a report; `counts` are the report's own (whatever statuses it has)."""

    model_config = ConfigDict(extra="allow")

    run_id: str
    dag_id: str
    started_at: str | None = None
    finished_at: str | None = None
    state: str | None = None
    counts: dict[str, int]
    model: str | None = None
    backend: str | None = None
    dry_run: bool | None = None
    trigger: StartedBy | None = None  # reports before issue 21 (and summaries written from them): none

    @classmethod
    def of(cls, report: RunReport) -> RunSummary:
        model = report.model or report.params.get("model")  # reports before `model` was a key kept it in params
        started_by = None
        if trigger := report.trigger:
            started_by = StartedBy(kind=trigger.kind, label=trigger.label, objects=len(trigger.objects))
        return cls(run_id=report.run_id, dag_id=report.dag_id, started_at=report.started_at,
                   finished_at=report.finished_at, state=report.state, counts=report.counts.as_dict(),
                   model=str(model) if model else None, backend=report.backend, dry_run=report.dry_run,
                   trigger=started_by)

    @classmethod
    def from_text(cls, text: str | bytes) -> RunSummary:
        return cls.model_validate(json.loads(text))  # json.loads, as RunReport.from_text: lone surrogates


def summary_path(report_json: Any) -> Any:
    """`reports/summaries/<name>.json` for `reports/<name>.json` (a local path or an ObjectStoragePath)."""
    return report_json.parent / SUMMARIES_DIR / report_json.name


def write_summary(report_json: Path, report: RunReport) -> Path:
    """Written after the report itself, so a summary at least as new as its report describes it."""
    from include.cosmos_upsample.storage import write_json

    path = summary_path(report_json)
    write_json(path, RunSummary.of(report).model_dump(mode="json"))
    return path
