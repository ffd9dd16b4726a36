"""Merge metadata: turn the jobs' ledgers into upsampled PromptSpecs under output_dir/specs, atomically."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from include.cosmos_upsample.items import Item
from include.cosmos_upsample.jobformat import LAST_ERROR_NAME, Ledger, worker_holds
from include.cosmos_upsample.layout import OutputLayout
from include.cosmos_upsample.settings import Settings
from include.cosmos_upsample.specs import SpecError, load_spec, upsampled_spec
from include.cosmos_upsample.storage import path_from, write_json


def ledger_results(job_dirs: list[Path]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The last entry per item key across the jobs' ledgers (an `ok` is never replaced), and each job's error."""
    results: dict[str, dict[str, Any]] = {}
    job_errors: dict[str, str] = {}
    for job_dir in job_dirs:
        for entry in Ledger.of(job_dir).entries():
            if results.get(entry["key"], {}).get("status") != "ok":
                results[entry["key"]] = entry
        error_file = job_dir / LAST_ERROR_NAME
        if error_file.exists():
            job_errors[job_dir.name] = error_file.read_text(encoding="utf-8").splitlines()[0]
    return results, job_errors


def earlier_answers(layout: OutputLayout, item_keys: Iterable[str]) -> dict[str, str]:
    """Items an earlier job already answered (key -> that job's folder), for the batch stage to leave out.

    A job is named by its items. When a run wrote some outputs and lost others (a full disk, a killed merge), the
    next run packs the rest into a job of another name; without this it would pay the model for them again. A job
    whose worker still runs (its lock is held) is not split: the re-run gets the same job and waits for it.
    """
    answered: dict[str, str] = {}
    finished: dict[Path, set[str]] = {}
    for key in item_keys:
        try:
            job_dir = layout.job_dir(layout.answer_pointer(key).read_text(encoding="utf-8").strip())
        except OSError:
            continue
        if job_dir not in finished:
            finished[job_dir] = set() if worker_holds(job_dir) else Ledger.of(job_dir).finished_keys()
        if key in finished[job_dir]:
            answered[key] = str(job_dir)
    return answered


def point_to_job(layout: OutputLayout, job_key: str, item_keys: Iterable[str]) -> None:
    """Record which job answers each item (jobs/by-item/<item_key>), for `earlier_answers` of later runs."""
    for key in item_keys:
        pointer = layout.answer_pointer(key)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        partial = pointer.with_name(f".{key}.tmp")
        partial.write_text(job_key, encoding="utf-8")
        partial.replace(pointer)


def provenance(item: Item, entry: dict[str, Any], settings: Settings, run_id: str) -> dict[str, Any]:
    return {
        "model": settings.model_id,
        "backend": settings.backend,
        "content_key": item.key,
        "prompt_format": {"name": settings.format.name, "version": settings.format.version},
        "tokens": {"prompt": item.tokens.prompt, "budget": item.tokens.budget,
                   "engine": entry.get("prompt_tokens"), "completion": entry.get("completion_tokens")},
        "hint": item.hint.model_dump(),
        "frames_sent": entry.get("frames_sent", 0),
        "sampling": settings.effective_sampling,
        "run_id": run_id,
        "source_path": item.source_path,
        "upsampled_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def merge_item(item: Item, entry: dict[str, Any] | None, job_error: str | None, layout: OutputLayout,
               settings: Settings, run_id: str) -> Item:
    """Write one output spec; whatever goes wrong becomes this item's `failed` reason, never the run's crash."""
    # The engine's own prompt count, whenever the engine saw the item (also when the answer could not be written).
    engine_count = (entry or {}).get("prompt_tokens")
    item = item.model_copy(update={"tokens": item.tokens.model_copy(update={"engine": engine_count})})
    if entry is None or entry.get("status") != "ok":
        reason = (entry or {}).get("reason") or job_error or "the model job ended without an answer for this item"
        return item.model_copy(update={"status": "failed", "reason": reason})
    output = layout.spec_path(item.spec_id)
    try:
        spec = load_spec(path_from(item.source_path))
        write_json(output, upsampled_spec(spec, entry["text"], provenance(item, entry, settings, run_id)))
    except (OSError, SpecError) as exc:
        reason = (f"{Path(item.source_path).name}: could not write {output} ({exc}); free space or fix permissions "
                  "there, then re-run: the model's answer is kept and not paid again")
        return item.model_copy(update={"status": "failed", "reason": reason})
    return item.model_copy(update={"status": "upsampled", "output_path": str(output),
                                   "upsampled_prompt": entry["text"], "frames_sent": entry.get("frames_sent", 0)})


def merge_items(items: list[Item], job_dirs: dict[str, Path], layout: OutputLayout, settings: Settings,
                run_id: str) -> list[Item]:
    """Every item leaves with a final status; valid ones take their job's answer (or `planned` in a dry run)."""
    results, job_errors = ledger_results(list(dict.fromkeys(job_dirs.values())))  # each ledger read once
    merged = []
    for item in items:
        if item.status != "valid":
            merged.append(item)
        elif settings.dry_run:
            merged.append(item.model_copy(update={"status": "planned"}))
        else:
            job_dir = job_dirs.get(item.key)
            error = job_errors.get(job_dir.name) if job_dir else None
            merged.append(merge_item(item, results.get(item.key), error, layout, settings, run_id))
    return merged
