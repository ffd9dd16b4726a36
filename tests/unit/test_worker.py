"""The worker program's pure parts: request building per prompt format, engine and sampling arguments, the plan
check, the GPU lock (the engine itself is exercised in tests/vllm)."""

from __future__ import annotations

import base64
import json
import os

import pytest
import worker

from include.cosmos_upsample.jobformat import DIE_AFTER_ENV as DIE_AFTER
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

    def test_a_structured_format_gets_compact_json_from_the_engine(self):
        structured = job(prompt_format="cosmos3_structured", response_schema={"type": "object"})
        assert worker.engine_arguments(structured, {})["structured_outputs_config"] == {
            "backend": "xgrammar", "disable_any_whitespace": True}
        assert "structured_outputs_config" not in worker.engine_arguments(job(), {})

    def test_cosmos3_structured_sends_its_system_turn_first(self, tmp_path, two_frames):
        system, user = worker.build_conversation(JobItem("k", "s", "t", two_frames),
                                                 job(prompt_format="cosmos3_structured"), tmp_path)
        assert system == {"role": "system", "content": "You are a helpful assistant."}
        assert [part["type"] for part in user["content"]] == ["image_url", "image_url", "text"]

    def test_sampling_is_the_jobs_with_per_item_answer_length(self):
        sampling = worker.sampling_arguments(job(), JobItem("k", "s", "t", max_tokens=7))
        assert sampling == {"max_tokens": 7, "temperature": 0.6, "top_p": 1.0, "repetition_penalty": 1.0}
        assert worker.sampling_arguments(job(), JobItem("k", "s", "t"))["max_tokens"] == 300
        assert worker.sampling_arguments(job(), JobItem("k", "s", "t"), attempt=3)["seed"] == 2


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
    from include.cosmos_upsample.errors import NotRetryable, WorkerRefused
    from include.cosmos_upsample.jobformat import REFUSAL_PREFIX

    refusal = f"{REFUSAL_PREFIX} j: the engine counts 515 prompt tokens for spec, the plan 514: ..."
    output = ["model loaded in 3.1s", refusal, "INFO engine shut down"]
    error = WorkerRefused.from_output(output, where="on gpu_1: ")
    assert isinstance(error, NotRetryable) and str(error) == f"on gpu_1: {refusal}"
    assert str(WorkerRefused.from_output([])) == "the worker refused"


def test_an_interpreter_without_the_backends_library_refuses_the_job_naming_the_fix(tmp_path):
    """The base interpreter of this venv has no llama_cpp: the worker refuses (exit 78, one line naming the package
    and the worker_python setting) instead of dying with a traceback that a retry would only repeat."""
    import subprocess
    import sys
    from pathlib import Path

    from include.cosmos_upsample.jobformat import EXIT_REFUSED, REFUSAL_PREFIX
    from include.cosmos_upsample.runners import WORKER_SCRIPT, worker_environment

    bare = Path(sys.base_prefix) / "bin" / "python3"
    assert subprocess.run([str(bare), "-c", "import llama_cpp"], capture_output=True).returncode != 0
    (tmp_path / "manifest.json").write_text(json.dumps(job(backend="llama_cpp", items=(
        JobItem("k", "s", "A cup."),)).to_manifest()))
    done = subprocess.run([str(bare), str(WORKER_SCRIPT), "--job-dir", str(tmp_path)], capture_output=True,
                          text=True, env=worker_environment(), timeout=60)
    assert done.returncode == EXIT_REFUSED, done.stderr
    (refusal,) = [line for line in done.stderr.splitlines() if line.startswith(REFUSAL_PREFIX)]
    assert "llama-cpp-python" in refusal and str(bare) in refusal and "worker_python" in refusal
    assert not (tmp_path / "ledger.jsonl").exists()


GOOD_ANSWER = (
    "The video shows a white robot arm on a steel workbench in a bright laboratory. It lowers its gripper over a "
    "cluttered wooden table, closes it around the handle of a glossy red cup and lifts the cup slowly, keeping it "
    "level. The arm turns to the left and sets the cup on a grey metal shelf at chest height, then releases it and "
    "returns to its resting pose while soft overhead light casts short shadows across the table.")


class ScriptedEngine:
    """Stands in for the model in these tests of the worker's own loop (judging, re-asking, the ledger): it answers
    each attempt from a script. The real engines run this loop in tests/e2e (llama.cpp) and tests/vllm (vLLM)."""

    frames_sent = False

    def __init__(self, script: dict[tuple[str, int], tuple[str, str]]) -> None:
        self.script, self.asked = script, []

    def answers(self, requests, job_dir):
        while requests:
            request = requests.popleft()
            self.asked.append((request.item.spec_id, request.attempt, request.id))
            text, finish_reason = self.script[(request.item.spec_id, request.attempt)]
            yield request, worker.Answer(text, 10, 20, finish_reason=finish_reason)


