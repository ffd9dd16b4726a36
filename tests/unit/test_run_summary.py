from __future__ import annotations

import json
from pathlib import Path

from include.cosmos_upsample.items import Hint, Item, Tokens
from include.cosmos_upsample.report import build_report, write_report
from include.cosmos_upsample.report_model import RunReport, RunTrigger
from include.cosmos_upsample.run_summary import SUMMARIES_DIR, RunSummary, summary_path
from include.cosmos_upsample.settings import resolve_settings
from include.cosmos_upsample.storage import output_layout


def report(run_id: str, statuses: tuple[str, ...]) -> RunReport:
    items = [Item(spec_id=f"s{index}", source_path=f"/in/s{index}.json", status=status,
                  tokens=Tokens(prompt=500, budget=3796), hint=Hint(width=320, height=180, frames=2))
             for index, status in enumerate(statuses)]
    return build_report(run_id=run_id, dag_id="cosmos_prompt_upsample", started_at="2026-12-01T10:00:00+00:00",
                        finished_at="2026-12-01T10:05:00+00:00", settings=resolve_settings({"backend": "vllm"}),
                        items=items, stages={"validate": 1.0})


class TestRunSummary:
    def test_the_report_task_writes_a_summary_beside_the_report(self, tmp_path: Path):
        json_path, html_path = write_report(output_layout(str(tmp_path)), report("manual__1", ("upsampled", "failed")))
        summary = json.loads(summary_path(json_path).read_text())
        assert summary_path(json_path) == tmp_path / "reports" / SUMMARIES_DIR / json_path.name
        assert summary == {"run_id": "manual__1", "dag_id": "cosmos_prompt_upsample",
                           "started_at": "2026-12-01T10:00:00+00:00", "finished_at": "2026-12-01T10:05:00+00:00",
                           "state": "failed", "counts": {"discovered": 2, "upsampled": 1, "cached": 0, "invalid": 0,
                                                        "failed": 1, "flagged": 0},
                           "model": "nvidia/Cosmos-UpsamplePrompt1-12B-Transfer", "backend": "vllm", "dry_run": False,
                           "trigger": None}  # `airflow dags test`-style reports name no trigger
        # Written after the report: a summary at least as new as its report describes it.
        assert summary_path(json_path).stat().st_mtime_ns >= json_path.stat().st_mtime_ns
        # Only reports match the report files' pattern.
        assert sorted(p.name for p in (tmp_path / "reports").glob("*.json")) == [json_path.name]
        assert html_path.exists()

    def test_the_summary_says_what_started_the_run_without_the_announced_objects(self):
        """The run list shows what started each run from the summaries alone (a bucket-event run may announce
        thousands of objects: the summary keeps their count, the report keeps the list)."""
        objects = [f"s3://specs/incoming/s{index}.json" for index in range(3)]
        started = report("asset__1", ("upsampled",)).model_copy(update={"trigger": RunTrigger(
            kind="asset_event", run_type="asset_triggered", prefix="s3://specs/incoming", objects=objects)})
        summary = RunSummary.from_text(RunSummary.of(started).model_dump_json())
        assert summary.trigger.model_dump() == {
            "kind": "asset_event", "label": "bucket event: 3 specs announced under s3://specs/incoming", "objects": 3}

    def test_a_run_id_ending_in_summary_keeps_its_own_report(self, tmp_path: Path):
        """`<name>.summary.json` beside the reports would be the report of run `<name>.summary`."""
        layout = output_layout(str(tmp_path))
        plain, _ = write_report(layout, report("run", ("upsampled",)))
        dotted, _ = write_report(layout, report("run.summary", ("failed",)))
        assert RunReport.from_text(plain.read_bytes()).run_id == "run"
        assert RunReport.from_text(dotted.read_bytes()).run_id == "run.summary"
        assert RunSummary.from_text(summary_path(plain).read_bytes()).run_id == "run"

    def test_summary_of_an_older_report_takes_the_model_from_its_params(self):
        old = RunReport.model_validate({"run_id": "r", "dag_id": "d", "started_at": None, "finished_at": None,
                                        "params": {"model": "smollm2"}, "counts": {"discovered": 0, "upsampled": 0,
                                                                                   "cached": 0, "invalid": 0,
                                                                                   "failed": 0},
                                        "items": [], "stages": {}})
        assert RunSummary.of(old).model == "smollm2"
