"""The quality gate through the stages, in process, with the real local model (SmolLM2 via llama.cpp): flagged
answers are asked again and end in review/, never in specs/; a plain re-run leaves them flagged without a model call;
a reviewer's decisions (in the HITLOperator's result shape) are merged; `retry_flagged` asks again.

The review step's real HITL task, answered over the REST API, is in tests/deploy.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from include.cosmos_upsample import stages
from include.cosmos_upsample.report_model import RunReport
from include.cosmos_upsample.settings import DAG_ID
from tests.helpers import make_video, write_spec

# Every answer is too long for max_words 2: flagged whatever SmolLM2 writes. One re-ask: two attempts per item.
FLAGGING = {"max_output_tokens": 16, "quality": {"max_words": 2, "min_words": 0}, "quality_retries": 1}
SPECS = ("edit_me", "reject_me", "nobody_answers")


def run_stages(input_dir: Path, output_dir: Path, run_id: str, review_result=lambda _index: None,
               **params) -> tuple[RunReport, list[dict]]:
    params = {"input_dir": str(input_dir), "output_dir": str(output_dir), **FLAGGING, **params}
    run_dir, chunks = stages.discover(params, run_id, lambda _key: None, {})
    for index, chunk in enumerate(chunks):
        job = stages.batch(run_dir, chunk, stages.validate_chunk(run_dir, chunk))
        stages.upsample(run_dir, job, index, {})
    requests = stages.review_requests(str(run_dir), run_id, "http://airflow.example")
    stages.merge(str(run_dir), run_id, review_result)
    location = stages.report(str(run_dir), run_id, DAG_ID, "2026-01-01T00:00:00+00:00")
    return RunReport.from_text(Path(location["report_json"]).read_text()), requests


def ledger_lines(output_dir: Path) -> list[dict]:
    return [json.loads(line) for ledger in sorted((output_dir / "jobs").glob("*/ledger.jsonl"))
            for line in ledger.read_text().splitlines()]


def answered(action: str, text: str | None = None) -> dict:
    """What HITLOperator returns (HITLTriggerEventSuccessPayload) when a person answered."""
    return {"chosen_options": [action], "params_input": {"answer": text} if text else {},
            "responded_at": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
            "responded_by_user": {"id": "7", "name": "reviewer"}}


@pytest.fixture(scope="module")
def flagged(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    input_dir, output_dir = root / "in", root / "out"
    make_video(input_dir / "clip.mp4", 320, 180)
    for stem in SPECS:
        write_spec(input_dir, stem, input_video_path="clip.mp4", prompt=f"A robot arm lifts a {stem} cup.")
    report, requests = run_stages(input_dir, output_dir, "manual__first")
    return input_dir, output_dir, report, requests


def test_flagged_answers_are_asked_again_then_go_to_review_never_to_specs(flagged):
    _, output_dir, report, requests = flagged
    assert requests == []  # review none: nobody is asked
    assert report.counts.flagged == 3 and report.counts.upsampled == 0
    assert report.quality.model_dump() == {"passed": 0, "flagged": 3, "retried": 3,
                                           "by_check": report.quality.by_check}
    assert report.quality.by_check["too_long"] == 6  # every attempt of every item
    assert not (output_dir / "specs").exists()
    for item in report.items:
        assert item.status == "flagged" and item.quality.attempts == 2 and "too_long" in item.quality.failed_checks
        assert item.output_path == str(output_dir / "review" / f"{item.spec_id}.json")
        data = json.loads(Path(item.output_path).read_text())
        assert data["content_key"] and data["answer"] == item.upsampled_prompt
        assert [attempt["attempt"] for attempt in data["attempts"]] == [1, 2]
        assert all(Path(path).is_file() for path in data["hint"]["paths"]) and len(data["hint"]["paths"]) == 2
    lines = ledger_lines(output_dir)
    assert sorted((line["spec_id"], line["attempt"]) for line in lines) == sorted(
        (spec, attempt) for spec in SPECS for attempt in (1, 2))
    assert {line["seed"] for line in lines if line["attempt"] == 2} == {1}  # instruction's seed 0, then a new one


def test_a_plain_re_run_leaves_them_flagged_without_asking_the_model(flagged):
    input_dir, output_dir, _, _ = flagged
    before = ledger_lines(output_dir)
    report, _ = run_stages(input_dir, output_dir, "manual__again")
    assert report.counts.flagged == 3
    assert ledger_lines(output_dir) == before
    assert all("review" in item.reason for item in report.items)


def test_review_decisions_are_merged_and_an_approved_answer_is_cached_next_time(flagged):
    input_dir, output_dir, _, _ = flagged
    results = {"edit_me": answered("Approve", "A robot arm lifts a cup, edited by a person."),
               "reject_me": answered("Reject")}
    asked: list[str] = []

    def review_result(index):
        spec_id = asked[index]
        return results.get(spec_id)

    # The requests are made before merge; the HITL task's map index is their position.
    params = {"review": "flagged"}
    run_dir, chunks = stages.discover({"input_dir": str(input_dir), "output_dir": str(output_dir), **FLAGGING,
                                       **params}, "manual__review", lambda _key: None, {})
    for index, chunk in enumerate(chunks):
        stages.upsample(run_dir, stages.batch(run_dir, chunk, stages.validate_chunk(run_dir, chunk)), index, {})
    requests = stages.review_requests(str(run_dir), "manual__review", "http://airflow.example")
    asked.extend(json.loads((Path(run_dir) / "review.json").read_text()))
    assert sorted(asked) == sorted(SPECS) and len(requests) == 3
    first = requests[asked.index("edit_me")]
    assert first["subject"].startswith("Review the flagged answer for edit_me (") and "too_long" in first["subject"]
    assert "```text\nA robot arm lifts a edit_me cup.\n```" in first["body"]
    assert "http://airflow.example/upsample-reports/runs/manual__review/items/edit_me/frames/1" in first["body"]
    assert first["params"] == {"answer": json.loads((output_dir / "review" / "edit_me.json").read_text())["answer"]}
    assert first["response_timeout"] == dt.timedelta(seconds=86400)

    stages.merge(str(run_dir), "manual__review", review_result)
    report = RunReport.from_text(Path(stages.report(str(run_dir), "manual__review", DAG_ID, "t0")["report_json"])
                                 .read_text())
    items = {item.spec_id: item for item in report.items}
    assert items["edit_me"].status == "upsampled" and items["edit_me"].review.action == "edited"
    assert items["edit_me"].reason is None  # no longer flagged: the review and quality blocks tell its story
    spec = json.loads((output_dir / "specs" / "edit_me.json").read_text())
    assert spec["prompt"] == "A robot arm lifts a cup, edited by a person." and spec["is_upsampled"] is True
    assert spec["metadata"]["upsampling"]["review"] == {"action": "edited", "by": "reviewer",
                                                        "at": "2026-01-02T03:04:05+00:00"}
    assert spec["metadata"]["upsampling"]["quality"]["verdict"] == "flagged"
    assert not (output_dir / "review" / "edit_me.json").exists()
    assert items["reject_me"].status == "flagged" and items["reject_me"].review.action == "rejected"
    assert json.loads((output_dir / "review" / "reject_me.json").read_text())["review"]["by"] == "reviewer"
    assert items["nobody_answers"].status == "flagged" and items["nobody_answers"].review is None
    assert not (output_dir / "specs" / "reject_me.json").exists()

    before = ledger_lines(output_dir)
    again, _ = run_stages(input_dir, output_dir, "manual__after_review")
    statuses = {item.spec_id: item.status for item in again.items}
    assert statuses == {"edit_me": "cached", "reject_me": "flagged", "nobody_answers": "flagged"}
    assert ledger_lines(output_dir) == before
    # The re-run took the flagged items from their review files: the reviewer's rejection is still on record.
    assert json.loads((output_dir / "review" / "reject_me.json").read_text())["review"]["by"] == "reviewer"


def test_retry_flagged_asks_the_model_again_for_flagged_items_only(flagged):
    input_dir, output_dir, _, _ = flagged
    before = ledger_lines(output_dir)
    report, _ = run_stages(input_dir, output_dir, "manual__retry", retry_flagged=True)
    new = [line for line in ledger_lines(output_dir) if line not in before]
    assert sorted((line["spec_id"], line["attempt"]) for line in new) == [
        ("nobody_answers", 1), ("nobody_answers", 2), ("reject_me", 1), ("reject_me", 2)]
    assert {item.spec_id: item.status for item in report.items}["edit_me"] == "cached"


def test_max_flagged_ratio_fails_the_run_after_writing_its_report(flagged):
    from include.cosmos_upsample.report import TooManyFailures

    input_dir, output_dir, _, _ = flagged
    with pytest.raises(TooManyFailures, match=r"ended flagged by the quality checks, more than max_flagged_ratio=0\.5"):
        run_stages(input_dir, output_dir, "manual__ratio", max_flagged_ratio=0.5)
    report = json.loads((output_dir / "reports" / "manual__ratio.json").read_text())
    assert report["state"] == "failed" and report["counts"]["flagged"] >= 2
