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
from typing import Any, NoReturn

from include.cosmos_upsample.batching import PlannedJob, job_key, plan_jobs
from include.cosmos_upsample.errors import NotThisRunner, SettingsError
from include.cosmos_upsample.events import RunStart, announced_specs, claim_messages
from include.cosmos_upsample.gpu_slots import all_slots, devices_of, engine_for
from include.cosmos_upsample.hints import inputs_identity
from include.cosmos_upsample.items import Item, Tokens, failed_item, invalid_item, load_items, save_items
from include.cosmos_upsample.jobformat import LAST_ERROR_NAME, MANIFEST_NAME, Job, JobItem
from include.cosmos_upsample.layout import OutputLayout, RunFolder, read_json, write_json_atomic, write_local_atomic
from include.cosmos_upsample.quality import Policy
from include.cosmos_upsample.report_model import RunTrigger
from include.cosmos_upsample.settings import Settings, local_model_path, resolve_settings
from include.cosmos_upsample.shared_storage import require_shared, write_marker
from include.cosmos_upsample.specs import (
    PromptSpec,
    SpecError,
    check_spec_file,
    content_key,
    parse_spec,
    read_spec_bytes,
)
from include.cosmos_upsample.stage_notes import chunk_stage_reason, noting_failure
from include.cosmos_upsample.storage import clean_url, list_specs, output_layout, path_from, root_of, work_dir_for

log = logging.getLogger(__name__)

# What the report task's Asset event carries: a downstream DAG reads the specs from `specs_dir`.
ASSET_EXTRA_KEYS = ("output_dir", "specs_dir", "storage_conn_id", "report_json", "counts")


@contextmanager
def timed_stage(run: RunFolder, stage: str, index: int | None = None, since: float | None = None):
    """Record a stage's seconds of work in the run folder; the report sums them per stage. `since`: the wall-clock
    start (epoch seconds) of a stage begun by an earlier process (a task that deferred)."""
    started = time.monotonic()
    yield
    seconds = time.time() - since if since is not None else time.monotonic() - started
    write_json_atomic(run.stage_record(stage, index), {"stage": stage, "seconds": seconds})


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


def already_upsampled(source: Path) -> str:
    """Why an input that is already an upsampled spec is not sent again (unless `force`). NVIDIA's Cosmos 3 pipeline
    does the same: its inference skips prompt upsampling for a prompt that is already upsampler output
    (NVIDIA/cosmos-framework, `cosmos_framework/model/generator/upsampler/prompts.py`, `is_upsampled_prompt`, used
    per sample in `cosmos_framework/inference/inference.py`); here the spec says so itself."""
    return (f"{source.name}: already upsampled (is_upsampled is true; its original prompt is in parent_prompt_text), "
            "so it is not sent to the model again and its lineage stays intact; give the original spec as input, or "
            "set force to upsample it again (parent_prompt_text is kept)")


def classify(sources: list[Path], settings: Settings, layout: OutputLayout) -> tuple[list[Item], list[dict]]:
    """Split discovered files into final items (cached, duplicate ids, already upsampled) and entries still to
    validate. Each file is read once: an entry carries the spec as parsed from the very bytes its content key hashes,
    so the model is asked, and the output built, from that one reading whatever happens to the file meanwhile."""
    input_dir, budget = path_from(settings.input_dir), settings.token_budget
    finals: list[Item] = []
    pending: list[dict] = []
    owners: dict[str, Path] = {}
    for source in sources:
        try:
            check_spec_file(source, input_dir)
            raw = read_spec_bytes(source)
            spec = parse_spec(raw, source)
        except SpecError:
            pending.append({"source_path": str(source), "key": None})  # validation writes the reason
            continue
        if spec.is_upsampled and not settings.force:
            finals.append(invalid_item(source, already_upsampled(source), budget, spec_id=spec.id))
            continue
        if spec.id in owners:
            finals.append(invalid_item(source, (
                f"{source.name}: duplicate id {spec.id!r}, already used by {owners[spec.id].name}; "
                "give each spec a unique id"), budget, spec_id=spec.id))
            continue
        owners[spec.id] = source
        key = content_key(spec.id, raw, _video_identity(spec, source, input_dir, settings), settings.fingerprint())
        cached = None if settings.force else _cached_item(source, spec.id, key, layout, budget)
        if cached is None and not (settings.force or settings.retry_flagged):
            cached = _still_flagged(source, spec, key, layout)
        if cached:
            finals.append(cached)
        else:
            pending.append({"source_path": str(source), "key": key, "spec": spec.model_dump(mode="json")})
    return finals, pending


