"""The worker program's pure parts: ledger, vLLM request building, context-error isolation (no GPU needed)."""

from __future__ import annotations

import base64
import json

import pytest
import worker

CONTEXT_ERRORS = [
    "Prompt length of 5000 is longer than the maximum model length of 4096.",
    "The prompt (total length 5000) is too long to fit into the model (context length 4096).",
]


class TestLedger:
    def test_torn_last_line_is_ignored_and_only_ok_counts_as_finished(self, tmp_path):
        ledger = worker.Ledger(tmp_path / "ledger.jsonl")
        ledger.append({"key": "a", "status": "ok"})
        ledger.append({"key": "b", "status": "failed"})
        with ledger.path.open("a") as handle:
            handle.write('{"key": "c", "sta')
        assert ledger.finished_keys() == {"a"}
        assert [entry["key"] for entry in ledger.entries()] == ["a", "b"]


class TestVllmRequest:
    def test_text_then_each_frame_as_a_data_url(self, tmp_path):
        (tmp_path / "f0.jpg").write_bytes(b"jpeg0")
        (tmp_path / "f1.jpg").write_bytes(b"jpeg1")
        item = worker.JobItem("k", "spec", "Describe it", ("f0.jpg", "f1.jpg"))
        [turn] = worker.build_vllm_conversation(item, tmp_path)
        assert turn["role"] == "user"
        text, *images = turn["content"]
        assert text == {"type": "text", "text": "Describe it"}
        urls = [image["image_url"]["url"] for image in images]
        assert [base64.b64decode(url.split(",", 1)[1]) for url in urls] == [b"jpeg0", b"jpeg1"]


class TestContextErrorIsolation:
    @pytest.mark.parametrize("message", CONTEXT_ERRORS)
    def test_only_the_overlong_prompt_fails(self, message):
        calls = []

        def chat(conversations):
            calls.append(len(conversations))
            if any(conversation == "too long" for conversation in conversations):
                raise ValueError(message)
            return [worker.Answer(text=f"ok {conversation}") for conversation in conversations]

        answers = worker.chat_isolating_context_errors(chat, ["a", "too long", "b"])
        assert [answer.text for answer in answers] == ["ok a", "", "ok b"]
        assert "too long for the model's context" in answers[1].error
        assert calls == [3, 1, 1, 1]

    def test_other_errors_are_not_swallowed(self):
        def chat(conversations):
            raise ValueError("CUDA out of memory")

        with pytest.raises(ValueError, match="out of memory"):
            worker.chat_isolating_context_errors(chat, ["a"])


def test_manifest_round_trip(tmp_path):
    manifest = {"job_key": "j", "backend": "vllm", "model": "m", "max_model_len": 4096, "max_output_tokens": 300,
                "sampling": {"temperature": 0.1},
                "items": [{"key": "k", "spec_id": "s", "text": "t", "frames": ["a.jpg"]}]}
    job = worker.Job.from_manifest(json.loads(json.dumps(manifest)))
    assert job.items == (worker.JobItem("k", "s", "t", ("a.jpg",)),)
    assert job.sampling == {"temperature": 0.1}


def test_jobs_on_one_machine_take_turns_on_the_gpu(tmp_path):
    import threading
    import time

    order = []
    first_in = threading.Event()

    def job(name: str, hold: float) -> None:
        with worker.holding_gpu(tmp_path / ".gpu.lock"):
            order.append(f"{name} in")
            first_in.set()
            time.sleep(hold)
            order.append(f"{name} out")

    first = threading.Thread(target=job, args=("a", 0.3))
    first.start()
    first_in.wait()
    job("b", 0)
    first.join()
    assert order == ["a in", "a out", "b in", "b out"]