class TestReAsk:
    """Each answer is judged where it arrives; a flagged one is asked again with a new seed, in the same engine."""

    @staticmethod
    def write_job(tmp_path, retries=2, seed=None):
        from include.cosmos_upsample.quality import Policy, thresholds_for

        policy = Policy("cosmos_upsampler", thresholds_for("cosmos_upsampler"), retries, ("naked",))
        items = tuple(JobItem(key, key, "A robot arm picks up a red cup.", prompt="A robot arm picks up a red cup.")
                      for key in ("a", "b"))
        manifest = job(items=items, quality=policy.to_manifest(), sampling={"temperature": 0.6, "seed": seed})
        (tmp_path / "manifest.json").write_text(json.dumps(manifest.to_manifest()))

    @staticmethod
    def ledger(tmp_path):
        from include.cosmos_upsample.jobformat import Ledger

        return Ledger.of(tmp_path).entries()

    def test_a_flagged_answer_is_asked_again_until_one_passes_or_the_attempts_are_spent(self, tmp_path):
        self.write_job(tmp_path)
        engine = ScriptedEngine({
            ("a", 1): ("The image shows a cup", "length"), ("a", 2): (f'Here is the prompt: "{GOOD_ANSWER}"', "stop"),
            ("b", 1): ("", "stop"), ("b", 2): ("The image shows a cup.", "stop"), ("b", 3): ("I'm sorry.", "stop"),
        })
        assert worker.run_job(tmp_path, backend_factory=lambda _job: engine) == 0
        assert engine.asked == [("a", 1, "a"), ("b", 1, "b"), ("a", 2, "a.2"), ("b", 2, "b.2"), ("b", 3, "b.3")]
        lines = {(entry["key"], entry["attempt"]): entry for entry in self.ledger(tmp_path)}
        assert len(lines) == 5
        assert lines[("a", 1)]["failed_checks"] == ["truncated", "too_short", "meta"]
        assert lines[("a", 1)]["finish_reason"] == "length"
        assert (lines[("a", 2)]["verdict"], lines[("a", 2)]["text"]) == ("pass", GOOD_ANSWER)
        assert lines[("a", 2)]["raw"].startswith("Here is the prompt:")
        assert lines[("b", 1)]["failed_checks"] == ["empty"] and lines[("b", 1)]["status"] == "ok"
        assert [lines[("b", n)]["verdict"] for n in (1, 2, 3)] == ["flagged"] * 3
        assert [lines[("b", n)]["seed"] for n in (1, 2, 3)] == [None, 1, 2]  # upstream's seed; then new ones

    def test_a_retried_worker_continues_the_attempts_and_never_repeats_a_judged_one(self, tmp_path):
        self.write_job(tmp_path, seed=5)
        first = ScriptedEngine({("a", 1): ("The image shows a cup.", "stop"), ("b", 1): (GOOD_ANSWER, "stop")})
        # The first worker dies after two judged answers (a's attempt 1 flagged, b passed) ...
        os.environ[DIE_AFTER] = "2"
        try:
            child = os.fork()
            if child == 0:
                os._exit(worker.run_job(tmp_path, backend_factory=lambda _job: first))
            os.waitpid(child, 0)
        finally:
            del os.environ[DIE_AFTER]
        # ... and the retry asks only for a's second attempt, with the next seed.
        second = ScriptedEngine({("a", 2): (GOOD_ANSWER, "stop")})
        assert worker.run_job(tmp_path, backend_factory=lambda _job: second) == 0
        assert second.asked == [("a", 2, "a.2")]
        assert [(e["key"], e["attempt"], e["seed"], e["verdict"]) for e in self.ledger(tmp_path)] == [
            ("a", 1, 5, "flagged"), ("b", 1, 5, "pass"), ("a", 2, 6, "pass")]
        # Everything is final now: a third worker asks nothing.
        third = ScriptedEngine({})
        assert worker.run_job(tmp_path, backend_factory=lambda _job: third) == 0 and third.asked == []

    def test_no_re_asks_with_quality_retries_0(self, tmp_path):
        self.write_job(tmp_path, retries=0)
        engine = ScriptedEngine({("a", 1): ("The image shows a cup.", "stop"), ("b", 1): ("", "stop")})
        assert worker.run_job(tmp_path, backend_factory=lambda _job: engine) == 0
        assert [asked[:2] for asked in engine.asked] == [("a", 1), ("b", 1)]

    def test_the_blocklist_travels_in_the_manifest(self, tmp_path):
        self.write_job(tmp_path, retries=0)
        engine = ScriptedEngine({("a", 1): (GOOD_ANSWER + " A naked wall.", "stop"), ("b", 1): (GOOD_ANSWER, "stop")})
        worker.run_job(tmp_path, backend_factory=lambda _job: engine)
        assert [entry["failed_checks"] for entry in self.ledger(tmp_path)] == [["blocklist"], []]
