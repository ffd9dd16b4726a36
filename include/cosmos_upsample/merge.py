"""Merge metadata: turn the jobs' ledgers into upsampled PromptSpecs under output_dir/specs, atomically; answers that
failed the quality checks go to output_dir/review instead (include/cosmos_upsample/review.py), never to specs/."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from include.cosmos_upsample import review
from include.cosmos_upsample.items import Item
from include.cosmos_upsample.jobformat import LAST_ERROR_NAME, Job, Ledger, final_attempt, worker_holds
from include.cosmos_upsample.layout import OutputLayout, read_json, write_local_atomic
from include.cosmos_upsample.quality import FLAGGED, PASS
from include.cosmos_upsample.report_model import ItemQuality, Review
from include.cosmos_upsample.settings import Settings
from include.cosmos_upsample.specs import PromptSpec, upsampled_spec
from include.cosmos_upsample.storage import write_json


@dataclass
class Answers:
    """One item's answers in its job's ledger: the judged attempts, the one that settles it (None while it could
    still be asked again), and the engine's last error when it gave no answer."""

    attempts: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


def ledger_results(job_dirs: list[Path]) -> tuple[dict[str, Answers], dict[str, str]]:
    """Each item's answers across the jobs' ledgers (a job that settled an item is never replaced by one that did
    not), and each job's error."""
    results: dict[str, Answers] = {}
    job_errors: dict[str, str] = {}
    for job_dir in job_dirs:
        for key, answers in _job_answers(job_dir).items():
            if results.get(key, Answers()).final is None:
                results[key] = answers
        error_file = job_dir / LAST_ERROR_NAME
        if error_file.exists():
            job_errors[job_dir.name] = " ".join(error_file.read_text(encoding="utf-8").split())
    return results, job_errors


def _job_answers(job_dir: Path) -> dict[str, Answers]:
    try:
        job = Job.read(job_dir)
    except (OSError, ValueError, KeyError):
        return {}
    ledger = Ledger.of(job_dir)
    attempts = ledger.attempts(job)
    errors = {entry["key"]: entry for entry in ledger.entries() if entry.get("status") == "failed"}
    found = {}
    for item in job.items:
        tried = attempts.get(item.key, [])
        if tried or item.key in errors:
            found[item.key] = Answers(tried, final_attempt(tried, job.max_attempts(item)), errors.get(item.key))
    return found


def _final_keys(job_dir: Path, retry_flagged: bool) -> set[str]:
    """Items the job settled; with `retry_flagged`, only those that passed (flagged ones are to be asked again)."""
    answers = _job_answers(job_dir)
    return {key for key, found in answers.items()
            if found.final is not None and not (retry_flagged and found.final.get("verdict") == FLAGGED)}


def flagged_attempts(job_dir: Path) -> dict[str, int]:
    """Items this job settled as flagged, with their number of attempts (for a new round when asked again)."""
    return {key: len(found.attempts) for key, found in _job_answers(job_dir).items()
            if found.final is not None and found.final.get("verdict") == FLAGGED}


def earlier_answers(layout: OutputLayout, item_keys: Iterable[str], retry_flagged: bool = False) -> dict[str, str]:
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
            finished[job_dir] = set() if worker_holds(job_dir) else _final_keys(job_dir, retry_flagged)
        if key in finished[job_dir]:
            answered[key] = str(job_dir)
    return answered


def point_to_job(layout: OutputLayout, job_key: str, item_keys: Iterable[str]) -> None:
    """Record which job answers each item (jobs/by-item/<item_key>), for `earlier_answers` of later runs."""
    for key in item_keys:
        write_local_atomic(layout.answer_pointer(key), [job_key.encode("utf-8")])


def quality_of(answers: Answers) -> ItemQuality:
    """The item's `quality` in the report and in its spec's provenance, from the answer it ends with: the passing
    one, or for a flagged item the one its review file shows (review.chosen_attempt)."""
    chosen = answers.final if answers.final["verdict"] == PASS else review.chosen_attempt(answers.attempts)
    return ItemQuality(verdict=chosen["verdict"], failed_checks=chosen.get("failed_checks", []),
                       attempts=len(answers.attempts), words=chosen.get("words", 0),
                       finish_reason=chosen.get("finish_reason"),
                       cleaned=(chosen.get("raw") or "").strip() != chosen.get("text", ""))


