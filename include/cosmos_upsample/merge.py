"""Merge metadata: turn the jobs' ledgers into upsampled PromptSpecs under output_dir/specs, atomically."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from include.cosmos_upsample.items import Item
from include.cosmos_upsample.layout import OutputLayout, write_json_atomic
from include.cosmos_upsample.prompting import PROMPT_VERSION
from include.cosmos_upsample.runners import LAST_ERROR_NAME, worker_module
from include.cosmos_upsample.settings import Settings
from include.cosmos_upsample.specs import SpecError, load_spec, upsampled_spec


def ledger_results(job_dirs: list[Path]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The last entry per item key across the jobs' ledgers (an `ok` is never replaced), and each job's error."""
    ledger_class = worker_module().Ledger
    results: dict[str, dict[str, Any]] = {}
    job_errors: dict[str, str] = {}
    for job_dir in job_dirs:
        for entry in ledger_class(job_dir / "ledger.jsonl").entries():
            if results.get(entry["key"], {}).get("status") != "ok":
                results[entry["key"]] = entry
        error_file = job_dir / LAST_ERROR_NAME
        if error_file.exists():
            job_errors[job_dir.name] = error_file.read_text(encoding="utf-8").splitlines()[0]
    return results, job_errors


def provenance(item: Item, entry: dict[str, Any], settings: Settings, run_id: str) -> dict[str, Any]:
    return {
        "model": settings.model_id,
        "backend": settings.backend,
        "content_key": item.key,
        "prompt_version": PROMPT_VERSION,
        "tokens": {"prompt": item.tokens.prompt, "budget": item.tokens.budget,
                   "engine_prompt": entry.get("prompt_tokens"), "completion": entry.get("completion_tokens")},
        "hint": item.hint.model_dump(),
        "frames_sent": entry.get("frames_sent", 0),
        "sampling": settings.sampling.model_dump(),
        "run_id": run_id,
        "source_path": item.source_path,
        "upsampled_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def merge_item(item: Item, entry: dict[str, Any] | None, job_error: str | None, layout: OutputLayout,
               settings: Settings, run_id: str) -> Item:
    """Write one output spec; whatever goes wrong becomes this item's `failed` reason, never the run's crash."""
    if entry is None or entry.get("status") != "ok":
        reason = (entry or {}).get("reason") or job_error or "the model job ended without an answer for this item"
        return item.model_copy(update={"status": "failed", "reason": reason})
    output = layout.spec_path(item.spec_id)
    try:
        spec = load_spec(Path(item.source_path))
        write_json_atomic(output, upsampled_spec(spec, entry["text"], provenance(item, entry, settings, run_id)))
    except (OSError, SpecError) as exc:
        return item.model_copy(update={"status": "failed", "reason": f"could not write {output}: {exc}"})
    return item.model_copy(update={"status": "upsampled", "output_path": str(output),
                                   "upsampled_prompt": entry["text"], "frames_sent": entry.get("frames_sent", 0)})


def merge_items(items: list[Item], job_dirs: dict[str, Path], layout: OutputLayout, settings: Settings,
                run_id: str) -> list[Item]:
    """Every item leaves with a final status; valid ones take their job's answer (or `planned` in a dry run)."""
    results, job_errors = ledger_results(list(job_dirs.values()))
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
