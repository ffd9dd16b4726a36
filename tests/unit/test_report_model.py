"""The typed run report: what the report task writes, what the plugin reads, and its committed JSON Schema."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from include.cosmos_upsample.items import Hint, Item, Tokens
from include.cosmos_upsample.report import build_report, write_report
from include.cosmos_upsample.report_model import FINAL_STATUSES, RunReport, schema_text
from include.cosmos_upsample.settings import resolve_settings
from tests.conftest import ROOT

DESIGN_KEYS = {"run_id", "dag_id", "started_at", "finished_at", "params", "counts", "items", "stages"}
EXTRA_KEYS = {"resolved", "tokens_equal", "quality", "state", "backend", "model", "dry_run", "trigger"}


def item(status: str, engine: int | None = None) -> Item:
    return Item(spec_id=f"s-{status}", source_path=f"/in/{status}.json", status=status,
                tokens=Tokens(prompt=500, budget=3796, engine=engine),
                hint=Hint(width=320, height=180, frames=2, source="vis", times=[0.5, 1.5]), key="k", text="t")


def a_report(*statuses: str) -> RunReport:
    return build_report(run_id="r1", dag_id="d", started_at="2026-01-01T00:00:00+00:00",
                        finished_at="2026-01-01T00:01:00+00:00", settings=resolve_settings({}),
                        items=[item(status, engine=500) for status in statuses], stages={"validate": 1.0})


class TestRunReport:
    def test_written_keys_are_the_interface(self, tmp_path):
        from include.cosmos_upsample.layout import OutputLayout, read_json

        json_path, html_path = write_report(OutputLayout.at(tmp_path), a_report("upsampled", "invalid"))
        data = read_json(json_path)
        assert set(data) == DESIGN_KEYS | EXTRA_KEYS
        assert list(data["counts"]) == ["discovered", "upsampled", "cached", "invalid", "failed", "flagged"]
        assert data["tokens_equal"] == {"equal": 2, "compared": 2}
        first = data["items"][0]
        assert {"spec_id", "source_path", "status", "reason", "tokens", "hint", "output_path"} <= set(first)
        assert set(first["tokens"]) == {"prompt", "budget", "engine", "counted_by"}
        assert set(first["hint"]) == {"width", "height", "frames", "source", "times"}
        assert not {"key", "text", "frame_paths", "attempt_checks"} & set(first)
        assert data["quality"] == {"passed": 0, "flagged": 0, "retried": 0, "by_check": {}}
        assert "<td>2</td>" in html_path.read_text()

    def test_dry_run_counts_planned_only_when_there_are_some(self):
        assert a_report("planned").to_json()["counts"]["planned"] == 1
        assert "planned" not in a_report("upsampled").to_json()["counts"]

    def test_flagged_is_counted_in_every_report(self):
        assert a_report("flagged", "upsampled").to_json()["counts"]["flagged"] == 1
        assert a_report("upsampled").to_json()["counts"]["flagged"] == 0

    def test_reads_back_what_it_wrote(self):
        report = a_report("upsampled", "cached", "failed")
        assert RunReport.model_validate(report.to_json()).to_json() == report.to_json()

    def test_an_older_report_reads_and_keeps_only_its_own_keys(self):
        older = {"run_id": "r", "dag_id": "d", "started_at": "t0", "finished_at": "t1", "params": {"model": "m"},
                 "counts": {"discovered": 1, "upsampled": 1, "cached": 0, "invalid": 0, "failed": 0},
                 "items": [{"spec_id": "a", "source_path": "/in/a.json", "status": "upsampled", "reason": None,
                            "tokens": {"prompt": 5, "budget": 9}, "hint": {"width": 2, "height": 2, "frames": 1},
                            "output_path": "/out/specs/a.json", "added_later": 1}],
                 "stages": {"merge": 1}}
        report = RunReport.model_validate(older)
        assert report.state is None and report.items[0].hint.times == [] and report.counts.flagged == 0
        assert report.to_json() == older

    def test_a_valid_item_is_never_final(self):
        with pytest.raises(ValidationError):
            item("valid").report_item()

    def test_statuses_are_stated_once(self):
        from include.cosmos_upsample.items import Status

        assert FINAL_STATUSES == ("upsampled", "cached", "invalid", "failed", "planned", "flagged")
        assert Item.model_fields["status"].annotation == Status


class TestSchema:
    def test_committed_schema_is_the_generated_one(self):
        committed = (ROOT / "docs" / "report.schema.json").read_text(encoding="utf-8")
        regenerate = "python -m include.cosmos_upsample.report_model > docs/report.schema.json"
        assert committed == schema_text(), f"docs/report.schema.json is stale; regenerate it: {regenerate}"

    def test_schema_names_the_design_keys(self):
        schema = json.loads(schema_text())
        assert DESIGN_KEYS <= set(schema["required"])
        assert set(schema["properties"]) == DESIGN_KEYS | EXTRA_KEYS
        assert schema["$defs"]["ReportItem"]["properties"]["status"]["enum"] == list(FINAL_STATUSES)
        assert set(schema["$defs"]["ItemQuality"]["properties"]) == {"verdict", "failed_checks", "attempts", "words",
                                                                     "finish_reason", "cleaned"}
        assert set(schema["$defs"]["RunQuality"]["properties"]) == {"passed", "flagged", "retried", "by_check"}
        assert set(schema["$defs"]["Review"]["properties"]) == {"action", "by", "at"}
