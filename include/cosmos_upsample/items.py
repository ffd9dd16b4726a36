"""One record per discovered spec file, carried from discover to the report (as JSON files, never in XCom)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field

from include.cosmos_upsample.layout import read_json, write_json_atomic
from include.cosmos_upsample.report_model import FINAL_STATUSES, FinalStatus, Hint, ReportItem, Tokens

__all__ = ["FINAL_STATUSES", "Hint", "Item", "Status", "Tokens", "failed_item", "invalid_item", "load_items",
           "save_items"]

# `valid` lives between validation and merge; every item ends the run in one of FINAL_STATUSES.
Status = Literal["valid", FinalStatus]
# Internal fields: needed by later stages, left out of the report.
INTERNAL_FIELDS = {"key", "text", "frame_paths", "spec", "attempt_checks"}


class Item(ReportItem):
    """A report item plus what the stages between discover and merge need."""

    model_config = ConfigDict(extra="ignore")

    status: Status
    key: str | None = None
    text: str | None = None
    frame_paths: list[str] = Field(default_factory=list)
    # The PromptSpec as discover read it (the bytes its key hashes): what the model is asked and the output is made
    # from, never the file re-read later (it may have been edited meanwhile; the next run picks the edit up).
    spec: dict[str, Any] | None = None
    attempt_checks: list[str] = Field(default_factory=list)  # every failed check of every judged answer

    def report_item(self) -> ReportItem:
        return ReportItem.model_validate(self.model_dump(exclude=INTERNAL_FIELDS))


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
