"""The endpoint runner called directly (as the upsample_endpoint task calls it) against vLLM's API server: only what
the ledger lacks is sent; two tries never send the same item; and when the planner's tokenizer is not the served
model's, the service's /tokenize counts every request first and one over the budget is never sent."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from include.cosmos_upsample.endpoint import Service, answer_job, run_endpoint_job
from include.cosmos_upsample.errors import WorkerFailed
from include.cosmos_upsample.jobformat import MANIFEST_NAME, Job, JobItem, Ledger, job_lock
from include.cosmos_upsample.prompt_formats import PROMPT_FORMATS
from include.cosmos_upsample.tokens import PixtralCounter
from tests.endpoint.conftest import CONN_ENV
from tests.endpoint.http_proxy import CHAT, RateLimitingProxy
from tests.endpoint.server import API_KEY, SERVED_NAME
from tests.helpers import make_video

pytestmark = pytest.mark.endpoint
COSMOS = PROMPT_FORMATS["cosmos_upsampler"]


@pytest.fixture(scope="module")
def frames(tmp_path_factory, tiny_pixtral) -> tuple[tuple[str, ...], PixtralCounter]:
    """Two real 320x180 JPEG frames, and the planner's counter with the served model's own tekken.json."""
    import subprocess

    folder = tmp_path_factory.mktemp("frames")
    clip = make_video(folder / "clip.mp4", 320, 180)
    paths = []
    for index in range(2):
        path = folder / f"frame-{index}.jpg"
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-ss", str(index * 0.5), "-i", str(clip), "-frames:v", "1",
                        str(path)], check=True)
        paths.append(str(path))
    return tuple(paths), PixtralCounter(str(tiny_pixtral / "tekken.json"), images_first=True)


def write_job(job_dir: Path, prompts: list[str], frames, counter, max_model_len: int = 4096,
              planned=lambda real: real) -> Job:
    items = tuple(JobItem(f"key{index}", f"spec{index}", COSMOS.user_text(prompt), frames,
                          planned(counter.count(COSMOS.user_text(prompt), 320, 180, 2)))
                  for index, prompt in enumerate(prompts))
    job = Job("job", "vllm", SERVED_NAME, max_model_len, 16, "cosmos_upsampler", {**COSMOS.sampling, "seed": 0},
              planner_tokenizer="test", items=items)
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / MANIFEST_NAME).write_text(json.dumps(job.to_manifest()))
    return job


def service_of(server) -> Service:
    return Service("svc", server.base_url, API_KEY)


def test_only_what_the_ledger_lacks_is_sent(vllm_server, frames, tmp_path):
    paths, counter = frames
    job = write_job(tmp_path / "job", [f"A robot arm picks up cup {n}." for n in range(4)], paths, counter)
    ledger = Ledger.of(tmp_path / "job")
    for item in job.items[:2]:  # answered by an earlier try that was then killed
        ledger.append({"key": item.key, "spec_id": item.spec_id, "status": "ok", "text": "kept"})
    before = vllm_server.requests()
    assert asyncio.run(answer_job(tmp_path / "job", service_of(vllm_server), concurrency=4)) == 2
    assert vllm_server.requests() - before == 2
    ok = [entry["key"] for entry in ledger.entries() if entry["status"] == "ok"]
    assert sorted(ok) == ["key0", "key1", "key2", "key3"]
    assert [entry["text"] for entry in ledger.entries()][:2] == ["kept", "kept"]


def test_a_second_try_never_sends_what_the_first_is_sending(vllm_server, frames, tmp_path, monkeypatch):
    paths, counter = frames
    write_job(tmp_path / "job", ["A forklift crosses a warehouse."], paths, counter)
    monkeypatch.setenv(CONN_ENV, vllm_server.connection())
    before = vllm_server.requests()
    with job_lock(tmp_path / "job") as first_try:
        assert first_try
        with pytest.raises(WorkerFailed, match="is being answered by another try"):
            run_endpoint_job(tmp_path / "job", "cosmos_upsample_endpoint", 4, 60.0, 2)
    assert vllm_server.requests() == before and not Ledger.of(tmp_path / "job").entries()
    assert run_endpoint_job(tmp_path / "job", "cosmos_upsample_endpoint", 4, 60.0, 2) == 1


def test_a_model_the_planner_cannot_count_is_counted_by_the_service_and_never_sent_over_budget(
        vllm_server, frames, tmp_path):
    """Planned counts that are not the model's (as for a served model of another family): the first request's
    /tokenize disagrees, so every request is counted by the service before it is sent; the long one is over the
    budget by that count and is not sent, the short one is, and the report says who counted."""
    paths, counter = frames
    short, long = "A drone flies along a coast.", "A drone flies along a rocky coast at dawn. " * 60
    real_long = counter.count(COSMOS.user_text(long), 320, 180, 2)
    budget_model_len = real_long - 50 + 16  # budget = max_model_len - 16 answer tokens: the long prompt is over
    job = write_job(tmp_path / "job", [short, long], paths, counter, max_model_len=budget_model_len,
                    planned=lambda real: min(real - 7, budget_model_len - 100))
    chats, counts = vllm_server.requests(), vllm_server.requests("/tokenize")
    asyncio.run(answer_job(tmp_path / "job", service_of(vllm_server), concurrency=2))
    entries = {entry["spec_id"]: entry for entry in Ledger.of(tmp_path / "job").entries()}
    assert vllm_server.requests() - chats == 1 and vllm_server.requests("/tokenize") - counts == 2
    assert entries["spec0"]["status"] == "ok" and entries["spec0"]["counted_by"] == "service"
    assert entries["spec0"]["prompt_tokens"] == counter.count(COSMOS.user_text(short), 320, 180, 2) \
        != job.items[0].planned_tokens
    assert entries["spec1"]["status"] == "failed" and entries["spec1"]["counted_by"] == "service"
    assert f"the service counts {real_long} prompt tokens for this request, over the budget of " \
           f"{budget_model_len - 16}" in entries["spec1"]["reason"] and "not sent" in entries["spec1"]["reason"]


def test_a_service_without_tokenize_is_used_and_each_item_says_only_its_count_exists(vllm_server, frames, tmp_path):
    """As NIM and hosted APIs: no /tokenize. The requests are sent as planned, and every ledger line (hence the
    report's `tokens.counted_by`) says that only the service's own count after answering exists."""
    paths, counter = frames
    write_job(tmp_path / "job", ["A kitchen robot pours water.", "A drone lands."], paths, counter)
    with RateLimitingProxy(vllm_server.url, hide=("/tokenize",)) as proxy:
        asyncio.run(answer_job(tmp_path / "job", Service("svc", f"{proxy.url}/v1", API_KEY), concurrency=2))
    assert [(seen.path, seen.status) for seen in proxy.seen].count(("/tokenize", 404)) == 1
    assert [seen.status for seen in proxy.seen if seen.path == CHAT] == [200, 200]
    entries = Ledger.of(tmp_path / "job").entries()
    assert [entry["status"] for entry in entries] == ["ok", "ok"]
    assert {entry["counted_by"] for entry in entries} == {"service_usage"}
    assert all(entry["prompt_tokens"] == entry["planned_tokens"] for entry in entries)
