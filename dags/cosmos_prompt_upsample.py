"""
# Cosmos prompt upsampling

Turns short Cosmos `PromptSpec` prompts into long, precise video descriptions with a vision-language model that
also sees a few low-resolution frames (the *hint*) of each prompt's video.

**discover** the `*.json` specs of `input_dir` (up-to-date outputs are `cached`) and plan them into chunks, one
per model job and GPU slot -> then each chunk on its own, as soon as it can:
**validate** its specs: probe videos, size the hint to the exact token budget, extract frames ->
**batch** its valid items into the chunk's model job ->
**upsample** the job with one model load (runner `local` here, or `docker` on GPU hosts over SSH), or
**upsample_endpoint** it as requests to an inference service (runner `endpoint`; the other task skips itself);
every answer is checked (quality gate) and a flagged one asked again with a new seed ->
then, once every chunk is done:
**review** (`review: flagged` only): a person approves, edits or rejects each flagged answer in *Required Actions* ->
**merge_metadata** into `output_dir/specs/<id>.json` (flagged answers into `output_dir/review/<id>.json`) ->
**report** to `output_dir/reports/<run_id>.json|html` (also under *Upsample reports* in the UI) ->
**prune_scratch** (a teardown): run scratch older than `retention_days` leaves `work_dir` and the GPU hosts.

A Param left empty falls back to the Variable `cosmos_upsample_<name>`, then `COSMOS_UPSAMPLE_<NAME>`, then the
built-in default. Re-runs redo only what changed; a retried job resumes from its results ledger.

Scheduled `@daily`; with a bucket-event queue configured (`COSMOS_UPSAMPLE_EVENTS_*`), also as soon as specs land in
the watched prefix, each such run upsampling only the specs announced to it (README, "Upsample on arrival").
"""

from __future__ import annotations

import datetime as dt

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import Asset, Param, dag, task, task_group, teardown

from include.cosmos_upsample.batching import PlannedJob
from include.cosmos_upsample.deployment import (
    default_args,
    task_timeout,
    upsample_task_options,
    validate_task_options,
)
from include.cosmos_upsample.errors import fails_fast
from include.cosmos_upsample.events import dag_schedule, discover_task_options
from include.cosmos_upsample.review import ANSWER_PARAM, APPROVE, REJECT
from include.cosmos_upsample.settings import (
    ASSET_URI,
    DAG_ID,
    ENDPOINT_POOL,
    GPU_POOL,
    REPORT_XCOM_KEY,
    RUN_DIR_XCOM_KEY,
    param_schemas,
)
from include.cosmos_upsample.upsample_operator import UpsampleOperator, job_label

UPSAMPLED_PROMPTS = Asset(ASSET_URI)


class ReviewOperator(HITLOperator):
    """Airflow's HITLOperator with nothing rendered as a Jinja template: its subject and body carry the spec's prompt
    and the model's answer, which must reach the reviewer as they are (a `{{ ... }}` in a prompt is data, not code).
    Rendered, the HITL body showed a prompt's `{{ 7 * 7 }}` as 49 (tests/deploy/test_review.py)."""

    template_fields = ()


# One Param per setting, generated from the settings model: types, bounds, enums, sections and descriptions that say
# what an empty field means. Every Param may stay empty (null): the deployment default then applies at run time.
PARAMS = {name: Param(None, **schema) for name, schema in param_schemas().items()}


def label_by_chunk(chunk: str) -> None:
    """Name a chunk's mapped task instance in the UI by its chunk file (their map_index_template reads it)."""
    from airflow.sdk import get_current_context

    get_current_context()["chunk_label"] = chunk.rsplit("/", 1)[-1]


def label_by_job(job: PlannedJob, where: str) -> dict:
    """Name an upsample task instance in the UI by its job (their map_index_template reads it); the task context."""
    from airflow.sdk import get_current_context

    context = get_current_context()
    context["job_label"] = job_label(job, where)
    return context


