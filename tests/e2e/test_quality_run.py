"""The bundled samples through `airflow dags test` with the quality gate as a deployment gets it (the prompt format's
thresholds, 2 re-asks): whatever the small local model writes, every answer is judged, the report has a `quality`
block, flagged answers are in review/ and never in specs/, and flagged items do not fail the run."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from include.cosmos_upsample.settings import SAMPLE_INPUT_DIR
from tests.helpers import STRICT_QUALITY, latest_report, run_dag
from tests.reliability.invariants import model_calls

pytestmark = pytest.mark.e2e


def test_the_samples_report_a_quality_block_whatever_smollm2_writes(airflow_home, tmp_path):
    result = run_dag(airflow_home, {"output_dir": str(tmp_path), "quality": STRICT_QUALITY})
    report = latest_report(tmp_path)
    samples = len(list(SAMPLE_INPUT_DIR.glob("*.json")))
    assert report["state"] == "success" and report["counts"]["discovered"] == samples
    quality = report["quality"]
    assert set(quality) == {"passed", "flagged", "retried", "by_check"}
    assert quality["passed"] + quality["flagged"] == samples
    ledger = [json.loads(line) for path in (tmp_path / "jobs").glob("*/ledger.jsonl")
              for line in path.read_text().splitlines()]
    attempts = Counter(entry["spec_id"] for entry in ledger)
    assert model_calls(result.stdout, result.stderr) == len(ledger)
    assert sum(quality["by_check"].values()) == sum(len(entry["failed_checks"]) for entry in ledger)
    for item in report["items"]:
        judged = item["quality"]
        assert judged["attempts"] == attempts[item["spec_id"]]
        if item["status"] == "upsampled":
            assert judged["verdict"] == "pass" and judged["failed_checks"] == []
            spec = json.loads((tmp_path / "specs" / f"{item['spec_id']}.json").read_text())
            assert spec["metadata"]["upsampling"]["quality"]["verdict"] == "pass"
        else:
            assert item["status"] == "flagged" and judged["verdict"] == "flagged" and judged["failed_checks"]
            assert judged["attempts"] == 3  # 1 + quality_retries (2)
            assert not (tmp_path / "specs" / f"{item['spec_id']}.json").exists()
            review = json.loads((tmp_path / "review" / f"{item['spec_id']}.json").read_text())
            assert len(review["attempts"]) == 3 and review["failed_checks"] == judged["failed_checks"]
    html = next((tmp_path / "reports").glob("*.html")).read_text()
    assert "Answer quality:" in html
