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
    "max_num_seqs", "enable_prefix_caching", "quantization", "endpoint_conn_id", "endpoint_concurrency",
    "prompt_template", "response_schema", "quality", "quality_retries", "review", "max_flagged_ratio", "retry_flagged",
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
            "discover", "validate", "batch", "upsample", "upsample_endpoint", "review_requests", "review",
            "merge_metadata", "report",
            "prune_scratch"]
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

    def test_each_chunk_runs_validate_batch_upsample_on_its_own(self, dag):
        """One mapped task group per chunk: a chunk's upsample waits for its own validation, not for every chunk's,
        so GPU jobs start while later chunks are still validated."""
        group = dag.get_task("validate").get_closest_mapped_task_group()
        assert group is not None and group.group_id == "chunk"
        for task_id in ("validate", "batch", "upsample", "upsample_endpoint"):
            task = dag.get_task(task_id)
            assert task.get_closest_mapped_task_group() is group, task_id
            assert task.map_index_template, task_id
        assert dag.get_task("batch").upstream_task_ids == {"discover", "validate"}
        assert dag.get_task("upsample").upstream_task_ids == {"discover", "batch"}
        assert dag.get_task("upsample_endpoint").upstream_task_ids == {"discover", "batch"}
        assert dag.get_task("review_requests").upstream_task_ids == {"discover", "upsample", "upsample_endpoint"}
        assert dag.get_task("merge_metadata").upstream_task_ids == {"discover", "review"}

    def test_model_jobs_and_service_requests_run_in_pools_of_their_own(self, dag):
        """Airflow fixes a task's pool at parse time, so runner endpoint has a task of its own: no GPU slot held
        while requests go to an inference service."""
        assert dag.get_task("upsample").pool == "cosmos_gpu"
        assert dag.get_task("upsample_endpoint").pool == "cosmos_endpoint"

    def test_later_stages_of_a_chunk_go_first_when_workers_are_scarce(self, dag):
        # weight_rule "upstream": the scheduler weighs a task instance by its upstream tasks, so a chunk's batch and
        # upsample outrank the validate tasks of chunks not started yet.
        assert {str(getattr(task.weight_rule, "value", task.weight_rule)) for task in dag.tasks} == {"upstream"}
        upstream = {task.task_id: len(task.get_flat_relative_ids(upstream=True)) for task in dag.tasks}
        assert upstream["upsample"] > upstream["batch"] > upstream["validate"] > upstream["discover"], upstream

    def test_pruning_is_a_teardown_after_the_report(self, dag):
        """It runs whatever became of the work, and a failed report still fails the run (teardowns do not count)."""
        prune = dag.get_task("prune_scratch")
        assert prune.is_teardown and prune.upstream_task_ids == {"discover", "report"}
        assert not prune.downstream_task_ids
    def test_review_is_a_human_in_the_loop_task_per_flagged_answer(self, dag):
        """Airflow's HITLOperator mapped over the review requests (none: skipped), before merge; a timeout takes
        Reject, so the answer stays flagged."""
        from airflow.providers.standard.operators.hitl import HITLOperator

        review = dag.get_task("review")
        assert issubclass(review.operator_class, HITLOperator)
        assert review.operator_class.template_fields == ()  # spec and model text are never rendered as Jinja
        assert review.partial_kwargs["options"] == ["Approve", "Reject"]
        assert review.partial_kwargs["defaults"] == ["Reject"]
        assert review.upstream_task_ids == {"review_requests"}
        assert dag.get_task("review_requests").trigger_rule == "all_done"
        assert dag.get_task("merge_metadata").trigger_rule == "all_done"

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