def _video_identity(spec: PromptSpec, source: Path, input_dir: Path, settings: Settings) -> str:
    try:
        return inputs_identity(spec, source, input_dir, settings.hint_source)
    except (SpecError, OSError):
        return "no-video"


def _still_flagged(source: Path, spec: PromptSpec, key: str, layout: OutputLayout) -> Item | None:
    """An answer an earlier run flagged for these very bytes, video and settings stays flagged: asking the model
    again would likely repeat it, at cost (`retry_flagged` or `force` asks again). Review can still approve it."""
    from include.cosmos_upsample.review import flagged_item

    output = layout.review_path(spec.id)
    try:
        data = read_json(output)
        if data.get("content_key") != key:
            return None
        item = Item(spec_id=spec.id, source_path=str(source), status="flagged", key=key,
                    spec=spec.model_dump(mode="json"),  # approved in review, its output is made from it
                    original_prompt=data.get("prompt"), tokens=Tokens.model_validate(data["tokens"]),
                    hint=data["hint"], frame_paths=data["hint"].get("paths", []), quality=data.get("quality"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return flagged_item(item, data, output)


def quality_policy(settings: Settings) -> Policy:
    """How the run's answers are judged, as the job manifest carries it to the worker (include/.../quality.py)."""
    from include.cosmos_upsample.errors import NotRetryable
    from include.cosmos_upsample.quality import default_blocklist, read_blocklist

    try:
        words = read_blocklist(settings.blocklist_path) if settings.blocklist_path else default_blocklist()
    except (OSError, UnicodeDecodeError) as exc:
        raise NotRetryable(
            f"blocklist_path {settings.blocklist_path!r} cannot be read ({exc}); point the Airflow Variable "
            "cosmos_upsample_blocklist_path (or COSMOS_UPSAMPLE_BLOCKLIST_PATH) at a word list file or folder, or "
            "leave it empty for the shipped list") from None
    return Policy(settings.format.name, settings.thresholds, settings.quality_retries, words)


def load_settings(run: RunFolder) -> Settings:
    """Settings are resolved once, by discover, and read back from the run folder by every later stage."""
    return Settings.model_validate(read_json(run.settings))


def open_run(run_dir: str | Path) -> tuple[RunFolder, Settings]:
    """What every stage after discover does first: check this worker sees the run folder, then read the settings."""
    run = RunFolder.at(run_dir)
    require_shared(run.path)
    return run, load_settings(run)


def discover(params: Mapping[str, Any], run_id: str, variable_get: Callable[[str], str | None],
             environ: Mapping[str, str], started: RunStart | None = None) -> tuple[Path, list[str]]:
    """Resolve the settings, list the specs, set cached ones aside, plan the rest into chunks (one per model job);
    returns the run folder and the chunk files. A run started by bucket events (`started`, events.run_start)
    takes only the specs its messages announce, with the watched prefix as input_dir."""
    if started is not None and started.prefix:
        params = {**params, "input_dir": started.prefix}
    settings = resolve_settings(params, variable_get, environ)
    input_dir = root_of(settings.input_dir, settings.storage_conn_id)
    output_dir = root_of(settings.output_dir, settings.storage_conn_id)
    layout = OutputLayout.at(work_dir_for(settings.work_dir, str(output_dir)))  # scratch: runs/, hints/, jobs/
    if not input_dir.is_dir():
        raise SettingsError(
            f"input_dir {str(input_dir)!r} is not a folder; set the input_dir Param, the Airflow Variable "
            "cosmos_upsample_input_dir or COSMOS_UPSAMPLE_INPUT_DIR to the folder holding the *.json specs"
        )
    settings = settings.model_copy(update={"input_dir": str(input_dir), "output_dir": str(output_dir),
                                           "work_dir": str(layout.root)})
    quality_policy(settings)  # a blocklist that cannot be read stops the run here, naming the setting
    run = layout.run_folder(run_id)
    write_marker(run.path, run_id)
    with timed_stage(run, "discover"):
        write_json_atomic(run.settings, settings.model_dump(mode="json"))
        trigger = claim_messages(started, layout.message_claims_dir, run_id) if started else None
        sources, deleted, trigger = spec_files(input_dir, settings, trigger)
        if trigger is not None:
            write_json_atomic(run.trigger, trigger.model_dump(mode="json"))
        finals, pending = classify(sources, settings, output_layout(settings.output_dir))
        chunks, held = plan_chunks(pending, settings, layout)
        save_items(run.discovered, finals + deleted + held)
        chunk_paths = []
        for index, chunk in enumerate(chunks):
            path = run.chunk(index)
            write_json_atomic(path, chunk)
            chunk_paths.append(str(path))
    log.info("discovered %d spec files in %s: %d cached, duplicate or already upsampled, %d held for a GPU host "
             "that did not answer, %d to validate in %d chunks (one model job each)", len(sources), input_dir,
             len(finals), len(held), len(pending) - len(held), len(chunk_paths))
    return run.path, chunk_paths


def spec_files(input_dir: Any, settings: Settings,
               trigger: RunTrigger | None) -> tuple[list[Any], list[Item], RunTrigger | None]:
    """The spec files of input_dir; for a run started by bucket events only the announced ones, plus an invalid
    item for each deleted before the run, and the trigger with the announced objects that are not specs set aside."""
    if trigger is None or trigger.kind != "asset_event":
        return list_specs(input_dir, settings.spec_pattern), [], trigger
    if not trigger.objects:
        return [], [], trigger
    specs, gone, not_specs = announced_specs(trigger.objects, input_dir, settings.spec_pattern)
    deleted = [invalid_item(path, (
        f"{path.name}: announced by a bucket event, but {clean_url(path)} no longer exists (deleted before this run "
        "read it); nothing to upsample"), settings.token_budget) for path in gone]
    trigger = trigger.model_copy(update={"objects": [url for url in trigger.objects if url not in not_specs],
                                         "ignored": [*trigger.ignored, *not_specs.values()]})
    return specs, deleted, trigger


def plan_chunks(pending: list[dict], settings: Settings, layout: OutputLayout) -> tuple[list[dict[str, Any]],
                                                                                       list[Item]]:
    """One chunk per future model job, planned before validation so that each job can start as soon as its own
    chunk is validated, while other chunks still are (the DAG maps validate -> batch -> upsample per chunk).

    The jobs' count and slots follow batching.plan_jobs (jobs >= slots; a job whose container still runs is kept
    whole, under its own key). A chunk records the slot's engine settings (tensor_parallel_size), so batch never
    asks the hosts again. Specs that could not be read have no key; they ride along and validation reports them.
    Always one chunk at least, so the mapped tasks (and merge, report) run even with nothing to do.

    Also returns the items held back: those of a job on a GPU host that did not answer (its container may still be
    answering them), as failed items saying so; they are planned again once the host answers.
    """
    keyed = {entry["key"]: entry for entry in pending if entry["key"]}
    hosts, pinned, unanswered = _gpu_hosts_and_live_jobs(settings, layout, keyed)
    held = [failed_item(source, f"{source.name}: {reason}", settings.token_budget, spec_id=keyed[key]["spec"]["id"])
            for key, reason in unanswered.items() for source in [path_from(keyed[key]["source_path"])]]
    planned = [key for key in keyed if key not in unanswered]
    slots = all_slots(hosts)
    pinned_keys = {plan.job_key for plan in pinned}
    chunks = [{"conn_id": plan.conn_id, "slot": plan.slot, "devices": devices_of(slots, plan.conn_id, plan.slot),
               "engine": engine_for(slots, plan.conn_id, plan.slot, settings.backend),
               "job_key": plan.job_key if plan.job_key in pinned_keys else None,
               "entries": [keyed[key] for key in plan.item_keys]}
              for plan in plan_jobs(planned, settings.batch_max_items, slots, settings.fingerprint(), pinned)]
    chunks = chunks or [{"conn_id": None, "slot": None, "devices": None, "engine": {}, "job_key": None,
                         "entries": []}]
    for index, entry in enumerate(entry for entry in pending if not entry["key"]):
        chunks[index % len(chunks)]["entries"].append(entry)
    return chunks, held


def output_location(settings: Settings) -> dict[str, str]:
    """Where the run's results are, for the Asset event and the UI: plain URLs plus the connection to read them."""
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
    with (noting_failure(run.stage_note("validate", chunk), f"its validation ({chunk.stem})", "validate"),
          timed_stage(run, "validate", RunFolder.chunk_index(chunk))):
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
    """Every item of the run: final at discovery, or as its chunk's validation left it. A chunk whose validate or
    batch task did not finish has its specs failed with that task's note (stage_notes), never silently dropped."""
    items = load_items(run.discovered)
    for chunk in run.chunks():
        if not run.validated(chunk).exists():
            why = chunk_stage_reason(run.stage_note("validate", chunk), f"its validation ({chunk.stem})")
            items.extend(failed_item(path_from(entry["source_path"]), f"{Path(entry['source_path']).name}: {why}",
                                     budget) for entry in read_json(chunk)["entries"])
            continue
        validated = load_items(run.validated(chunk))
        if not run.job_plan(chunk).exists():  # batch did not finish: its valid items have no job
            why = chunk_stage_reason(run.stage_note("batch", chunk), f"its batch ({chunk.stem})")
            validated = [item.model_copy(update={"status": "failed", "reason": f"{Path(item.source_path).name}: {why}"})
                         if item.status == "valid" else item for item in validated]
        items.extend(validated)
    return sorted(items, key=lambda item: item.source_path)


def batch(run_dir: str | Path, chunk_path: str, validated: str) -> PlannedJob:
    """Write the model job of one chunk's valid items that no earlier job answered; returns it for upsample
    (a job without a key when there is nothing to send)."""
    from include.cosmos_upsample.merge import earlier_answers, flagged_attempts, point_to_job
    from include.cosmos_upsample.tokens import planner_tokenizer

    run, settings = open_run(run_dir)
    layout = OutputLayout.at(settings.work_dir)
    chunk = Path(chunk_path)
    planned = read_json(chunk)
    with (noting_failure(run.stage_note("batch", chunk), f"its batch ({chunk.stem})", "batch"),
          timed_stage(run, "batch", RunFolder.chunk_index(chunk))):
        valid = {item.key: item for item in load_items(Path(validated)) if item.status == "valid"}
        ask_flagged = settings.retry_flagged or settings.force
        answered = {} if settings.dry_run else earlier_answers(layout, valid, retry_flagged=ask_flagged)
        keys = sorted(key for key in valid if key not in answered)
        key = (planned["job_key"] or job_key(keys, settings.fingerprint())) if keys else None
        job_dir = layout.job_dir(key) if key else None
        if key and not settings.dry_run:
            policy = quality_policy(settings)
            # Asked again (retry_flagged, force): an item this job already flagged gets a full new round of attempts.
            tried = flagged_attempts(job_dir) if ask_flagged else {}
            job = Job(
                job_key=key, backend=settings.backend, model=_worker_model(settings),
                max_model_len=settings.max_model_len, max_output_tokens=settings.max_output_tokens,
                prompt_format=settings.format.name, sampling=settings.effective_sampling,
                engine={**settings.engine_settings(), **planned["engine"]},
                planner_tokenizer=planner_tokenizer(settings), response_schema=settings.format.response_schema,
                items=tuple(JobItem(item.key, item.spec_id, item.text,
                                    tuple(item.frame_paths) if settings.backend == "vllm" else (),
                                    planned_tokens=item.tokens.prompt, prompt=item.original_prompt,
                                    max_attempts=tried[item.key] + policy.max_attempts if item.key in tried else None)
                            for item in (valid[k] for k in keys)),
                quality=policy.to_manifest(),
            )
            write_json_atomic(job_dir / MANIFEST_NAME, job.to_manifest())
            # Until the upsample task reaches the job and says otherwise (stage_notes), this is why it has no answers.
            write_local_atomic(job_dir / LAST_ERROR_NAME, [(
                f"job {key}: its upsample task never reached the job (it did not run, or ran on a worker that does "
                "not see work_dir: see README 'Shared storage'); see that task's log, then re-run").encode()])
            point_to_job(layout, key, keys)
        planned_job = PlannedJob(job_key=key, job_dir=job_dir, conn_id=planned["conn_id"], slot=planned["slot"],
                                 devices=planned.get("devices"), items=len(keys))
        write_json_atomic(run.job_plan(chunk), {"job": planned_job.model_dump(mode="json"), "answered": answered})
    log.info("%s: %d valid items (%d answered by earlier jobs) -> job %s of %d", chunk.name, len(valid),
             len(answered), key or "(none)", len(keys))
    return planned_job


def _gpu_hosts_and_live_jobs(settings: Settings, layout: OutputLayout, keyed: Mapping[str, Any]):
    """The GPU hosts' slots; the jobs of these items whose container still runs (kept whole by plan_jobs); and the
    items of jobs on hosts that did not answer (key -> why they are held back)."""
    if settings.runner != "docker":
        return [], [], {}
    from include.cosmos_upsample.gpu_slots import gpu_hosts
    from include.cosmos_upsample.live_jobs import live_remote_jobs

    pinned, unanswered = ([], {}) if settings.dry_run else live_remote_jobs(layout, settings, keyed)
    return gpu_hosts(settings.gpu_conn_ids), pinned, unanswered


def _worker_model(settings: Settings) -> str:
    if settings.runner == "local" and settings.backend == "llama_cpp":
        return local_model_path(settings.model_id)
    return settings.model_id


def upsample(run_dir: str | Path, job: PlannedJob, map_index: int, context: Mapping[str, Any],
             endpoint: bool = False, defer: Callable[[dict[str, Any]], NoReturn] | None = None) -> dict[str, Any]:
    """Run a chunk's model job. Two tasks call this, because Airflow fixes a task's pool when the DAG is parsed:
    `upsample` (pool cosmos_gpu) for runners local and docker, `upsample_endpoint` (`endpoint=True`, pool
    cosmos_endpoint) for runner endpoint; each raises NotThisRunner, a clean skip, for the other's runs.
    Runner `docker`: start (or adopt) its container, then `defer(trigger kwargs)` (the task defers to
    docker_trigger.DockerJobTrigger; it raises, and `upsample_resumed` takes over)."""
    run, settings = open_run(run_dir)
    task_id, other_task = ("upsample_endpoint", "upsample") if endpoint else ("upsample", "upsample_endpoint")
    if (settings.runner == "endpoint") != endpoint:
        raise NotThisRunner(f"runner {settings.runner!r}: this job runs in the {other_task} task")
    if settings.dry_run or not job.job_key:
        log.info("nothing to send to a model (%s)", "dry run" if settings.dry_run else "no valid items")
        return {"job_key": job.job_key, "ran": False}
    job_dir = job.job_dir
    started_at = time.time()
    # If this try is the last, merge reports the job's unanswered items as failed with the note's reason.
    with (noting_failure(job_dir / LAST_ERROR_NAME, f"job {job.job_key}", task_id, context),
          timed_stage(run, "upsample", map_index)):
        if settings.runner == "local":
            from include.cosmos_upsample.runners import run_local_job

            run_local_job(job_dir, settings.worker_python, settings.stall_timeout_seconds)
        elif settings.runner == "endpoint":
            from include.cosmos_upsample.endpoint import run_endpoint_job

            run_endpoint_job(job_dir, settings.endpoint_conn_id, settings.endpoint_concurrency,
                             settings.endpoint_timeout_seconds, settings.endpoint_attempts)
        else:
            from include.cosmos_upsample.remote import start_docker_job, trigger_kwargs

            if defer is None:
                raise SettingsError("runner docker waits for its container in Airflow's triggerer: run the upsample "
                                    "task as the DAG's UpsampleOperator")
            defer(trigger_kwargs(settings, job, start_docker_job(settings, job), started_at))
    return {"job_key": job.job_key, "ran": True}


def upsample_resumed(run_dir: str | Path, job: PlannedJob, map_index: int, context: Mapping[str, Any],
                     event: dict[str, Any]) -> dict[str, Any]:
    """Runner `docker`, after the trigger's event: fetch the ledger, remove the container, raise what ended it."""
    from include.cosmos_upsample.remote import finish_docker_job

    run, settings = open_run(run_dir)
    with (noting_failure(job.job_dir / LAST_ERROR_NAME, f"job {job.job_key}", "upsample", context),
          timed_stage(run, "upsample", map_index, since=event["started_at"])):
        finish_docker_job(settings, job, event)
    return {"job_key": job.job_key, "ran": True}


def _job_dirs(run: RunFolder) -> dict[str, Path]:
    """Item key -> the job folder that answers it: the run's own jobs and the earlier jobs batch found."""
    jobs, answered = run.planned_jobs()
    job_dirs = {key: Path(job_dir) for key, job_dir in answered.items()}
    for job in jobs:
        job_dir = PlannedJob.model_validate(job).job_dir
        if (job_dir / MANIFEST_NAME).exists():
            job_dirs.update({item.key: job_dir for item in Job.read(job_dir).items})
    return job_dirs


def review_requests(run_dir: str | Path, run_id: str, links_base: str = "") -> list[dict[str, Any]]:
    """With `review: flagged`, one request to a person per flagged item (the DAG maps its HITL task over them); the
    spec ids in map-index order stay in the run folder, for merge to pair each answer with its item."""
    from include.cosmos_upsample import review
    from include.cosmos_upsample.merge import flagged_records

    run, settings = open_run(run_dir)
    records = []
    if settings.review == "flagged" and not settings.dry_run:
        records = flagged_records(_all_items(run, settings.token_budget), _job_dirs(run),
                                  output_layout(settings.output_dir), settings, run_id)
    write_json_atomic(run.review_requests, [data["spec_id"] for data in records])
    log.info("%d flagged answers to review", len(records))
    return [review.request(data, run_id, links_base, settings.review_timeout_seconds) for data in records]


def merge(run_dir: str | Path, run_id: str,
          review_result: Callable[[int], Mapping[str, Any] | None] = lambda _index: None) -> str:
    """`review_result(map_index)`: what the reviewer answered to that review request (None: nobody did)."""
    from include.cosmos_upsample.merge import merge_items

    run, settings = open_run(run_dir)
    with timed_stage(run, "merge"):
        asked = read_json(run.review_requests) if run.review_requests.exists() else []
        reviewed = {spec_id: result for index, spec_id in enumerate(asked) if (result := review_result(index))}
        items = merge_items(_all_items(run, settings.token_budget), _job_dirs(run),
                            output_layout(settings.output_dir), settings, run_id, reviewed)
        save_items(run.merged, items)
    return str(run.merged)


def report(run_dir: str | Path, run_id: str, dag_id: str, started_at: str,
           publish: Callable[[dict], None] = lambda _location: None) -> dict[str, Any]:
    """Write the report; `publish` records where it is (the UI finds it there) even when the run then fails."""
    import datetime as dt

    from include.cosmos_upsample.report import TooManyFailures, build_report, quota_exceeded, write_report

    run, settings = open_run(run_dir)
    with timed_stage(run, "report"):
        items = load_items(run.merged)
    finished_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    trigger = RunTrigger.model_validate(read_json(run.trigger)) if run.trigger.exists() else None
    content = build_report(run_id=run_id, dag_id=dag_id, started_at=started_at, finished_at=finished_at,
                           settings=settings, items=items, stages=stage_seconds(run), trigger=trigger)
    json_path, html_path = write_report(output_layout(settings.output_dir), content)
    counts = content.counts.as_dict()
    location = {"report_json": str(json_path), "report_html": str(html_path), "counts": counts,
                **output_location(settings)}
    publish(location)
    log.info("report: %s (%s); counts %s", json_path, html_path, counts)
    exceeded = quota_exceeded(counts, settings)
    if exceeded:
        raise TooManyFailures(f"{exceeded}; see {html_path}")
    return location


def prune_scratch(run_dir: str | Path, is_live: Callable[[str], bool]) -> dict[str, Any]:
    """The DAG's teardown: prune scratch older than retention_days from this run's work_dir and GPU hosts; what could
    not be pruned is logged, the rest still pruned, then raised (the run's own state never depends on it)."""
    from include.cosmos_upsample.errors import NotRetryable
    from include.cosmos_upsample.retention import PruneFailed, prune

    run, settings = open_run(run_dir)
    result = prune(settings, keep=run.path, is_live=is_live)
    if result.problems:
        error = NotRetryable if result.needs_person else PruneFailed
        raise error("could not prune everything: " + "; ".join(result.problems))
    return result.as_dict()
