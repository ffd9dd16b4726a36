"""The real DAG through `airflow dags test`, with real ffmpeg and the real local model (SmolLM2 via llama.cpp)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from include.cosmos_upsample.prompt_formats import PROMPT_FORMATS
from include.cosmos_upsample.tokens import PixtralCounter
from tests.helpers import latest_report, make_video, run_dag, write_spec

pytestmark = pytest.mark.e2e

GOOD = ("good_wide", "good_portrait")
# spec file stem -> words its `invalid` reason must contain
BAD = {
    "broken": "broken JSON",
    "a_list": "expected an object",
    "no_prompt": "missing prompt",
    "missing_video": "not found",
    "empty_video": "empty (0 bytes)",
    "corrupt_video": "unreadable video",
    "audio_only": "no video stream",
    "escapes": "leaves input_dir",
    "too_long": "over the budget",
}


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    folder = root / "specs"
    make_video(folder / "wide.mp4", 640, 360)
    make_video(folder / "portrait.mp4", 180, 320)
    write_spec(folder, "good_wide", input_video_path="wide.mp4", name="wide", guidance=7)
    write_spec(folder, "good_portrait", input_video_path="portrait.mp4")
    (folder / "broken.json").write_text('{"prompt": "A cup",')
    (folder / "a_list.json").write_text("[1, 2]")
    (folder / "no_prompt.json").write_text('{"id": "no_prompt", "input_video_path": "wide.mp4"}')
    write_spec(folder, "missing_video", input_video_path="nope.mp4")
    (folder / "empty.mp4").write_bytes(b"")
    write_spec(folder, "empty_video", input_video_path="empty.mp4")
    (folder / "corrupt.mp4").write_bytes(b"\x00\x01garbage" * 500)
    write_spec(folder, "corrupt_video", input_video_path="corrupt.mp4")
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=duration=1", str(folder / "tone.m4a")],
                   check=True)
    write_spec(folder, "audio_only", input_video_path="tone.m4a")
    make_video(root / "outside.mp4", 64, 64)
    write_spec(folder, "escapes", input_video_path="../outside.mp4")
    write_spec(folder, "too_long", input_video_path="wide.mp4", prompt="A red cup " * 3000)
    return folder


@pytest.fixture(scope="module")
def first_run(airflow_home, input_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("out")
    before = tree_digest(input_dir)
    run_dag(airflow_home, {"input_dir": str(input_dir), "output_dir": str(output_dir)})
    return output_dir, latest_report(output_dir), before


class TestLocalRun:
    def test_every_spec_file_is_exactly_one_item(self, first_run, input_dir):
        _, report, _ = first_run
        assert sorted(item["source_path"] for item in report["items"]) == sorted(
            str(path) for path in input_dir.glob("*.json"))
        assert report["counts"] == {"discovered": 11, "upsampled": 2, "cached": 0, "invalid": 9, "failed": 0,
                                    "flagged": 0}

    def test_bad_inputs_have_reasons_naming_the_file(self, first_run):
        _, report, _ = first_run
        items = {Path(item["source_path"]).stem: item for item in report["items"]}
        for stem, words in BAD.items():
            assert items[stem]["status"] == "invalid", stem
            assert items[stem]["reason"].startswith(f"{stem}.json"), items[stem]["reason"]
            assert words in items[stem]["reason"], items[stem]["reason"]

    def test_outputs_are_upsampled_specs_with_provenance(self, first_run, input_dir):
        output_dir, report, _ = first_run
        for spec_id in GOOD:
            original = json.loads((input_dir / f"{spec_id}.json").read_text())
            out = json.loads((output_dir / "specs" / f"{spec_id}.json").read_text())
            assert out["is_upsampled"] is True
            assert out["parent_prompt_text"] == original["prompt"]
            assert len(out["prompt"].split()) >= 5 and out["prompt"] != original["prompt"]
            upsampling = out["metadata"]["upsampling"]
            assert upsampling["backend"] == "llama_cpp" and upsampling["model"] == "smollm2"
            assert upsampling["run_id"] == report["run_id"]
            # The count planned before the run is exactly what llama.cpp reported it received.
            assert upsampling["tokens"]["prompt"] == upsampling["tokens"]["engine"]
        assert json.loads((output_dir / "specs" / "good_wide.json").read_text())["guidance"] == 7

    def test_report_items_carry_tokens_and_hint(self, first_run):
        _, report, _ = first_run
        for item in report["items"]:
            assert item["tokens"]["budget"] == 3796
            if item["status"] == "upsampled":
                assert 0 < item["tokens"]["prompt"] <= 3796
                assert item["hint"]["frames"] == 2 and item["hint"]["width"] and item["frames_sent"] == 0
                assert Path(item["output_path"]).is_file()
        assert Path(str(next(iter((first_run[0] / "reports").glob("*.html"))))).read_text().count("<tr>") >= 12

    def test_inputs_are_untouched(self, first_run, input_dir):
        assert tree_digest(input_dir) == first_run[2]

    def test_second_run_is_fully_cached_and_calls_no_model(self, first_run, airflow_home, input_dir):
        output_dir, _, _ = first_run
        ledgers_before = tree_digest(output_dir / "jobs")
        run_dag(airflow_home, {"input_dir": str(input_dir), "output_dir": str(output_dir)})
        report = latest_report(output_dir)
        assert report["counts"] == {"discovered": 11, "upsampled": 0, "cached": 2, "invalid": 9, "failed": 0,
                                    "flagged": 0}
        assert tree_digest(output_dir / "jobs") == ledgers_before


def test_dry_run_with_vllm_counts_exact_pixtral_tokens(airflow_home, input_dir, tmp_path):
    run_dag(airflow_home, {"input_dir": str(input_dir), "output_dir": str(tmp_path), "backend": "vllm",
                           "dry_run": True})
    report = latest_report(tmp_path)
    assert report["counts"]["planned"] == 2 and report["counts"]["upsampled"] == 0
    # vLLM's default format is the Cosmos upsampler's: the frames first, then the raw prompt.
    counter, cosmos = PixtralCounter(images_first=True), PROMPT_FORMATS["cosmos_upsampler"]
    for item in report["items"]:
        if item["status"] != "planned":
            continue
        hint = item["hint"]
        expected = counter.count(cosmos.user_text(item["original_prompt"]), hint["width"], hint["height"], 2)
        assert item["tokens"]["prompt"] == expected <= item["tokens"]["budget"]
        assert item["frames_sent"] == 2
    assert not (tmp_path / "specs").exists() and not (tmp_path / "hints").exists()


def test_killed_worker_resumes_without_redoing_finished_items(airflow_home, tmp_path):
    folder = tmp_path / "in"
    make_video(folder / "clip.mp4", 320, 180)
    for index in range(3):
        write_spec(folder, f"spec_{index}", input_video_path="clip.mp4")
    out = tmp_path / "out"
    # The worker SIGKILLs itself after two new answers: the first attempt dies mid-job, the retry finishes it.
    run_dag(airflow_home, {"input_dir": str(folder), "output_dir": str(out)},
            extra_env={"COSMOS_UPSAMPLE_WORKER_DIE_AFTER": "2"})
    report = latest_report(out)
    assert report["counts"]["upsampled"] == 3
    [ledger] = list((out / "jobs").glob("*/ledger.jsonl"))
    calls = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert sorted(call["spec_id"] for call in calls) == ["spec_0", "spec_1", "spec_2"]
    assert len({call["worker_run"] for call in calls}) == 2
