"""
# Cosmos prompt upsampling

Turns short Cosmos `PromptSpec` prompts into long, precise video descriptions with a vision-language model that
also sees a few low-resolution frames (the *hint*) of each prompt's video.

**discover** the `*.json` specs of `input_dir` (up-to-date outputs are `cached`) and plan them into chunks, one
per model job and GPU slot -> then each chunk on its own, as soon as it can:
**validate** its specs: probe videos, size the hint to the exact token budget, extract frames ->
**batch** its valid items into the chunk's model job ->
**upsample** the job with one model load (runner `local` here, or `docker` on GPU hosts over SSH) ->
then, once every chunk is done:
**merge_metadata** into `output_dir/specs/<id>.json` ->
**report** to `output_dir/reports/<run_id>.json|html` (also under *Upsample reports* in the UI).

A Param left empty falls back to the Variable `cosmos_upsample_<name>`, then `COSMOS_UPSAMPLE_<NAME>`, then the
built-in default. Re-runs redo only what changed; a retried job resumes from its results ledger.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import Asset, Param, dag, task, task_group

from include.cosmos_upsample.deployment import default_args, upsample_task_options, validate_task_options
from include.cosmos_upsample.settings import (
    ASSET_URI,
    DAG_ID,
    GPU_POOL,
    REPORT_XCOM_KEY,
    RUN_DIR_XCOM_KEY,
    param_schemas,
)

UPSAMPLED_PROMPTS = Asset(ASSET_URI)


# One Param per setting, generated from the settings model: types, bounds, enums, sections and descriptions that say
# what an empty field means. Every Param may stay empty (null): the deployment default then applies at run time.
PARAMS = {name: Param(None, **schema) for name, schema in param_schemas().items()}


def label_by_chunk(chunk: str) -> None:
    """Name a chunk's mapped task instance in the UI by its chunk file (their map_index_template reads it)."""
    from airflow.sdk import get_current_context

    get_current_context()["chunk_label"] = chunk.rsplit("/", 1)[-1]


@dag(
    dag_id=DAG_ID,
    schedule="@daily",
    start_date=dt.datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    default_args=default_args(),
    tags=["cosmos", "upsampling", "vlm"],
    doc_md=__doc__,
)
def cosmos_prompt_upsample():  # noqa: C901 - one nested function per task is the TaskFlow shape
    # Returns the chunk files (the per-chunk group maps over them) and publishes the run folder as a second output:
    # Airflow maps only over a return value, never over one key of `multiple_outputs`.
    @task
    def discover(params=None, run_id=None, ti=None):
        import os

        from airflow.sdk import Variable

        from include.cosmos_upsample import stages

        run_dir, chunks = stages.discover(params, run_id, lambda key: Variable.get(key, default=None), os.environ)
        ti.xcom_push(key=RUN_DIR_XCOM_KEY, value=str(run_dir))
        return chunks

    # At most N chunks in validation per run (env COSMOS_UPSAMPLE_VALIDATE_CONCURRENCY), so that a validated chunk's
    # batch and upsample are not queued behind every other chunk's validation: see deployment.py.
    @task(map_index_template="{{ chunk_label }}", **validate_task_options())
    def validate(run_dir: str, chunk: str):
        from include.cosmos_upsample import stages

        label_by_chunk(chunk)
        return stages.validate_chunk(run_dir, chunk)

    @task(map_index_template="{{ chunk_label }}")
    def batch(run_dir: str, chunk: str, validated: str):
        from include.cosmos_upsample import stages

        label_by_chunk(chunk)
        return stages.batch(run_dir, chunk, validated)

    # The queue is a deployment setting (env COSMOS_UPSAMPLE_UPSAMPLE_QUEUE), read at parse time: see deployment.py.
    @task(map_index_template="{{ job_label }}", pool=GPU_POOL, **upsample_task_options())
    def upsample(run_dir: str, job: dict, ti=None):
        from airflow.sdk import get_current_context
        from airflow.sdk.exceptions import AirflowFailException

        from include.cosmos_upsample import stages
        from include.cosmos_upsample.errors import NotRetryable

        context = get_current_context()
        context["job_label"] = f"job {job['job_key'] or '-'} ({job['items']} prompts) on {job['conn_id'] or 'local'}"
        try:
            return stages.upsample(run_dir, job, ti.map_index, context)
        except NotRetryable as exc:
            raise AirflowFailException(str(exc)) from exc

    # all_done: a job that failed after its retries still gets its items reported as failed.
    @task(trigger_rule="all_done")
    def merge_metadata(run_dir: str, run_id=None):
        from include.cosmos_upsample import stages

        return stages.merge(run_dir, run_id)

    @task(outlets=[UPSAMPLED_PROMPTS])
    def report(run_dir: str, merged: str, run_id=None, dag_run=None, ti=None, outlet_events=None):
        from airflow.sdk.exceptions import AirflowFailException

        from include.cosmos_upsample import stages
        from include.cosmos_upsample.errors import NotRetryable

        def publish(location: dict) -> None:
            ti.xcom_push(key=REPORT_XCOM_KEY, value=location)
            # The asset's URI is static; its event names where this run's results are (output_dir may be s3://).
            outlet_events[UPSAMPLED_PROMPTS].extra = {key: location[key] for key in stages.ASSET_EXTRA_KEYS}

        try:
            return stages.report(run_dir, run_id, DAG_ID, dag_run.start_date.isoformat(), publish=publish)
        except NotRetryable as exc:  # too many failed specs: the report is written, a retry cannot change it
            raise AirflowFailException(str(exc)) from exc

    # A mapped task group: Airflow runs each chunk's tasks as soon as that chunk's previous one is done, so the first
    # jobs hold GPUs while later chunks are still validated. No group prefix: the task ids stay the stage names.
    @task_group(group_id="chunk", prefix_group_id=False)
    def each_chunk(run_dir: str, chunk: str):
        job = batch(run_dir, chunk, validate(run_dir, chunk))
        return upsample(run_dir, job)

    chunks = discover()
    run_dir = chunks[RUN_DIR_XCOM_KEY]  # discover's second output; every later stage is handed it
    merged = merge_metadata(run_dir)
    each_chunk.partial(run_dir=run_dir).expand(chunk=chunks) >> merged
    report(run_dir, merged)


cosmos_prompt_upsample()