def provenance(item: Item, entry: dict[str, Any], settings: Settings, run_id: str) -> dict[str, Any]:
    return {
        "model": settings.model_id,
        "backend": settings.backend,
        "content_key": item.key,
        "prompt_format": {"name": settings.format.name, "version": settings.format.version},
        # What `prompt` holds: "json", one compact JSON object following the format's schema; or "text".
        "format": "json" if settings.format.response_schema else "text",
        "tokens": {"prompt": item.tokens.prompt, "budget": item.tokens.budget,
                   "engine": entry.get("prompt_tokens"), "completion": entry.get("completion_tokens")},
        "hint": item.hint.model_dump(),
        "frames_sent": entry.get("frames_sent", 0),
        "sampling": {**settings.effective_sampling, "seed": entry.get("seed")},
        "quality": item.quality.model_dump(mode="json") if item.quality else None,
        "run_id": run_id,
        "source_path": item.source_path,
        "upsampled_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def write_output(item: Item, entry: dict[str, Any], text: str, layout: OutputLayout, settings: Settings,
                 run_id: str, decision: Review | None = None) -> Item:
    """Write the item's spec with `text` as its prompt (and a reviewer's `decision`); whatever goes wrong becomes its
    `failed` reason."""
    output = layout.spec_path(item.spec_id)
    try:
        # The spec as the model was asked (carried from discover), not the file as it is now: an edit made during
        # the run changes the content key, so the next run upsamples the edited prompt.
        spec = PromptSpec.model_validate(item.spec)
        record = provenance(item, entry, settings, run_id)
        if decision is not None:
            record["review"] = decision.model_dump(mode="json")
        write_json(output, upsampled_spec(spec, text, record))
    except OSError as exc:
        reason = (f"{Path(item.source_path).name}: could not write {output} ({exc}); free space or fix permissions "
                  "there, then re-run: the model's answer is kept and not paid again")
        return item.model_copy(update={"status": "failed", "reason": reason})
    return item.model_copy(update={"status": "upsampled", "output_path": str(output), "upsampled_prompt": text,
                                   "frames_sent": entry.get("frames_sent", 0), "review": decision})


def merge_item(item: Item, answers: Answers | None, job_error: str | None, layout: OutputLayout,
               settings: Settings, run_id: str) -> Item:
    """Turn one valid item's answers into its final status: `upsampled` (its spec written), `flagged` (its review
    file written) or `failed` with the reason; never the run's crash."""
    answers = answers or Answers()
    # The engine's own prompt count, whenever the engine saw the item (also when the answer could not be written);
    # an inference service's entry also says what made the count exact (runner endpoint).
    seen = answers.final or (answers.attempts[-1] if answers.attempts else answers.error) or {}
    checks = [check for entry in answers.attempts for check in entry.get("failed_checks", [])]
    counts = {"engine": seen.get("prompt_tokens"), "counted_by": seen.get("counted_by")}
    item = item.model_copy(update={"tokens": item.tokens.model_copy(update=counts), "attempt_checks": checks})
    if answers.final is None:
        reason = (answers.error or {}).get("reason") or job_error or (
            "the model job ended before this item's answer was settled" if answers.attempts
            else "the model job ended without an answer for this item")
        return item.model_copy(update={"status": "failed", "reason": reason})
    item = item.model_copy(update={"quality": quality_of(answers)})
    if answers.final["verdict"] == PASS:
        return write_output(item, answers.final, answers.final["text"], layout, settings, run_id)
    return flag(item, answers.attempts, layout, settings, run_id)


