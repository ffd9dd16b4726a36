"""Flagged answers and the review step: the review file `output_dir/review/<spec_id>.json`, the requests the DAG's
human-in-the-loop task shows a reviewer (Airflow's HITLOperator, standard provider), and the reviewer's decisions.

A flagged item's answer never goes to specs/ by itself: merge writes this file instead, and only a person's approval
(`review: flagged`) turns it into an upsampled spec, with `metadata.upsampling.review` = {action, by, at}. No answer
within `review_timeout_seconds` leaves it flagged. No Airflow at import: the DAG's tasks call these functions.
"""

from __future__ import annotations

import datetime as dt
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from include.cosmos_upsample.items import Item
from include.cosmos_upsample.report_model import Review
from include.cosmos_upsample.settings import Settings

# The reviewer's choices; the timeout takes REJECT as its default, so a request never waits forever, and a timeout
# (no responder) leaves the item flagged without recording a person's rejection.
APPROVE, REJECT = "Approve", "Reject"
# The form field holding the answer, filled with the model's: changed, it is merged as the reviewer's edit.
ANSWER_PARAM = "answer"
# Characters per line of the prompt and answer as the review request shows them.
DISPLAY_WIDTH = 100
# What an attempt keeps in the review file (the ledger line's other fields are the worker's bookkeeping).
ATTEMPT_FIELDS = ("attempt", "seed", "verdict", "failed_checks", "reason", "finish_reason", "raw", "text", "words",
                  "prompt_tokens", "completion_tokens", "frames_sent")


def chosen_attempt(attempts: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The attempt shown for review: the one that failed the fewest checks, the latest of equals."""
    return min(reversed(attempts), key=lambda entry: len(entry.get("failed_checks", [])))


def record(item: Item, attempts: Sequence[Mapping[str, Any]], settings: Settings, run_id: str) -> dict[str, Any]:
    """The review file of a flagged item: everything a person needs to judge it, and the content key that keeps it
    flagged on a plain re-run."""
    chosen = chosen_attempt(attempts)
    return {
        "spec_id": item.spec_id,
        "source_path": item.source_path,
        "content_key": item.key,
        "prompt": item.original_prompt,
        "answer": chosen.get("text", ""),
        "failed_checks": list(chosen.get("failed_checks", [])),
        "attempts": [{name: entry.get(name) for name in ATTEMPT_FIELDS} for entry in attempts],
        "chosen_attempt": chosen.get("attempt"),
        "hint": {**item.hint.model_dump(mode="json"), "paths": list(item.frame_paths)},
        "tokens": item.tokens.model_dump(mode="json"),
        "quality": item.quality.model_dump(mode="json") if item.quality else None,
        "model": settings.model_id,
        "backend": settings.backend,
        "prompt_format": settings.format.name,
        "run_id": run_id,
        "flagged_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def reason(data: Mapping[str, Any]) -> str:
    attempts = len(data.get("attempts", []))
    return (f"the answer failed the quality checks ({', '.join(data['failed_checks']) or 'none'}) after {attempts} "
            f"attempt{'s' if attempts != 1 else ''}; it waits in review/{data['spec_id']}.json, not in specs/")


def flagged_item(item: Item, data: Mapping[str, Any], output: Any) -> Item:
    """The item as the report shows a flagged answer: its review file as the output, the answer beside the prompt."""
    return item.model_copy(update={"status": "flagged", "reason": reason(data), "output_path": str(output),
                                   "upsampled_prompt": data.get("answer")})


# ---- the review step (Airflow's HITLOperator) ----------------------------------------------------------------------


def _fenced(text: str) -> str:
    """Text from a spec or the model shown verbatim in the Markdown body: a code fence longer than any backtick run
    in it, so nothing in it is read as Markdown (links, images, HTML); long lines wrapped for reading (the answer
    field of the form holds the exact text)."""
    fence = "`" * max(3, _longest_backticks(text) + 1)
    wrapped = "\n".join(textwrap.fill(line, DISPLAY_WIDTH) or "" for line in text.splitlines())
    return f"{fence}text\n{wrapped}\n{fence}"


def _longest_backticks(text: str) -> int:
    longest = run = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    return longest


def frame_url(links_base: str, run_id: str, spec_id: str, index: int) -> str:
    """The UI plugin's route serving a hint frame of a run's item (signed-in users only)."""
    return f"{links_base}/upsample-reports/runs/{quote(run_id, safe='')}/items/{quote(spec_id, safe='')}/frames/{index}"


def request(data: Mapping[str, Any], run_id: str, links_base: str, timeout_seconds: float) -> dict[str, Any]:
    """The HITLOperator arguments of one flagged item (mapped with expand_kwargs): values from XCom are not rendered
    as templates, and the spec's strings sit in code fences, so neither Jinja nor Markdown reads them."""
    spec_id = data["spec_id"]
    frames = range(len(data.get("hint", {}).get("paths", [])))
    lines = [
        f"**Spec** `{spec_id}`, flagged by: **{', '.join(data['failed_checks']) or 'none'}** after "
        f"{len(data.get('attempts', []))} attempt(s).",
        "", "**Prompt**", "", _fenced(data.get("prompt") or ""),
        "", "**Answer** (approve it as it is, or edit it in the form below and approve)", "",
        _fenced(data.get("answer") or ""),
    ]
    if frames:
        urls = [frame_url(links_base, run_id, spec_id, index) for index in frames]
        lines += ["", "**Hint frames the model saw**: " + " ".join(f"[frame {i + 1}]({url})" for i, url in
                                                                     enumerate(urls)), ""]
        lines += [f"![frame {i + 1}]({url})" for i, url in enumerate(urls)]
    return {
        "subject": f"Review the flagged answer for {spec_id} ({', '.join(data['failed_checks']) or 'flagged'})",
        "body": "\n".join(lines),
        "params": {ANSWER_PARAM: data.get("answer") or ""},
        "response_timeout": dt.timedelta(seconds=timeout_seconds),
    }


def decision(result: Mapping[str, Any] | None, answer: str) -> tuple[Review, str | None] | None:
    """A HITLOperator result as a review: (the decision, the reviewer's own text when edited); None when nobody
    answered (the task timed out or failed): the item stays flagged."""
    if not result or not result.get("responded_by_user"):
        return None
    user = result["responded_by_user"]
    by = str(user.get("name") or user.get("id") or "") if isinstance(user, Mapping) else str(user)
    at = result.get("responded_at")
    at = at.isoformat(timespec="seconds") if isinstance(at, dt.datetime) else (str(at) if at else None)
    if REJECT in (result.get("chosen_options") or []) or APPROVE not in (result.get("chosen_options") or []):
        return Review(action="rejected", by=by, at=at), None
    edited = str((result.get("params_input") or {}).get(ANSWER_PARAM) or "").strip()
    if edited and edited != answer.strip():
        return Review(action="edited", by=by, at=at), edited
    return Review(action="approved", by=by, at=at), None
