"""The DAG with runner endpoint (`airflow dags test`) against vLLM's API server: every item answered once, counted at
the server; the engine's own prompt count equal to the plan; a re-run sends nothing; a server killed mid-job; 429 with
Retry-After; a wrong key; an unreachable service; cosmos3_structured answers that are valid JSON."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from include.cosmos_upsample.prompt_formats import COSMOS3_VIDEO_SCHEMA
from tests.endpoint.conftest import endpoint_conf, endpoint_env, ledger_entries, spec_folder, task_tries
from tests.endpoint.http_proxy import CHAT, RateLimitingProxy
from tests.helpers import latest_report, run_dag
from tests.processes import free_port

pytestmark = pytest.mark.endpoint


def answered_once(output_dir: Path) -> Counter:
    return Counter(entry["key"] for entry in ledger_entries(output_dir) if entry["status"] == "ok")


@pytest.fixture(scope="module")
def first_run(airflow_home, vllm_server, tmp_path_factory):
    """Five specs (two with an edge control video), three requests in flight."""
    root = tmp_path_factory.mktemp("endpoint-run")
    folder, out = spec_folder(root, 5, control=True), root / "out"
    before = vllm_server.requests()
    env = endpoint_env(vllm_server.connection())
    run_dag(airflow_home, endpoint_conf(folder, out, endpoint_concurrency=3), env)
    return folder, out, env, latest_report(out), vllm_server.requests() - before


class TestAnsweredByTheService:
    def test_every_item_is_answered_with_its_frames(self, first_run):
        _, out, _, report, _ = first_run
        assert report["counts"] == {"discovered": 5, "upsampled": 5, "cached": 0, "invalid": 0, "failed": 0,
                                    "flagged": 0}
        assert {item["hint"]["source"] for item in report["items"]} == {"input_video", "edge"}
        for item in report["items"]:
            assert item["frames_sent"] == 2 and item["upsampled_prompt"]
            upsampling = json.loads(Path(item["output_path"]).read_text())["metadata"]["upsampling"]
            assert upsampling["format"] == "text" and upsampling["prompt_format"]["name"] == "cosmos_upsampler"

    def test_the_services_own_count_equals_the_plan(self, first_run):
        _, _, _, report, _ = first_run
        for item in report["items"]:
            assert item["tokens"]["engine"] == item["tokens"]["prompt"] <= item["tokens"]["budget"], item
            assert item["tokens"]["counted_by"] == "planner"
        assert report["tokens_equal"] == {"equal": 5, "compared": 5}

    def test_exactly_one_request_per_item_counted_at_the_server(self, first_run):
        _, out, _, _, requests = first_run
        assert requests == 5
        assert answered_once(out) == Counter({key: 1 for key in answered_once(out)}) and len(answered_once(out)) == 5
        assert {entry["finish_reason"] for entry in ledger_entries(out)} <= {"length", "stop"}

    def test_the_endpoint_task_ran_and_the_gpu_task_skipped_itself(self, first_run, airflow_home):
        _, _, _, report, _ = first_run
        tries = task_tries(airflow_home, report["run_id"])
        assert tries["upsample_endpoint"] == [(1, "success")]
        assert [state for _, state in tries["upsample"]] == ["skipped"]

    def test_a_rerun_sends_nothing(self, first_run, airflow_home, vllm_server):
        folder, out, env, _, _ = first_run
        before = vllm_server.requests()
        run_dag(airflow_home, endpoint_conf(folder, out, endpoint_concurrency=3), env)
        assert latest_report(out)["counts"]["cached"] == 5
        assert vllm_server.requests() == before and sum(answered_once(out).values()) == 5


def test_a_server_killed_mid_job_and_restarted_answers_every_item_once_in_total(airflow_home, vllm_server, tmp_path):
    """SIGKILL the service after two answers: the run reports the rest as failed with the service's reason; once the
    service is back, the re-run sends only those (the two answers are kept), so each item is answered once."""
    folder, out = spec_folder(tmp_path, 6), tmp_path / "out"
    before = vllm_server.requests()
    conf = endpoint_conf(folder, out, endpoint_concurrency=1, max_output_tokens=160)
    env = endpoint_env(vllm_server.connection())
    killed = threading.Event()

    def kill_after_two_answers() -> None:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and not killed.is_set():
            if sum(entry["status"] == "ok" for entry in ledger_entries(out) if out.exists()) >= 2:
                vllm_server.kill()
                killed.set()
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_after_two_answers, daemon=True)
    watcher.start()
    try:
        run_dag(airflow_home, conf, env, expect_success=False)
    finally:
        killed.set()  # stops the watcher if it never fired (the assertions below then say so)
        watcher.join(timeout=5)
        if not vllm_server.service.alive():
            vllm_server.start()
    report = latest_report(out)
    failed = [item for item in report["items"] if item["status"] == "failed"]
    assert report["counts"]["upsampled"] >= 2 and failed, report["counts"]
    for item in failed:
        assert f"the inference service at {vllm_server.base_url}" in item["reason"] and "did not answer" in \
            item["reason"], item["reason"]
    assert task_tries(airflow_home, report["run_id"])["upsample_endpoint"][0][0] == 4  # retried by Airflow

    run_dag(airflow_home, conf, env)
    assert latest_report(out)["counts"]["failed"] == 0
    assert answered_once(out) == Counter({key: 1 for key in answered_once(out)}) and len(answered_once(out)) == 6
    assert vllm_server.requests() - before == 6


def test_429_with_retry_after_is_honoured(airflow_home, vllm_server, tmp_path):
    """A gateway answering 429 "Retry-After: 2" to the first two requests: each is sent again no sooner than two
    seconds later (the client's own backoff would be under one), and every item is answered once."""
    folder, out = spec_folder(tmp_path, 2), tmp_path / "out"
    before = vllm_server.requests()
    with RateLimitingProxy(vllm_server.url, refuse_first=2, retry_after=2) as proxy:
        run_dag(airflow_home, endpoint_conf(folder, out, endpoint_concurrency=1),
                endpoint_env(vllm_server.connection(base_url=f"{proxy.url}/v1"),
                             COSMOS_UPSAMPLE_ENDPOINT_ATTEMPTS="4"))
    chats = [seen for seen in proxy.seen if seen.path == CHAT]
    assert [seen.status for seen in chats] == [429, 429, 200, 200]
    assert chats[1].at - chats[0].at >= 2 and chats[2].at - chats[1].at >= 2
    assert latest_report(out)["counts"]["upsampled"] == 2 and vllm_server.requests() - before == 2


def test_a_wrong_api_key_fails_at_once_naming_the_fix(airflow_home, vllm_server, tmp_path):
    folder, out = spec_folder(tmp_path, 2), tmp_path / "out"
    refused_before = vllm_server.requests(status=401)
    run_dag(airflow_home, endpoint_conf(folder, out), endpoint_env(vllm_server.connection(api_key="sk-wrong")),
            expect_success=False)
    report = latest_report(out)
    assert report["counts"]["failed"] == 2
    for item in report["items"]:
        assert "refused the API key" in item["reason"] and "put the service's key in the connection's password" in \
            item["reason"], item["reason"]
    assert task_tries(airflow_home, report["run_id"])["upsample_endpoint"] == [(1, "failed")]  # not retried
    assert vllm_server.requests(status=401) - refused_before == 1  # one request, not one per try or per item


def test_an_unreachable_service_is_retried_then_each_item_says_why(airflow_home, tmp_path):
    folder, out = spec_folder(tmp_path, 2), tmp_path / "out"
    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    run_dag(airflow_home, endpoint_conf(folder, out),
            endpoint_env(json.dumps({"conn_type": "http", "host": nowhere, "password": "k"})), expect_success=False)
    report = latest_report(out)
    assert report["counts"]["failed"] == 2
    for item in report["items"]:
        assert f"the inference service at {nowhere} (connection 'cosmos_upsample_endpoint') did not answer " \
               "(APIConnectionError: Connection error.) after 2 tries" in item["reason"], item["reason"]
    assert task_tries(airflow_home, report["run_id"])["upsample_endpoint"] == [(4, "failed")]


def test_cosmos3_structured_gives_valid_json_in_every_output(airflow_home, vllm_server, tmp_path):
    """The random-weight model writes nonsense, but within the schema sent as response_format: every output's
    prompt is one compact JSON object valid against it. Long answers (every string filled to its bound), so 8192
    tokens of context."""
    folder, out = spec_folder(tmp_path, 2, control=True), tmp_path / "out"
    run_dag(airflow_home, endpoint_conf(folder, out, prompt_format="cosmos3_structured", max_model_len=8192,
                                        max_output_tokens=5000, endpoint_concurrency=2, sampling={"seed": 1}),
            endpoint_env(vllm_server.connection()))
    report = latest_report(out)
    assert report["counts"]["upsampled"] == 2, [item.get("reason") for item in report["items"]]
    validator = Draft202012Validator(COSMOS3_VIDEO_SCHEMA)
    for item in report["items"]:
        spec = json.loads(Path(item["output_path"]).read_text())
        assert spec["prompt"] == json.dumps(json.loads(spec["prompt"]), ensure_ascii=True)  # compact, as stored
        assert not list(validator.iter_errors(json.loads(spec["prompt"])))
        upsampling = spec["metadata"]["upsampling"]
        assert upsampling["format"] == "json" and upsampling["prompt_format"]["name"] == "cosmos3_structured"
        assert item["tokens"]["engine"] == item["tokens"]["prompt"]
        assert spec["parent_prompt_text"].startswith("A robot arm picks up a red cup")


def test_a_teams_own_template_and_schema_without_code(airflow_home, vllm_server, tmp_path):
    folder, out = spec_folder(tmp_path, 2), tmp_path / "out"
    template, schema = tmp_path / "prompt.j2", tmp_path / "answer.json"
    template.write_text("Describe the scene of spec {{ spec.id }} for a video model: {{ prompt }}")
    schema.write_text(json.dumps({"type": "object", "required": ["scene", "camera"], "additionalProperties": False,
                                  "properties": {"scene": {"type": "string", "maxLength": 40},
                                                 "camera": {"type": "string", "maxLength": 20}}}))
    run_dag(airflow_home, endpoint_conf(folder, out, prompt_template=str(template), response_schema=str(schema),
                                        max_output_tokens=120, sampling={"seed": 3}),
            endpoint_env(vllm_server.connection()))
    report = latest_report(out)
    assert report["counts"]["upsampled"] == 2, [item.get("reason") for item in report["items"]]
    for item in report["items"]:
        assert set(json.loads(item["upsampled_prompt"])) == {"scene", "camera"}
        assert item["tokens"]["engine"] == item["tokens"]["prompt"]  # the rendered template is what was counted

