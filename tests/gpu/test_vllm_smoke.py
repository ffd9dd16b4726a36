"""Opt-in smoke test of the vLLM backend on a real GPU host: `pytest -m gpu tests/gpu`.

Needs an NVIDIA GPU, vllm installed, and the model in the local HF cache (or a path) named by
COSMOS_UPSAMPLE_GPU_MODEL (default: nvidia/Cosmos-UpsamplePrompt1-12B-Transfer). Skipped, with the reason, elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
import worker

from include.cosmos_upsample.jobformat import Ledger
from include.cosmos_upsample.prompt_formats import PROMPT_FORMATS
from include.cosmos_upsample.tokens import PixtralCounter
from include.cosmos_upsample.video import cached_hint, frame_times, probe

pytestmark = pytest.mark.gpu
COSMOS = PROMPT_FORMATS["cosmos_upsampler"]


def _why_not() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU on this machine (nvidia-smi not found): the vLLM backend runs only on a GPU host"
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed here: run this test inside the worker image's gpu target"
    return None


@pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")
def test_vllm_answers_each_prompt_with_frames_and_fails_only_the_overlong_one(tmp_path, sample_video):
    model = os.environ.get("COSMOS_UPSAMPLE_GPU_MODEL", "nvidia/Cosmos-UpsamplePrompt1-12B-Transfer")
    info = probe(sample_video, "clip")
    frames = cached_hint(tmp_path / "hint", sample_video, frame_times(info.duration, 2), 320, 180, "clip")
    items = [{"key": "ok", "spec_id": "cup", "text": COSMOS.user_text("A robot arm picks up a red cup"),
              "frames": [str(frame) for frame in frames]},
             {"key": "long", "spec_id": "long", "text": COSMOS.user_text("cup " * 6000),
              "frames": [str(frame) for frame in frames]}]
    manifest = {"job_key": "gpu-smoke", "backend": "vllm", "model": model, "max_model_len": 4096,
                "max_output_tokens": 300, "prompt_format": "cosmos_upsampler", "sampling": COSMOS.sampling,
                "engine": {"enable_prefix_caching": True}, "items": items}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert worker.run_job(tmp_path) == 0
    entries = {entry["key"]: entry for entry in Ledger.of(tmp_path).entries()}
    assert entries["ok"]["status"] == "ok" and len(entries["ok"]["text"].split()) > 20
    # vLLM's own prompt count equals the count the DAG planned with mistral-common.
    expected = PixtralCounter(images_first=True).count(items[0]["text"], 320, 180, 2)
    assert entries["ok"]["prompt_tokens"] == expected
    assert entries["long"]["status"] == "failed" and "over the budget" in entries["long"]["reason"]