@dag(
    dag_id=DAG_ID,
    # "@daily"; with a bucket-event queue configured (env COSMOS_UPSAMPLE_EVENTS_*), @daily OR its events: events.py.
    schedule=dag_schedule(),
    start_date=dt.datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    default_args=default_args(),
    tags=["cosmos", "upsampling", "vlm"],
    doc_md=__doc__,
)
def cosmos_prompt_upsample():  # noqa: C901 - one nested function per task is the TaskFlow shape
    # Every task: a bounded try (execution_timeout, a deployment setting: see deployment.py), and `fails_fast`, so what
    # only a person can fix (a missing folder, a bad setting, an unknown connection) fails at once, naming the fix.

    # Returns the chunk files (the per-chunk group maps over them) and publishes the run folder as a second output:
    # Airflow maps only over a return value, never over one key of `multiple_outputs`.
    # A run started by bucket events upsamples only the specs its asset events announce (the watched asset is the
    # inlet: see events.run_start).
    @task(**discover_task_options(), **task_timeout("discover"))
    @fails_fast
    def discover(params=None, run_id=None, ti=None, dag_run=None, triggering_asset_events=None, inlet_events=None):
        import os

        from airflow.sdk import Variable

        from include.cosmos_upsample import stages
        from include.cosmos_upsample.events import run_start

        started = run_start(dag_run.run_type, triggering_asset_events, inlet_events, dag_run.run_after)
        run_dir, chunks = stages.discover(params, run_id, lambda key: Variable.get(key, default=None), os.environ,
                                          started=started)
        ti.xcom_push(key=RUN_DIR_XCOM_KEY, value=str(run_dir))
        return chunks

    # At most N chunks in validation per run (env COSMOS_UPSAMPLE_VALIDATE_CONCURRENCY), so that a validated chunk's
    # batch and upsample are not queued behind every other chunk's validation: see deployment.py.
    @task(map_index_template="{{ chunk_label }}", **validate_task_options(), **task_timeout("validate"))
    @fails_fast
    def validate(run_dir: str, chunk: str):
        from include.cosmos_upsample import stages

        label_by_chunk(chunk)
        return stages.validate_chunk(run_dir, chunk)

    @task(map_index_template="{{ chunk_label }}", **task_timeout("batch"))
    @fails_fast
    def batch(run_dir: str, chunk: str, validated: str):
        from include.cosmos_upsample import stages

        label_by_chunk(chunk)
        return stages.batch(run_dir, chunk, validated).model_dump(mode="json")  # XCom stays JSON

    # Runner endpoint: requests to an inference service, in a pool of its own (no GPU slot); either upsample task
    # skips itself in a run of the other's runner (fails_fast turns stages.NotThisRunner into a skip).
    @task(map_index_template="{{ job_label }}", pool=ENDPOINT_POOL, **task_timeout("upsample_endpoint"))
    @fails_fast
    def upsample_endpoint(run_dir: str, job: dict, ti=None):
        from include.cosmos_upsample import stages

        planned = PlannedJob.model_validate(job)
        return stages.upsample(run_dir, planned, ti.map_index, label_by_job(planned, "the inference service"),
                               endpoint=True)

    # all_done: a job that failed after its retries still gets its items reported as failed (and its flagged ones
    # reviewed). An empty list (review none, nothing flagged) skips the review task.
    @task(trigger_rule="all_done", **task_timeout("review_requests"))
    @fails_fast
    def review_requests(run_dir: str, run_id=None):
        from airflow.configuration import conf

        from include.cosmos_upsample import stages

        return stages.review_requests(run_dir, run_id, conf.get("api", "base_url", fallback="").rstrip("/"))

    @task(trigger_rule="all_done", **task_timeout("merge_metadata"))
    @fails_fast
    def merge_metadata(run_dir: str, run_id=None, ti=None):
        from include.cosmos_upsample import stages

        return stages.merge(run_dir, run_id, lambda index: ti.xcom_pull(task_ids="review", map_indexes=index))

    # Too many failed specs fail it at once (fails_fast): the report is written first, and a retry cannot change it.
    @task(outlets=[UPSAMPLED_PROMPTS], **task_timeout("report"))
    @fails_fast
    def report(run_dir: str, merged: str, run_id=None, dag_run=None, ti=None, outlet_events=None):
        from include.cosmos_upsample import stages

        def publish(location: dict) -> None:
            ti.xcom_push(key=REPORT_XCOM_KEY, value=location)
            # The asset's URI is static; its event names where this run's results are (output_dir may be s3://).
            outlet_events[UPSAMPLED_PROMPTS].extra = {key: location[key] for key in stages.ASSET_EXTRA_KEYS}

        return stages.report(run_dir, run_id, DAG_ID, dag_run.start_date.isoformat(), publish=publish)

    # A teardown runs whatever became of the work and is left out of the run's state. Other runs of this DAG are
    # not running meanwhile (max_active_runs=1); a run Airflow still has queued or running is never pruned anyway.
    # Permissions or a refused host key fail it at once (fails_fast): a person fixes them.
    @teardown
    @task(**task_timeout("prune_scratch"))
    @fails_fast
    def prune_scratch(run_dir: str, ti=None):
        from include.cosmos_upsample import stages

        def is_live(run_id: str) -> bool:
            return ti.get_dr_count(dag_id=DAG_ID, run_ids=[run_id], states=["queued", "running"]) > 0

        return stages.prune_scratch(run_dir, is_live)

    # A mapped task group: Airflow runs each chunk's tasks as soon as that chunk's previous one is done, so the first
    # jobs hold GPUs while later chunks are still validated. No group prefix: the task ids stay the stage names.
    @task_group(group_id="chunk", prefix_group_id=False)
    def each_chunk(run_dir: str, chunk: str):
        job = batch(run_dir, chunk, validate(run_dir, chunk))
        # An operator, not @task: runner docker defers to a trigger while its container works (upsample_operator.py).
        # The queue is a deployment setting (env COSMOS_UPSAMPLE_UPSAMPLE_QUEUE), read at parse time: deployment.py.
        UpsampleOperator(task_id="upsample", run_dir=run_dir, job=job, map_index_template="{{ job_label }}",
                         pool=GPU_POOL, **upsample_task_options(), **task_timeout("upsample"))
        upsample_endpoint(run_dir, job)

    chunks = discover()
    run_dir = chunks[RUN_DIR_XCOM_KEY]  # discover's second output; every later stage is handed it
    requests = review_requests(run_dir)
    # Human in the loop: one request per flagged answer, waiting in `awaiting_input` (no worker slot held) until a
    # person answers in Required Actions or the review timeout takes the default (Reject: it stays flagged).
    # The answer field comes filled with the model's answer; what a reviewer changes there is merged as their edit.
    review = ReviewOperator.partial(
        task_id="review", options=[APPROVE, REJECT], defaults=[REJECT],
        params={ANSWER_PARAM: Param("", type="string", format="multiline", title="Answer",
                                    description="Edit to correct the answer")},
    ).expand_kwargs(requests)
    merged = merge_metadata(run_dir)
    each_chunk.partial(run_dir=run_dir).expand(chunk=chunks) >> requests
    review >> merged
    report(run_dir, merged) >> prune_scratch(run_dir)


cosmos_prompt_upsample()
