"""The worker program's pure parts: request building per prompt format, engine and sampling arguments, the plan
check, the GPU lock (the engine itself is exercised in tests/vllm)."""

from __future__ import annotations

import base64
import json

import pytest
import worker

from include.cosmos_upsample.jobformat import Job, JobItem
from include.cosmos_upsample.prompt_formats import INSTRUCTION, PROMPT_FORMATS


def job(**fields) -> Job:
    base = {"job_key": "j", "backend": "vllm", "model": "/models/cosmos", "max_model_len": 4096,
            "max_output_tokens": 300, "prompt_format": "cosmos_upsampler",
            "sampling": PROMPT_FORMATS["cosmos_upsampler"].sampling}
    return Job(**{**base, **fields})


@pytest.fixture
def two_frames(tmp_path):
    (tmp_path / "f0.jpg").write_bytes(b"jpeg0")
    (tmp_path / "f1.jpg").write_bytes(b"jpeg1")
    return ("f0.jpg", "f1.jpg")


def decoded(part: dict) -> bytes:
    return base64.b64decode(part["image_url"]["url"].split(",", 1)[1])


class TestConversation:
    def test_cosmos_upsampler_sends_the_frames_first_then_the_raw_prompt(self, tmp_path, two_frames):
        text = PROMPT_FORMATS["cosmos_upsampler"].user_text("  A robot arm picks up a red cup ")
        [turn] = worker.build_conversation(JobItem("k", "s", text, two_frames), job(), tmp_path)
        *images, last = turn["content"]
        assert turn["role"] == "user"
        assert [decoded(image) for image in images] == [b"jpeg0", b"jpeg1"]
        assert last == {"type": "text", "text": "A robot arm picks up a red cup"}

    def test_an_empty_prompt_asks_to_describe_the_images_as_upstream(self):
        assert PROMPT_FORMATS["cosmos_upsampler"].user_text("  ") == "describe the following images"

    def test_instruction_format_sends_the_instruction_then_the_frames(self, tmp_path, two_frames):
        text = PROMPT_FORMATS["instruction"].user_text("A cup")
        [turn] = worker.build_conversation(JobItem("k", "s", text, two_frames), job(prompt_format="instruction"),
                                           tmp_path)
        first, *images = turn["content"]
        assert first["text"].startswith(INSTRUCTION) and first["text"].endswith("Prompt: A cup")
        assert [decoded(image) for image in images] == [b"jpeg0", b"jpeg1"]


class TestEngineArguments:
    def test_upstream_engine_with_the_job_settings_and_machine_extras_last(self):
        frames = ("a.jpg", "b.jpg")
        arguments = worker.engine_arguments(
            job(engine={"tensor_parallel_size": 2, "enable_prefix_caching": True, "quantization": None},
                items=(JobItem("k", "s", "t", frames),)),
            {worker.VLLM_ENGINE_ARGS_ENV: json.dumps({"enforce_eager": True, "tensor_parallel_size": 1})})
        assert arguments == {"model": "/models/cosmos", "tokenizer_mode": "mistral", "max_model_len": 4096,
                             "limit_mm_per_prompt": {"image": 2}, "tensor_parallel_size": 1,
                             "enable_prefix_caching": True, "enforce_eager": True}

    def test_sampling_is_the_jobs_with_per_item_answer_length(self):
        sampling = worker.sampling_arguments(job(), JobItem("k", "s", "t", max_tokens=7))
        assert sampling == {"max_tokens": 7, "temperature": 0.6, "top_p": 1.0, "repetition_penalty": 1.0}
        assert worker.sampling_arguments(job(), JobItem("k", "s", "t"))["max_tokens"] == 300


def test_the_plan_is_checked_against_the_engines_count():
    item = JobItem("k", "spec", "t", planned_tokens=514)
    worker.check_plan(job(), item, 514)
    with pytest.raises(worker.TokenizerMismatch, match="engine counts 515 prompt tokens for spec, the plan 514"):
        worker.check_plan(job(planner_tokenizer="bundled tekken"), item, 515)


def test_jobs_on_one_machine_take_turns_on_the_gpu(tmp_path):
    import threading
    import time

    order = []
    first_in = threading.Event()

    def run(name: str, hold: float) -> None:
        with worker.holding_gpu(tmp_path / ".gpu.lock"):
            order.append(f"{name} in")
            first_in.set()
            time.sleep(hold)
            order.append(f"{name} out")

    first = threading.Thread(target=run, args=("a", 0.3))
    first.start()
    first_in.wait()
    run("b", 0)
    first.join()
    assert order == ["a in", "a out", "b in", "b out"]


def test_a_refused_job_fails_for_good_quoting_the_workers_refusal():
    from include.cosmos_upsample.errors import NotRetryable, PlanNotTheEngines
    from include.cosmos_upsample.jobformat import REFUSAL_PREFIX

    refusal = f"{REFUSAL_PREFIX} j: the engine counts 515 prompt tokens for spec, the plan 514: ..."
    output = ["model loaded in 3.1s", refusal, "INFO engine shut down"]
    error = PlanNotTheEngines.from_output(output, where="on gpu_1: ")
    assert isinstance(error, NotRetryable) and str(error) == f"on gpu_1: {refusal}"
    assert str(PlanNotTheEngines.from_output([])) == "tokenizer mismatch"
