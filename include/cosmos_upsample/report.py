"""The run report: JSON (report_model.RunReport, the interface in DESIGN.md) and a self-contained HTML page (Jinja2,
autoescaped) to open from the output folder without Airflow."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from include.cosmos_upsample.errors import NotRetryable
from include.cosmos_upsample.items import Item
from include.cosmos_upsample.layout import OutputLayout
from include.cosmos_upsample.report_model import (
    COUNT_KEYS,
    Counts,
    Resolved,
    RunQuality,
    RunReport,
    RunTrigger,
    TokensEqual,
)
from include.cosmos_upsample.settings import Settings

TEMPLATES = Path(__file__).parent / "templates"


class TooManyFailures(NotRetryable):
    """More specs failed than max_failure_ratio allows (or ended flagged, than max_flagged_ratio); the report is
    written first. A retry cannot change it."""


def count_items(items: list[Item]) -> dict[str, int]:
    by_status = Counter(item.status for item in items)
    counts = {"discovered": len(items), **{key: by_status.get(key, 0) for key in COUNT_KEYS[1:]}}
    if by_status.get("planned"):  # only in dry runs that planned items
        counts["planned"] = by_status["planned"]
    return counts


def run_quality(items: list[Item]) -> RunQuality:
    """The quality gate over the items whose answers were judged in this run (see report_model.RunQuality)."""
    judged = [item for item in items if item.quality is not None and item.status != "cached"]
    return RunQuality(passed=sum(item.quality.verdict == "pass" for item in judged),
                      flagged=sum(item.quality.verdict == "flagged" for item in judged),
                      retried=sum(item.quality.attempts > 1 for item in judged),
                      by_check=dict(sorted(Counter(check for item in items for check in item.attempt_checks).items())))


def quota_exceeded(counts: dict[str, int], settings: Settings) -> str | None:
    """Why the run fails after its report: too many failed specs, or too many flagged ones; None if neither."""
    if failure_exceeded(counts, settings.max_failure_ratio):
        return (f"{counts['failed']} of {counts['discovered']} specs failed, more than max_failure_ratio="
                f"{settings.max_failure_ratio}")
    if counts["discovered"] and counts["flagged"] / counts["discovered"] > settings.max_flagged_ratio:
        return (f"{counts['flagged']} of {counts['discovered']} specs ended flagged by the quality checks, more than "
                f"max_flagged_ratio={settings.max_flagged_ratio}")
    return None


def tokens_equal(items: list[Item]) -> dict[str, int]:
    """Items whose planned prompt count equals what the engine itself counted, out of those the engine counted."""
    compared = [item for item in items if item.tokens.engine is not None]
    return {"equal": sum(item.tokens.engine == item.tokens.prompt for item in compared), "compared": len(compared)}


def build_report(
    *, run_id: str, dag_id: str, started_at: str, finished_at: str, settings: Settings, items: list[Item],
    stages: dict[str, float], trigger: RunTrigger | None = None,
) -> RunReport:
    counts = count_items(items)
    return RunReport(
        run_id=run_id,
        dag_id=dag_id,
        started_at=started_at,
        finished_at=finished_at,
        params=settings.model_dump(mode="json"),
        resolved=Resolved(prompt_format=settings.format.name, frame_sampling=settings.frames_from,
                          sampling=settings.effective_sampling, engine=settings.engine_settings()),
        counts=Counts(**counts),
        tokens_equal=TokensEqual(**tokens_equal(items)),
        quality=run_quality(items),
        items=[item.report_item() for item in items],
        stages={name: round(seconds, 3) for name, seconds in stages.items()},
        state="failed" if quota_exceeded(counts, settings) else "success",
        backend=settings.backend,
        model=settings.model_id,
        dry_run=settings.dry_run,
        trigger=trigger,
    )


def failure_exceeded(counts: dict[str, int], max_failure_ratio: float) -> bool:
    return bool(counts["discovered"]) and counts["failed"] / counts["discovered"] > max_failure_ratio


def render_html(report: RunReport) -> str:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    return env.get_template("report.html.j2").render(report=report)


def write_report(layout: OutputLayout, report: RunReport) -> tuple[Path, Path]:
    """Both files atomically: a temp file renamed into place, or the object store's transaction; then the run's
    summary for the UI's run list (run_summary.py)."""
    from include.cosmos_upsample.run_summary import write_summary
    from include.cosmos_upsample.storage import write_json, write_text_atomic

    json_path, html_path = layout.report_paths(report.run_id)
    write_json(json_path, report.to_json())
    write_text_atomic(html_path, render_html(report))
    write_summary(json_path, report)
    return json_path, html_path
