"""Bad and odd input, all in one real DAG run (see conftest.hostile_run): each bad spec is `invalid` with a reason
naming its file and the fix, the odd-but-valid ones are upsampled, and the invariants hold."""

from __future__ import annotations

import json
import re

import pytest

from tests.reliability.conftest import BAD, GOOD, XSS, HostileRun
from tests.reliability.invariants import assert_invariants, ledger_entries

pytestmark = pytest.mark.e2e


def output_spec(run: HostileRun, spec_id: str) -> dict:
    return json.loads((run.output_dir / "specs" / f"{spec_id}.json").read_text(encoding="utf-8"))


def test_invariants_hold(hostile_run):
    run = hostile_run
    assert_invariants(run.input_dir, run.output_dir, run.before, run.report,
                      outside=(run.root, run.outside_before), outputs=(run.output,))
    assert run.report["counts"] == {"discovered": len(BAD) + len(GOOD), "upsampled": len(GOOD), "cached": 0,
                                    "invalid": len(BAD), "failed": 0, "flagged": 0}


@pytest.mark.parametrize("stem", sorted(BAD))
def test_bad_spec_is_invalid_with_a_reason_naming_the_file(hostile_run, stem):
    item = hostile_run.item(f"{stem}.json")
    assert item["status"] == "invalid"
    assert item["reason"].startswith(f"{stem}.json: "), item["reason"]
    assert BAD[stem] in item["reason"], item["reason"]


def test_no_bad_spec_reached_the_model(hostile_run):
    sent = {entry["spec_id"] for entry in ledger_entries(hostile_run.output_dir)}
    assert sent == set(GOOD.values())


@pytest.mark.parametrize("file_name", sorted(GOOD))
def test_odd_but_valid_spec_is_upsampled(hostile_run, file_name):
    item = hostile_run.item(file_name)
    assert item["status"] == "upsampled", item["reason"]
    original = json.loads((hostile_run.input_dir / file_name).read_text(encoding="utf-8"))
    out = output_spec(hostile_run, GOOD[file_name])
    assert item["output_path"] == str(hostile_run.output_dir / "specs" / f"{GOOD[file_name]}.json")
    assert out["is_upsampled"] is True and out["prompt"].strip()
    assert out["parent_prompt_text"] == original["prompt"]
    assert 0 < item["tokens"]["prompt"] <= item["tokens"]["budget"]


@pytest.mark.parametrize(("file_name", "shown_width", "shown_height"), [
    ("a;rm -rf x $(touch pwned).json", 16, 16),  # tiny, square
    ("html.json", 32, 18),  # tiny, 16:9
    ("dup_a.json", 3840, 2160),  # 4K
    ("portrait.json", 720, 1280),
    ("phone.json", 720, 1280),  # stored 1280x720, rotated 90 degrees by metadata
])
def test_hint_keeps_the_shown_aspect_and_never_exceeds_the_source(hostile_run, file_name, shown_width, shown_height):
    hint = hostile_run.item(file_name)["hint"]
    assert hint["frames"] == 2
    assert hint["width"] <= shown_width and hint["height"] <= shown_height
    assert hint["width"] / hint["height"] == pytest.approx(shown_width / shown_height, rel=0.05)


def test_too_long_prompt_reason_has_the_numbers(hostile_run):
    reason = hostile_run.item("too_long.json")["reason"]
    match = re.search(r"needs (\d+) prompt tokens .* budget of (\d+)", reason)
    assert match, reason
    assert int(match[1]) > int(match[2]) == 4096 - 64


def test_duplicate_id_keeps_the_first_output(hostile_run):
    first = json.loads((hostile_run.input_dir / "dup_a.json").read_text())
    out = output_spec(hostile_run, "dup")
    assert out["parent_prompt_text"] == first["prompt"]
    assert out["metadata"]["upsampling"]["source_path"] == str(hostile_run.input_dir / "dup_a.json")
    assert hostile_run.item("dup_b.json")["spec_id"] == "dup"


def test_unknown_fields_are_kept_in_the_output(hostile_run):
    out = output_spec(hostile_run, "dup")
    assert out["guidance"] == 7 and out["nested"] == {"a": [1, None, "x"]} and out["x-custom"] == "keep me"


def test_hostile_strings_are_kept_verbatim_as_data(hostile_run):
    """Prompts are data: kept byte for byte in the output spec, whatever shell or HTML they hold."""
    assert XSS in output_spec(hostile_run, "html")["parent_prompt_text"]
    metachar = output_spec(hostile_run, GOOD["a;rm -rf x $(touch pwned).json"])
    assert metachar["name"] == "x'; touch pwned_name; echo '"
    assert "$(touch " in metachar["parent_prompt_text"]
