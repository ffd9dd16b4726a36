"""The six stages of the DAG, one function each; the DAG's tasks are one call to these.

Stages hand each other small dicts (settings, paths) through XCom; items travel as JSON files in the run folder
(layout.RunFolder), so XCom never carries frames, videos or thousands of records. discover makes the run folder and
every later stage is given its path (`run_dir`) by the DAG.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from include.cosmos_upsample.batching import job_key, plan_jobs
from include.cosmos_upsample.gpu_slots import all_slots, engine_for
from include.cosmos_upsample.hints import inputs_identity
from include.cosmos_upsample.items import Item, Tokens, failed_item, invalid_item, load_items, save_items
from include.cosmos_upsample.jobformat import LAST_ERROR_NAME, MANIFEST_NAME, Job, JobItem
from include.cosmos_upsample.layout import OutputLayout, RunFolder, read_json, write_json_atomic
from include.cosmos_upsample.settings import Settings, local_model_path, resolve_settings
from include.cosmos_upsample.shared_storage import require_shared, write_marker
from include.cosmos_upsample.specs import (
    SpecError,
    check_spec_file,
    content_key,
    load_spec,
)
from include.cosmos_upsample.storage import list_specs, output_layout, path_from, root_of, work_dir_for

log = logging.getLogger(__name__)

# What the report task's Asset event carries: a downstream DAG reads the specs from `specs_dir`.
ASSET_EXTRA_KEYS = ("output_dir", "specs_dir", "storage_conn_id", "report_json", "counts")


@contextmanager
def timed_stage(run: RunFolder, stage: str, index: int | None = None):
    """Record a stage's seconds of work in the run folder; the report sums them per stage."""
    started = time.monotonic()
    yield
    write_json_atomic(run.stage_record(stage, index), {"stage": stage, "seconds": time.monotonic() - started})


def stage_seconds(run: RunFolder) -> dict[str, float]:
    totals: dict[str, float] = {}
    for path in run.stage_records():
        record = read_json(path)
        totals[record["stage"]] = totals.get(record["stage"], 0.0) + record["seconds"]
    return totals


