"""`review: flagged` under the real scheduler (api-server + scheduler + dag-processor, LocalExecutor): each flagged
answer becomes a Required Action (Airflow's HITLOperator, waiting in `awaiting_input`), which this test answers over
the REST API v2 as a reviewer would in the UI: one approved with an edit, one rejected, one left to time out. The
merged spec, the review files and the report then say what the person decided."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from include.cosmos_upsample.settings import DAG_ID, REPORT_TASK_ID, REPORT_XCOM_KEY
from tests.deploy.conftest import PROMPTS as DEPLOY_PROMPTS
from tests.deploy.test_local_executor import local_deployment
from tests.helpers import make_video, write_spec

pytestmark = pytest.mark.deploy

# Every answer is longer than 2 words: all three are flagged whatever the model writes, without a re-ask.
FLAGGING = {"review": "flagged", "quality": {"max_words": 2, "min_words": 0}, "quality_retries": 0}
# One prompt a reviewer must see as it is: Jinja and Markdown in it are neither rendered nor run.
PROMPTS = {**DEPLOY_PROMPTS, "drone": "A drone {{ 7 * 7 }} flies ![x](http://evil.example/x.png) over a field."}
EDITED = "A robot arm lifts the red cup off the wooden table and sets it down again, edited by a reviewer."
# Long enough for the test to answer the other two first; the scheduler then takes the default (Reject).
REVIEW_TIMEOUT_SECONDS = 90
# A person answers some seconds after a request appears; the tests wait for the moment Airflow is ready for an answer
# (RELIABILITY.md, "a review answered before its task parks"), then some seconds more. Airflow 3.3 writes the request
# a moment before the task parks; an answer given in between is recorded but resumes nothing (core_api/routes/public/
# hitl.py resumes only a parked task), so the task waits until its timeout, whose sweep then takes that answer
# (scheduler_job_runner.check_awaiting_input_timeouts). An answer given after parking but before the scheduler has
# processed the executor's "success" of the parked process (seen here up to 6 s late, unloaded) can be lost: the
# scheduler then finds the answered task queued again with the same try, retries it ("task state changed
# externally"), and the retry's new request clears the answer (execution_api/routes/hitl.py, upsert_hitl_detail,
# case 3). The item then stays flagged.
ANSWER_AFTER_SECONDS = 10


def hitl_details(site, run_id: str) -> list[dict]:
    return site.get(f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/hitlDetails", limit=100)["hitl_details"]


def answer(site, run_id: str, map_index: int, option: str, text: str) -> dict:
    path = f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances/review/{map_index}/hitlDetails"
    response = site.request("PATCH", path, json={"chosen_options": [option], "params_input": {"answer": text}})
    assert response.status_code == 200, f"PATCH {path}: {response.status_code} {response.text[:2000]}"
    return response.json()


def answer_once_parked(site, run_id: str, answers: dict[int, tuple[str, str]]) -> dict[int, float]:
    """Answer each review task (map index -> (option, answer text)) ANSWER_AFTER_SECONDS after it was seen waiting
    for its answer (`awaiting_input`, and the scheduler done with its parked process), as a person would; returns when
    each was seen so (time.monotonic())."""
    scheduler_log = site.home / "logs-components" / "scheduler.log"

    def waiting_since(map_index: int) -> float | None:
        tis = [ti for ti in site.task_instances(run_id) if ti["task_id"] == "review" and ti["map_index"] == map_index]
        if [ti["state"] for ti in tis] != ["awaiting_input"]:
            return None
        # The scheduler's line once it has the executor's event of the parked process (jobs/scheduler_job_runner.py,
        # _process_executor_events): from then on an answer resumes the task and nothing retries it.
        released = re.compile(rf"TaskInstance Finished: dag_id={DAG_ID}, task_id=review, run_id={re.escape(run_id)}, "
                              rf"map_index={map_index}, ti_id={tis[0]['id']},[^\n]*state=awaiting_input")
        return time.monotonic() if released.search(scheduler_log.read_text(errors="replace")) else None

    parked = {index: site.wait(lambda index=index: waiting_since(index), 300,
                               f"review task {index} to wait for its answer") for index in answers}
    time.sleep(max(0.0, ANSWER_AFTER_SECONDS - (time.monotonic() - max(parked.values()))))
    for index, (option, text) in answers.items():
        answer(site, run_id, index, option, text)
    return parked


def spec_of(detail: dict) -> str:
    return next(stem for stem in PROMPTS if f"for {stem} (" in detail["subject"])


def test_a_reviewer_approves_one_with_an_edit_rejects_one_and_one_times_out(tmp_path, migrated_db):
    specs, output_dir = tmp_path / "specs", tmp_path / "outputs"
    make_video(specs / "clip.mp4", 320, 180)
    for stem, prompt in PROMPTS.items():
        write_spec(specs, stem, prompt=prompt, input_video_path="clip.mp4")
    with local_deployment(tmp_path, specs, migrated_db,
                          COSMOS_UPSAMPLE_REVIEW_TIMEOUT_SECONDS=str(REVIEW_TIMEOUT_SECONDS)) as site:
        run_id = site.trigger(site.form_conf(output_dir=str(output_dir), **FLAGGING))
        site.unpause()

        def requests_for(*stems: str) -> dict[str, dict] | None:
            found = {spec_of(detail): detail for detail in hitl_details(site, run_id)}
            return found if all(stem in found for stem in stems) else None

        # Each request times out REVIEW_TIMEOUT_SECONDS after its own task began to wait: answer each of the two
        # ANSWER_AFTER_SECONDS after its task parked, well before that.
        by_spec = site.wait(lambda: requests_for("arm_cup", "forklift"), 900, "the first two review requests")
        arm, forklift = by_spec["arm_cup"], by_spec["forklift"]
        parked = answer_once_parked(site, run_id, {
            arm["task_instance"]["map_index"]: ("Approve", EDITED),
            forklift["task_instance"]["map_index"]: ("Reject", forklift["params"]["answer"]["value"])})
        assert time.monotonic() - min(parked.values()) < REVIEW_TIMEOUT_SECONDS, "answered too late: the test is wrong"
        drone = site.wait(lambda: requests_for(*PROMPTS), 300, "the third review request")["drone"]
        waiting = [ti["state"] for ti in site.task_instances(run_id)
                   if ti["task_id"] == "review" and ti["map_index"] == drone["task_instance"]["map_index"]]
        assert waiting in (["awaiting_input"], ["running"]), waiting  # waiting holds no worker slot

        # What the reviewer saw: the prompt verbatim, the answer in an editable field, links to the frames.
        assert arm["options"] == ["Approve", "Reject"] and arm["defaults"] == ["Reject"]
        assert f"```text\n{PROMPTS['arm_cup']}\n```" in arm["body"]
        model_answer = arm["params"]["answer"]["value"]
        shown = arm["body"].split("**Answer**", 1)[1].split("```text\n", 1)[1].split("\n```", 1)[0]
        assert model_answer and " ".join(shown.split()) == " ".join(model_answer.split())  # wrapped for reading
        frame_path = f"/upsample-reports/runs/{quote(run_id, safe='')}/items/arm_cup/frames/0"
        assert f"{site.url}{frame_path}" in arm["body"]
        frame = site.request("GET", frame_path)
        assert frame.status_code == 200 and frame.headers["content-type"] == "image/jpeg"
        assert frame.content[:3] == b"\xff\xd8\xff"
        import httpx

        assert httpx.get(f"{site.url}{frame_path}", timeout=30).status_code in (401, 403)
        assert f"```text\n{PROMPTS['drone']}\n```" in drone["body"]  # verbatim: no Jinja rendered it

        run = site.wait_run(run_id, 900)
        assert run["state"] == "success", (run, site.services.tails())
        answered = requests_for(*PROMPTS)
        for stem, option in (("arm_cup", "Approve"), ("forklift", "Reject")):  # each answer is the admin's
            assert answered[stem]["chosen_options"] == [option], (stem, answered[stem], site.services.tails())
            assert (answered[stem]["responded_by_user"] or {}).get("name") == "admin", (stem, answered[stem])
        drone = answered["drone"]
        assert drone["chosen_options"] == ["Reject"] and drone["responded_by_user"] is None  # the timeout's default
        location = site.xcom(run_id, REPORT_TASK_ID, REPORT_XCOM_KEY)
        tis = site.task_instances(run_id)

    report = json.loads(Path(location["report_json"]).read_text())
    items = {item["spec_id"]: item for item in report["items"]}
    assert report["counts"] == {"discovered": 3, "upsampled": 1, "cached": 0, "invalid": 0, "failed": 0,
                                "flagged": 2}
    assert report["quality"]["flagged"] == 3 and report["quality"]["by_check"]["too_long"] == 3

    approved = items["arm_cup"]
    assert approved["status"] == "upsampled" and approved["review"]["action"] == "edited"
    spec = json.loads((output_dir / "specs" / "arm_cup.json").read_text())
    assert spec["prompt"] == EDITED and spec["parent_prompt_text"] == PROMPTS["arm_cup"]
    review = spec["metadata"]["upsampling"]["review"]
    assert (review["action"], review["by"]) == ("edited", "admin") and review["at"]
    assert not (output_dir / "review" / "arm_cup.json").exists()

    assert items["forklift"]["status"] == "flagged" and items["forklift"]["review"]["action"] == "rejected"
    assert json.loads((output_dir / "review" / "forklift.json").read_text())["review"]["by"] == "admin"
    assert items["drone"]["status"] == "flagged" and items["drone"]["review"] is None
    assert not (output_dir / "specs" / "forklift.json").exists() and not (output_dir / "specs" / "drone.json").exists()

    review_tis = [ti for ti in tis if ti["task_id"] == "review"]
    assert len(review_tis) == 3 and {ti["state"] for ti in review_tis} == {"success"}, review_tis
