"""One record per discovered spec file, carried from discover to the report (as JSON files, never in XCom)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from include.cosmos_upsample.layout import read_json, write_json_atomic

# `valid` lives between validation and merge; `planned` marks valid items of a dry run.
Status = Literal["valid", "upsampled", "cached", "invalid", "failed", "planned"]
FINAL_STATUSES = ("upsampled", "cached", "invalid", "failed", "planned")
# Internal fields: needed by later stages, left out of the report.
INTERNAL_FIELDS = {"key", "text", "frame_paths"}


class Tokens(BaseModel):
    prompt: int | None = None  # planned: the exact count of what the model receives
    budget: int
    engine: int | None = None  # what the engine itself counted; None when no model ran


class Hint(BaseModel):
    width: int | None = None
    height: int | None = None
    frames: int = 0
    source: str | None = None  # input_video, vis, edge, seg or depth
    times: list[float] = Field(default_factory=list)  # seconds into the clip


class Item(BaseModel):
    spec_id: str
    source_path: str
    status: Status
    reason: str | None = None
    tokens: Tokens
    hint: Hint = Field(default_factory=Hint)
    output_path: str | None = None
    name: str = ""
    original_prompt: str | None = None
    upsampled_prompt: str | None = None
    frames_sent: int = 0
    key: str | None = None
    text: str | None = None
    frame_paths: list[str] = Field(default_factory=list)

    def report_dict(self) -> dict:
        return self.model_dump(mode="json", exclude=INTERNAL_FIELDS)


def invalid_item(source: Path, reason: str, budget: int, spec_id: str | None = None) -> Item:
    return Item(spec_id=spec_id or source.stem, source_path=str(source), status="invalid", reason=reason,
                tokens=Tokens(budget=budget))


def failed_item(source: Path, reason: str, budget: int, spec_id: str | None = None) -> Item:
    """Not the input's fault (a full or read-only output folder, a crash): counts as failed, a re-run redoes it."""
    return invalid_item(source, reason, budget, spec_id).model_copy(update={"status": "failed"})


def save_items(path: Path, items: list[Item]) -> None:
    write_json_atomic(path, [item.model_dump(mode="json") for item in items])


def load_items(path: Path) -> list[Item]:
    return [Item.model_validate(raw) for raw in read_json(path)]
