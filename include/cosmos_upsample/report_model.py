"""The run report as a typed model: the report task writes it, the UI plugin reads it (keys: DESIGN.md "Report JSON").

Its JSON Schema is committed as docs/report.schema.json; regenerate it with
`python -m include.cosmos_upsample.report_model > docs/report.schema.json` (a test checks the two agree).

Reports are read back with the keys they were written with (`to_json` leaves out what a report never set), so a report
written before a key was added still reads, and the plugin's JSON API returns it as it is on disk.
"""

from __future__ import annotations

import json
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

# The statuses an item can end a run with; `planned` marks valid items of a dry run; `flagged`: answered, but the
# answer failed the quality checks after every re-ask (it is in review/, never in specs/).
FinalStatus = Literal["upsampled", "cached", "invalid", "failed", "planned", "flagged"]
FINAL_STATUSES: tuple[str, ...] = get_args(FinalStatus)
# Keys of `counts`: every report has these (reports written before `flagged` was always counted may lack it),
# `planned` only when a dry run planned items.
COUNT_KEYS: tuple[str, ...] = ("discovered", "upsampled", "cached", "invalid", "failed", "flagged")


class Tokens(BaseModel):
    prompt: int | None = None  # planned: the exact count of what the model receives
    budget: int
    engine: int | None = None  # what the engine itself counted; None when no model ran
    # Runner endpoint: what made the count exact. "planner": the planner's tokenizer is the served model's (the
    # service's /tokenize agreed); "service": it is not, so the service's /tokenize counted each request before it
    # was sent; "service_usage": the service has no /tokenize, only its own count after answering (`engine`) exists.
    counted_by: str | None = None


class Hint(BaseModel):
    width: int | None = None
    height: int | None = None
    frames: int = 0
    source: str | None = None  # input_video, vis, edge, seg or depth
    times: list[float] = Field(default_factory=list)  # seconds into the clip


class ItemQuality(BaseModel):
    """How the item's answer fared in the quality gate (include/cosmos_upsample/quality.py)."""

    verdict: Literal["pass", "flagged"]
    failed_checks: list[str] = Field(default_factory=list)
    attempts: int = 1  # answers judged: 1 + re-asks
    words: int = 0
    finish_reason: str | None = None
    cleaned: bool = False  # cleaning changed the engine's text (a preamble, quotes, markdown removed)


class Review(BaseModel):
    """A person's decision on a flagged answer in the review step (`metadata.upsampling.review` of the spec)."""

    action: Literal["approved", "edited", "rejected"]
    by: str | None = None
    at: str | None = None  # ISO 8601


class ReportItem(BaseModel):
    """One discovered spec file, as the report shows it."""

    model_config = ConfigDict(extra="allow")

    spec_id: str
    source_path: str
    status: FinalStatus
    reason: str | None = None  # why, for invalid and failed
    tokens: Tokens
    hint: Hint = Field(default_factory=Hint)
    output_path: str | None = None
    name: str = ""
    original_prompt: str | None = None
    upsampled_prompt: str | None = None
    frames_sent: int = 0  # 0 for a text-only model: the hint was sized but not sent
    quality: ItemQuality | None = None  # None: no answer was judged in this run (invalid, cached, dry run)
    review: Review | None = None


class Counts(BaseModel):
    model_config = ConfigDict(extra="allow")

    discovered: int
    upsampled: int
    cached: int
    invalid: int
    failed: int
    flagged: int = 0  # older reports wrote it only when items ended flagged
    planned: int | None = None

    def as_dict(self) -> dict[str, int]:
        """The counts the report holds (`planned` only in dry runs; older reports may lack `flagged`), in the order of
        the JSON."""
        return self.model_dump(exclude_unset=True)

    def of(self, key: str) -> int:
        return getattr(self, key, None) or 0


class TokensEqual(BaseModel):
    """Items whose planned prompt count equals the engine's own count, out of those the engine counted."""

    equal: int
    compared: int


class RunQuality(BaseModel):
    """The quality gate over the run's answered items: `passed` and `flagged` items (by their final verdict; an item
    approved in review counts as flagged here), `retried` items asked more than once, and `by_check`: how many judged
    answers (every attempt) failed each check."""

    passed: int
    flagged: int
    retried: int
    by_check: dict[str, int] = Field(default_factory=dict)


class Resolved(BaseModel):
    """What the run's settings came to where they were left to a default."""

    model_config = ConfigDict(extra="allow")

    prompt_format: str
    frame_sampling: str
    sampling: dict[str, Any]
    engine: dict[str, Any]


class RunTrigger(BaseModel):
    """What started the run. `schedule`: the @daily schedule; `manual`: the trigger form, the REST API or
    `airflow dags test`; `asset_event`: bucket events (events.py), the run upsamples exactly `objects`, the
    announced spec objects under `prefix`; `backfill`; `other`: any other Airflow run type (`run_type`)."""

    kind: Literal["schedule", "manual", "asset_event", "backfill", "other"]
    run_type: str | None = None  # Airflow's DagRunType value
    prefix: str | None = None  # asset_event: the watched bucket prefix, the run's input_dir
    objects: list[str] = Field(default_factory=list)  # asset_event: s3:// URLs of the announced specs
    ignored: list[str] = Field(default_factory=list)  # asset_event: what the events held besides, and why

    @property
    def label(self) -> str:
        """One line for people (the report page and the UI plugin)."""
        if self.kind == "asset_event":
            count = len(self.objects)
            return f"bucket event: {count} spec{'s' if count != 1 else ''} announced under {self.prefix or '?'}"
        return {"schedule": "the @daily schedule", "manual": "manual trigger", "backfill": "backfill"}.get(
            self.kind, f"Airflow run type {self.run_type}")


class RunReport(BaseModel):
    """`reports/<run_id>.json`."""

    model_config = ConfigDict(extra="allow")

    run_id: str
    dag_id: str
    started_at: str | None  # ISO 8601
    finished_at: str | None
    params: dict[str, Any]  # the run's settings as resolved (older runs: older settings)
    resolved: Resolved | None = None
    counts: Counts
    tokens_equal: TokensEqual | None = None
    quality: RunQuality | None = None
    items: list[ReportItem]
    stages: dict[str, float]  # stage name -> seconds of work
    # failed: more than max_failure_ratio of the specs failed, or more than max_flagged_ratio ended flagged
    state: Literal["success", "failed"] | None = None
    backend: str | None = None
    model: str | None = None
    dry_run: bool | None = None
    trigger: RunTrigger | None = None  # what started the run (reports before it: none)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)

    @classmethod
    def from_text(cls, text: str | bytes) -> RunReport:
        """Through json.loads, not pydantic's JSON parser: a spec file name that is not UTF-8 is written as a lone
        surrogate escape (\\udcXX), which pydantic's parser refuses."""
        return cls.model_validate(json.loads(text))


def json_schema() -> dict[str, Any]:
    return RunReport.model_json_schema(mode="serialization")


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(schema_text(), end="")
