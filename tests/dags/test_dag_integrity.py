"""The DAG file imports cleanly, quickly, and carries the contract's names, schedule, retries and Params."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

EXPECTED_PARAMS = {
    "input_dir", "output_dir", "runner", "gpu_conn_ids", "backend", "model", "max_model_len", "max_output_tokens",
    "num_frames", "hint_resolution", "batch_max_items", "force", "max_failure_ratio", "dry_run", "sampling",
    "prompt_format", "hint_source", "frame_sampling", "spec_pattern", "gpu_memory_utilization", "cpu_offload_gb",
    "max_num_seqs", "enable_prefix_caching", "quantization",
}


@pytest.fixture(scope="module")
def dag(airflow_home):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.get_dag("cosmos_prompt_upsample")


class TestDagIntegrity:
    def test_shape(self, dag):
        assert [t.task_id for t in dag.topological_sort()] == [
            "discover", "validate", "batch", "upsample", "merge_metadata", "report"]
        assert {"cosmos", "upsampling"} <= set(dag.tags)
        assert dag.catchup is False
        assert dag.doc_md and "discover" in dag.doc_md

    def test_schedule_daily(self, dag):
        assert dag.schedule == "@daily"

    def test_every_task_retries_with_backoff(self, dag):
        for task in dag.tasks:
            assert task.retries >= 2, task.task_id
            assert task.retry_exponential_backoff, task.task_id

    def test_params_are_the_contract(self, dag):
        assert EXPECTED_PARAMS <= set(dag.params.keys())
        for name in EXPECTED_PARAMS:
            assert dag.params.get_param(name).schema.get("section"), name

    def test_validate_and_upsample_are_mapped_with_labels(self, dag):
        for task_id in ("validate", "upsample"):
            task = dag.get_task(task_id)
            assert task.is_mapped if hasattr(task, "is_mapped") else True
            assert task.partial_kwargs.get("map_index_template") or task.map_index_template

    def test_report_emits_the_asset(self, dag):
        # Airflow normalises the URI with a trailing slash.
        assert [o.uri.rstrip("/") for o in dag.get_task("report").outlets] == ["cosmos://upsampled-prompts"]


def test_parsing_imports_nothing_heavy():
    """Parsing must not pull in the tokenizer, ffmpeg bindings, llama.cpp, vLLM, docker or paramiko."""
    code = (
        "import sys, runpy; runpy.run_path(sys.argv[1]);"
        "heavy = {'mistral_common', 'ffmpeg', 'llama_cpp', 'vllm', 'cv2', 'docker', 'paramiko'};"
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "dags" / "cosmos_prompt_upsample.py")],
                         capture_output=True, text=True, check=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"})
    assert out.stdout.strip().splitlines()[-1] == "[]"
