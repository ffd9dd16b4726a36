"""The quality gate on runner endpoint (`airflow dags test` against vLLM's API server): the same judging, re-asks
and review files as the worker's (jobformat.record_attempt), and the check `schema` for structured answers."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from include.cosmos_upsample.answer_schema import json_object
from tests.endpoint.conftest import endpoint_conf, endpoint_env, ledger_entries, spec_folder
from tests.endpoint.http_proxy import CHAT, RateLimitingProxy
from tests.helpers import STRICT_QUALITY, latest_report, run_dag

pytestmark = pytest.mark.endpoint


def attempts_by_item(output_dir: Path) -> dict[str, list[dict]]:
    found = defaultdict(list)
    for entry in ledger_entries(output_dir):
        if entry["status"] == "ok":
            found[entry["spec_id"]].append(entry)
    return found


def test_a_service_answering_garbage_ends_flagged_after_every_attempt(airflow_home, vllm_server, tmp_path):
    """The random-weight model's token soup under the format's real thresholds: each answer is flagged where it
    arrives, asked again with the next seed (1 + quality_retries requests per item, counted at the server), then
    the item is `flagged` with its review file, and nothing reaches specs/. A re-run asks the service nothing."""
    folder, out = spec_folder(tmp_path, 2), tmp_path / "out"
    conf = endpoint_conf(folder, out, quality=STRICT_QUALITY, quality_retries=2, endpoint_concurrency=2,
                         sampling={"seed": 7})
    env = endpoint_env(vllm_server.connection())
    before = vllm_server.requests()
    run_dag(airflow_home, conf, env)
    report = latest_report(out)
    assert report["counts"]["flagged"] == 2 and report["counts"]["upsampled"] == 0, report["counts"]
    assert vllm_server.requests() - before == 2 * 3
    for spec_id, attempts in attempts_by_item(out).items():
        assert [(entry["attempt"], entry["seed"], entry["verdict"]) for entry in attempts] == [
            (1, 7, "flagged"), (2, 8, "flagged"), (3, 9, "flagged")], attempts
        assert all(entry["counted_by"] == "planner" and entry["failed_checks"] for entry in attempts)
        review = json.loads((out / "review" / f"{spec_id}.json").read_text())
        assert [attempt["seed"] for attempt in review["attempts"]] == [7, 8, 9] and review["failed_checks"]
    for item in report["items"]:
        assert item["status"] == "flagged" and item["quality"]["attempts"] == 3, item
        assert "failed the quality checks" in item["reason"] and "review/" in item["reason"]
    assert not list((out / "specs").glob("*.json"))

    run_dag(airflow_home, conf, env)
    assert latest_report(out)["counts"]["flagged"] == 2 and vllm_server.requests() - before == 2 * 3


def test_a_json_answer_that_breaks_the_schema_fails_check_schema(airflow_home, vllm_server, tmp_path):
    """A gateway that replaces the run's response_format with its own looser schema (no `camera`): the service
    answers valid JSON, but not valid against the run's schema, so every attempt fails `schema` (and only it: the
    prose checks do not judge JSON) and the item ends flagged, never in specs/."""
    folder, out = spec_folder(tmp_path, 1), tmp_path / "out"
    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps({"type": "object", "required": ["scene", "camera"], "additionalProperties": False,
                                  "properties": {"scene": {"type": "string", "maxLength": 40},
                                                 "camera": {"type": "string", "maxLength": 20}}}))
    looser = {"type": "object", "required": ["scene"], "additionalProperties": False,
              "properties": {"scene": {"type": "string", "maxLength": 40}}}
    sent_schemas = []

    def replace_schema(body: dict) -> dict:
        sent_schemas.append(body["response_format"]["json_schema"]["schema"])
        return {**body, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": looser}}}

    with RateLimitingProxy(vllm_server.url, rewrite=replace_schema) as proxy:
        run_dag(airflow_home, endpoint_conf(folder, out, response_schema=str(schema), max_output_tokens=120,
                                            quality_retries=1, sampling={"seed": 3}),
                endpoint_env(vllm_server.connection(base_url=f"{proxy.url}/v1")))
    assert [seen.status for seen in proxy.seen if seen.path == CHAT] == [200, 200]
    assert sent_schemas == [json.loads(schema.read_text())] * 2  # the runner sent the run's schema
    [attempts] = attempts_by_item(out).values()
    for entry in attempts:
        assert set(json_object(entry["raw"])) == {"scene"}  # one JSON object, without `camera`
        assert entry["failed_checks"] == ["schema"], entry
    [item] = latest_report(out)["items"]
    assert item["status"] == "flagged" and item["quality"]["failed_checks"] == ["schema"], item
    # The review file says where each attempt breaks the schema.
    review = json.loads(Path(item["output_path"]).read_text())
    assert [attempt["reason"] for attempt in review["attempts"]] == [
        "schema: the answer breaks the schema at the top level: 'camera' is a required property"] * 2
    assert not list((out / "specs").glob("*.json"))