def flag(item: Item, attempts: list[dict[str, Any]], layout: OutputLayout, settings: Settings, run_id: str) -> Item:
    """A flagged answer goes to review/<spec_id>.json, with its checks, attempts and hint frames; never to specs/."""
    data = review.record(item, attempts, settings, run_id)
    output = layout.review_path(item.spec_id)
    try:
        write_json(output, data)
    except OSError as exc:
        return item.model_copy(update={"status": "failed", "reason": (
            f"{Path(item.source_path).name}: its answer was flagged and could not be written to {output} ({exc}); "
            "free space or fix permissions there, then re-run: the answers are kept and not paid again")})
    return review.flagged_item(item, data, output)


def apply_review(item: Item, result: Mapping[str, Any], layout: OutputLayout, settings: Settings,
                 run_id: str) -> Item:
    """A person's answer to the review of a flagged item (a HITLOperator result): approved or edited, its answer (or
    their text) becomes its spec and the review file goes; rejected, it stays flagged and the file records who
    rejected it; nobody answered in time, nothing changes."""
    output = layout.review_path(item.spec_id)
    try:
        data = read_json(output)
    except (OSError, ValueError) as exc:
        return item.model_copy(update={"status": "failed", "reason": f"its review file {output} is unreadable ({exc})"})
    decided = review.decision(result, data["answer"])
    if decided is None:
        return item
    decision, edited = decided
    if decision.action == "rejected":
        try:
            write_json(output, {**data, "review": decision.model_dump(mode="json")})
        except OSError as exc:  # it stays flagged either way; the reason says the rejection is not on file
            return item.model_copy(update={"review": decision, "reason": f"{item.reason}; the rejection could not "
                                                                         f"be recorded in {output} ({exc})"})
        return item.model_copy(update={"review": decision})
    entry = next((attempt for attempt in data["attempts"] if attempt.get("attempt") == data.get("chosen_attempt")),
                 data["attempts"][-1])
    quality = item.quality or ItemQuality.model_validate(data["quality"])
    written = write_output(item.model_copy(update={"quality": quality, "reason": None}), entry,
                           edited or data["answer"], layout, settings, run_id, decision)
    if written.status == "upsampled":
        output.unlink(missing_ok=True)
    return written


def flagged_records(items: list[Item], job_dirs: dict[str, Path], layout: OutputLayout, settings: Settings,
                    run_id: str) -> list[dict[str, Any]]:
    """The review file contents of the run's flagged items, before merge writes them: answers its jobs flagged,
    and items an earlier run flagged (their review file), for the review step to show."""
    results, _ = ledger_results(list(dict.fromkeys(job_dirs.values())))
    records = []
    for item in items:
        answers = results.get(item.key or "")
        if item.status == "valid" and answers and answers.final and answers.final["verdict"] == FLAGGED:
            item = item.model_copy(update={"quality": quality_of(answers)})
            records.append(review.record(item, answers.attempts, settings, run_id))
        elif item.status == "flagged":
            try:
                records.append(read_json(layout.review_path(item.spec_id)))
            except (OSError, ValueError):
                continue  # merge reports what became of it
    return records


def merge_items(items: list[Item], job_dirs: dict[str, Path], layout: OutputLayout, settings: Settings,
                run_id: str, reviewed: Mapping[str, Mapping[str, Any]] | None = None) -> list[Item]:
    """Every item leaves with a final status; valid ones take their job's answer (or `planned` in a dry run); a
    flagged one a person approved in review (`reviewed`: the HITL results by spec id) is written to specs/."""
    results, job_errors = ledger_results(list(dict.fromkeys(job_dirs.values())))  # each ledger read once
    merged = []
    for item in items:
        if item.status == "valid" and settings.dry_run:
            item = item.model_copy(update={"status": "planned"})
        elif item.status == "valid":
            job_dir = job_dirs.get(item.key)
            error = job_errors.get(job_dir.name) if job_dir else None
            item = merge_item(item, results.get(item.key), error, layout, settings, run_id)
        if item.status == "flagged" and (reviewed or {}).get(item.spec_id):
            item = apply_review(item, reviewed[item.spec_id], layout, settings, run_id)
        merged.append(item)
    return merged
