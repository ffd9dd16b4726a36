"""The six stages called in process, as the DAG's tasks call them, over the whole bad-input table (fast tier).

The same folder as tests/reliability's one `airflow dags test` run, without Airflow's start-up: every bad spec gets
its own reason, the odd-but-valid ones are upsampled by the real local model, inputs stay byte-identical, and a
second pass is fully cached. Real ffmpeg, the real tokenizer, the real worker; no scheduler.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from include.cosmos_upsample import stages
from include.cosmos_upsample.jobformat import Ledger
from include.cosmos_upsample.report_model import RunReport
from include.cosmos_upsample.settings import DAG_ID
from tests.helpers import RELAXED_QUALITY
from tests.reliability.conftest import BAD, GOOD, make_specs, make_videos
from tests.reliability.invariants import tree_digest

# Short answers: these tests are about the pipeline, not the prose (the quality gate's content checks off).
PARAMS = {"max_output_tokens": 16, "quality": RELAXED_QUALITY}


def run_stages(input_dir: Path, output_dir: Path, run_id: str) -> RunReport:
    params = {"input_dir": str(input_dir), "output_dir": str(output_dir), **PARAMS}
    run_dir, chunks = stages.discover(params, run_id, lambda _key: None, {})
    for index, chunk in enumerate(chunks):  # each chunk on its own, as the DAG's mapped task group runs it
        job = stages.batch(run_dir, chunk, stages.validate_chunk(run_dir, chunk))
        stages.upsample(run_dir, job, index, {})
    stages.merge(str(run_dir), run_id)
    location = stages.report(str(run_dir), run_id, DAG_ID, "2026-01-01T00:00:00+00:00")
    return RunReport.from_text(Path(location["report_json"]).read_text())


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, Path, dict, dict]:
    root = tmp_path_factory.mktemp("in-process")
    input_dir, output_dir = root / "in $(touch pwned); 'q\"", root / "out & 'q\""
    input_dir.mkdir()
    make_videos(input_dir, root)
    make_specs(input_dir, root)
    before = tree_digest(input_dir)
    return input_dir, output_dir, before, run_stages(input_dir, output_dir, "manual__first")


class TestBadInputTableInProcess:
    def test_every_spec_file_is_one_item_and_bad_ones_say_why(self, hostile):
        input_dir, _, _, report = hostile
        by_name = {Path(item.source_path).name: item for item in report.items}
        assert len(report.items) == len(list(input_dir.glob("*.json")))
        for stem, words in BAD.items():
            item = by_name[f"{stem}.json"]
            assert item.status == "invalid" and words in item.reason, (stem, item.reason)
        for file_name, spec_id in GOOD.items():
            item = by_name[file_name]
            assert item.status == "upsampled" and item.spec_id == spec_id, (file_name, item.reason)
            assert item.tokens.engine == item.tokens.prompt

    def test_inputs_untouched_and_a_second_pass_pays_nothing(self, hostile):
        input_dir, output_dir, before, _ = hostile
        assert tree_digest(input_dir) == before
        answers = sorted(entry["key"] for ledger in (output_dir / "jobs").glob("*/ledger.jsonl")
                         for entry in Ledger(ledger).entries())
        again = run_stages(input_dir, output_dir, "manual__second")
        assert again.counts.cached == len(GOOD) and again.counts.upsampled == 0
        assert sorted(entry["key"] for ledger in (output_dir / "jobs").glob("*/ledger.jsonl")
                      for entry in Ledger(ledger).entries()) == answers
        assert not list(Path().glob("pwned*")) and not list(input_dir.parent.glob("pwned*"))