def _cached_item(source: Path, spec_id: str, key: str, layout: OutputLayout, budget: int) -> Item | None:
    """The existing output, if it was made from these very bytes, video and settings."""
    output = layout.spec_path(spec_id)
    try:
        data = read_json(output)
        upsampling = data["metadata"]["upsampling"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if upsampling.get("content_key") != key:
        return None
    return Item(spec_id=spec_id, source_path=str(source), status="cached", key=key, name=data.get("name", ""),
                tokens=Tokens(prompt=upsampling["tokens"]["prompt"], budget=budget), hint=upsampling["hint"],
                frames_sent=upsampling.get("frames_sent", 0), output_path=str(output),
                original_prompt=data.get("parent_prompt_text"), upsampled_prompt=data.get("prompt"))


def classify(sources: list[Path], settings: Settings, layout: OutputLayout) -> tuple[list[Item], list[dict]]:
    """Split discovered files into final items (cached, duplicate ids) and entries still to validate."""
    input_dir, budget = path_from(settings.input_dir), settings.token_budget
    finals: list[Item] = []
    pending: list[dict] = []
    owners: dict[str, Path] = {}
    for source in sources:
        try:
            check_spec_file(source, input_dir)
            spec = load_spec(source)
        except SpecError:
            pending.append({"source_path": str(source), "key": None})  # validation writes the reason
            continue
        if spec.id in owners:
            finals.append(invalid_item(source, (
                f"{source.name}: duplicate id {spec.id!r}, already used by {owners[spec.id].name}; "
                "give each spec a unique id"), budget, spec_id=spec.id))
            continue
        owners[spec.id] = source
        try:
            video_identity = inputs_identity(spec, source, input_dir, settings.hint_source)
        except (SpecError, OSError):
            video_identity = "no-video"
        key = content_key(source.read_bytes(), video_identity, settings.fingerprint())
        cached = None if settings.force else _cached_item(source, spec.id, key, layout, budget)
        if cached:
            finals.append(cached)
        else:
            pending.append({"source_path": str(source), "key": key})
    return finals, pending


def load_settings(run: RunFolder) -> Settings:
    """Settings are resolved once, by discover, and read back from the run folder by every later stage."""
    return Settings.model_validate(read_json(run.settings))


def open_run(run_dir: str | Path) -> tuple[RunFolder, Settings]:
    """What every stage after discover does first: check this worker sees the run folder, then read the settings."""
    run = RunFolder.at(run_dir)
    require_shared(run.path)
    return run, load_settings(run)


def discover(params: Mapping[str, Any], run_id: str, variable_get: Callable[[str], str | None],
             environ: Mapping[str, str]) -> tuple[Path, list[str]]:
    """Resolve the settings, list the specs, set cached ones aside, plan the rest into chunks (one per model job);
    returns the run folder and the chunk files."""
    settings = resolve_settings(params, variable_get, environ)
    input_dir = root_of(settings.input_dir, settings.storage_conn_id)
    output_dir = root_of(settings.output_dir, settings.storage_conn_id)
    layout = OutputLayout.at(work_dir_for(settings.work_dir, str(output_dir)))  # scratch: runs/, hints/, jobs/
    if not input_dir.is_dir():
        raise FileNotFoundError(
            f"input_dir {str(input_dir)!r} is not a folder; set the input_dir Param, the Airflow Variable "
            "cosmos_upsample_input_dir or COSMOS_UPSAMPLE_INPUT_DIR to the folder holding the *.json specs"
        )
    settings = settings.model_copy(update={"input_dir": str(input_dir), "output_dir": str(output_dir),
                                           "work_dir": str(layout.root)})
    run = layout.run_folder(run_id)
    write_marker(run.path)
    with timed_stage(run, "discover"):
        write_json_atomic(run.settings, settings.model_dump(mode="json"))
        sources = list_specs(input_dir, settings.spec_pattern)
        finals, pending = classify(sources, settings, output_layout(settings.output_dir))
        save_items(run.discovered, finals)
        chunk_paths = []
        for index, chunk in enumerate(plan_chunks(pending, settings, layout)):
            path = run.chunk(index)
            write_json_atomic(path, chunk)
            chunk_paths.append(str(path))
    log.info("discovered %d spec files in %s: %d cached or duplicate, %d to validate in %d chunks (one model job "
             "each)", len(sources), input_dir, len(finals), len(pending), len(chunk_paths))
    return run.path, chunk_paths


def plan_chunks(pending: list[dict], settings: Settings, layout: OutputLayout) -> list[dict[str, Any]]:
    """One chunk per future model job, planned before validation so that each job can start as soon as its own
    chunk is validated, while other chunks still are (the DAG maps validate -> batch -> upsample per chunk).

    The jobs' count and slots follow batching.plan_jobs (jobs >= slots; a job whose container still runs is kept
    whole, under its own key). A chunk records the slot's engine settings (tensor_parallel_size), so batch never
    asks the hosts again. Specs that could not be read have no key; they ride along and validation reports them.
    Always one chunk at least, so the mapped tasks (and merge, report) run even with nothing to do.
    """
    keyed = {entry["key"]: entry for entry in pending if entry["key"]}
    hosts, pinned = _gpu_hosts_and_live_jobs(settings, layout, keyed)
    slots = all_slots(hosts)
    pinned_keys = {plan.job_key for plan in pinned}
    chunks = [{"conn_id": plan.conn_id, "slot": plan.slot,
               "engine": engine_for(slots, plan.conn_id, plan.slot, settings.backend),
               "job_key": plan.job_key if plan.job_key in pinned_keys else None,
               "entries": [keyed[key] for key in plan.item_keys]}
              for plan in plan_jobs(list(keyed), settings.batch_max_items, slots, settings.fingerprint(), pinned)]
    chunks = chunks or [{"conn_id": None, "slot": None, "engine": {}, "job_key": None, "entries": []}]
    for index, entry in enumerate(entry for entry in pending if not entry["key"]):
        chunks[index % len(chunks)]["entries"].append(entry)
    return chunks


def output_location(settings: Settings) -> dict[str, str]:
    """Where the run's results are, for the Asset event and the UI: plain URLs plus the connection to read them."""
    from include.cosmos_upsample.storage import clean_url

    root = path_from(settings.output_dir)
    return {"output_dir": clean_url(root), "specs_dir": clean_url(output_layout(settings.output_dir).specs_dir),
            "storage_conn_id": getattr(root, "conn_id", None) or ""}


def validate_chunk(run_dir: str | Path, chunk_path: str) -> str:
    from include.cosmos_upsample.storage import is_url, video_cache
    from include.cosmos_upsample.validate import validate_entries

    run, settings = open_run(run_dir)
    chunk = Path(chunk_path)
    out = run.validated(chunk)
    # Videos in object storage are fetched once into work_dir's cache; its hits and downloads are kept per chunk.
    videos = video_cache(settings.work_dir, settings.video_cache_gb) if is_url(settings.input_dir) else None
    with timed_stage(run, "validate", RunFolder.chunk_index(chunk)):
        entries = read_json(chunk)["entries"]
        items = validate_entries(entries, settings, OutputLayout.at(settings.work_dir), videos=videos)
        save_items(out, items)
    if videos is not None:
        write_json_atomic(run.video_cache_stats(chunk), videos.stats.as_dict())
        log.info("%s: video cache %s", chunk.name, videos.stats.as_dict())
    invalid = sum(item.status == "invalid" for item in items)
    log.info("%s: %d valid, %d invalid", chunk.name, len(items) - invalid, invalid)
    return str(out)


def _all_items(run: RunFolder, budget: int) -> list[Item]:
    items = load_items(run.discovered)
    for path in run.validated_files():
        items.extend(load_items(path))
    items.extend(_unvalidated(run, budget))
    return sorted(items, key=lambda item: item.source_path)


def _unvalidated(run: RunFolder, budget: int) -> list[Item]:
    """The specs of a chunk whose validate task failed for good: reported as failed, never silently dropped."""
    missing = []
    for chunk in run.chunks():
        if not run.validated(chunk).exists():
            missing.extend(failed_item(path_from(entry["source_path"]), (
                f"{Path(entry['source_path']).name}: its validation ({chunk.stem}) did not finish; see that "
                "validate task's log, then re-run"), budget) for entry in read_json(chunk)["entries"])
    return missing


def batch(run_dir: str | Path, chunk_path: str, validated: str) -> dict[str, Any]:
    """Write the model job of one chunk's valid items that no earlier job answered; returns it for upsample
    (a job without a key when there is nothing to send)."""
    from include.cosmos_upsample.merge import earlier_answers, point_to_job
    from include.cosmos_upsample.tokens import planner_tokenizer

    run, settings = open_run(run_dir)
    layout = OutputLayout.at(settings.work_dir)
    chunk = Path(chunk_path)
    planned = read_json(chunk)
    with timed_stage(run, "batch", RunFolder.chunk_index(chunk)):
        valid = {item.key: item for item in load_items(Path(validated)) if item.status == "valid"}
        answered = {} if settings.dry_run else earlier_answers(layout, valid)
        keys = sorted(key for key in valid if key not in answered)
        key = (planned["job_key"] or job_key(keys, settings.fingerprint())) if keys else None
        job_dir = layout.job_dir(key) if key else None
        if key and not settings.dry_run:
            job = Job(
                job_key=key, backend=settings.backend, model=_worker_model(settings),
                max_model_len=settings.max_model_len, max_output_tokens=settings.max_output_tokens,
                prompt_format=settings.format.name, sampling=settings.effective_sampling,
                engine={**settings.engine_settings(), **planned["engine"]},
                planner_tokenizer=planner_tokenizer(settings),
                items=tuple(JobItem(item.key, item.spec_id, item.text,
                                    tuple(item.frame_paths) if settings.backend == "vllm" else (),
                                    planned_tokens=item.tokens.prompt) for item in (valid[k] for k in keys)),
            )
            write_json_atomic(job_dir / MANIFEST_NAME, job.to_manifest())
            point_to_job(layout, key, keys)
        job_info = {"job_key": key, "job_dir": str(job_dir) if job_dir else None, "conn_id": planned["conn_id"],
                    "slot": planned["slot"], "items": len(keys)}
        write_json_atomic(run.job_plan(chunk), {"job": job_info, "answered": answered})
    log.info("%s: %d valid items (%d answered by earlier jobs) -> job %s of %d", chunk.name, len(valid),
             len(answered), key or "(none)", len(keys))
    return job_info


def _gpu_hosts_and_live_jobs(settings: Settings, layout: OutputLayout, keyed: Mapping[str, Any]):
    """The GPU hosts' slots, and the jobs of these items whose container still runs (kept whole by plan_jobs)."""
    if settings.runner != "docker":
        return [], []
    from include.cosmos_upsample.remote import gpu_hosts, live_remote_jobs

    pinned = [] if settings.dry_run else live_remote_jobs(layout, settings, keyed)
    return gpu_hosts(settings.gpu_conn_ids), pinned


def _worker_model(settings: Settings) -> str:
    if settings.runner == "local" and settings.backend == "llama_cpp":
        return local_model_path(settings.model_id)
    return settings.model_id


def upsample(run_dir: str | Path, job: dict[str, Any], map_index: int, context: Mapping[str, Any]) -> dict[str, Any]:
    run, settings = open_run(run_dir)
    if settings.dry_run or not job["job_key"]:
        log.info("nothing to send to a model (%s)", "dry run" if settings.dry_run else "no valid items")
        return {"job_key": job["job_key"], "ran": False}
    job_dir = Path(job["job_dir"])
    with timed_stage(run, "upsample", map_index):
        try:
            if settings.runner == "local":
                from include.cosmos_upsample.runners import run_local_job

                run_local_job(job_dir, settings.worker_python)
            else:
                from include.cosmos_upsample.remote import run_docker_job

                run_docker_job(settings, job, context)
        except Exception as exc:
            # If this was the last try, merge reports the job's items as failed with this reason.
            (job_dir / LAST_ERROR_NAME).write_text(f"job {job['job_key']}: {exc}", encoding="utf-8")
            raise
        (job_dir / LAST_ERROR_NAME).unlink(missing_ok=True)
    return {"job_key": job["job_key"], "ran": True}


def merge(run_dir: str | Path, run_id: str) -> str:
    from include.cosmos_upsample.merge import merge_items

    run, settings = open_run(run_dir)
    with timed_stage(run, "merge"):
        jobs, answered = run.planned_jobs()
        job_dirs = {key: Path(job_dir) for key, job_dir in answered.items()}
        for job in jobs:
            job_dir = Path(job["job_dir"])
            if (job_dir / MANIFEST_NAME).exists():
                job_dirs.update({item.key: job_dir for item in Job.read(job_dir).items})
        items = merge_items(_all_items(run, settings.token_budget), job_dirs, output_layout(settings.output_dir),
                            settings, run_id)
        save_items(run.merged, items)
    return str(run.merged)


def report(run_dir: str | Path, run_id: str, dag_id: str, started_at: str,
           publish: Callable[[dict], None] = lambda _location: None) -> dict[str, Any]:
    """Write the report; `publish` records where it is (the UI finds it there) even when the run then fails."""
    import datetime as dt

    from include.cosmos_upsample.report import TooManyFailures, build_report, failure_exceeded, write_report

    run, settings = open_run(run_dir)
    with timed_stage(run, "report"):
        items = load_items(run.merged)
    finished_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    content = build_report(run_id=run_id, dag_id=dag_id, started_at=started_at, finished_at=finished_at,
                           settings=settings, items=items, stages=stage_seconds(run))
    json_path, html_path = write_report(output_layout(settings.output_dir), content)
    counts = content.counts.as_dict()
    location = {"report_json": str(json_path), "report_html": str(html_path), "counts": counts,
                **output_location(settings)}
    publish(location)
    log.info("report: %s (%s); counts %s", json_path, html_path, counts)
    if failure_exceeded(counts, settings.max_failure_ratio):
        raise TooManyFailures(
            f"{counts['failed']} of {counts['discovered']} specs failed, more than max_failure_ratio="
            f"{settings.max_failure_ratio}; see {html_path}"
        )
    return location
