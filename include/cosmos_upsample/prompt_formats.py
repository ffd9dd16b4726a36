"""How a request is built for each model: the one place both the planner (token counts) and the worker (what is
sent) read, so what is counted is exactly what is sent. Standard library only: the worker image copies this file.

`cosmos_upsampler` is how NVIDIA runs nvidia/Cosmos-UpsamplePrompt1-12B-Transfer (cosmos-transfer1,
`cosmos_transfer1/auxiliary/upsampler/model/upsampler.py`, `PixtralPromptUpsampler._prompt_upsample`): one user turn
holding the frames FIRST, then the user's raw prompt as the only text (no instruction; "describe the following
images" when the prompt is empty), `SamplingParams(temperature=0.6, max_tokens=300)` with vLLM's defaults otherwise
(top_p 1, no repetition penalty), and the frames are the clip's first two (`utils/misc.py`, `extract_video_frames`).
The model is fine-tuned on that format: an instruction would put it off its training distribution.

`instruction` is for models that were not trained on that format (a plain Pixtral, the small text-only SmolLM2):
an instruction paragraph and the prompt, then the frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# After NVIDIA's own Cosmos prompt upsamplers: describe only what the video shows, concisely.
INSTRUCTION = (
    "Your task is to transform a given prompt into a refined and concise video description, no more than 150 "
    "words. Focus only on the content, not the filming style. Describe the scene, the objects, their motion and "
    "the lighting precisely. Never mention things outside the video, never describe the frames as images, and "
    "answer with the description only."
)
# Upstream's text when the user gave no prompt (upsampler.py: `prompt if prompt else "describe the following images"`).
EMPTY_PROMPT_TEXT = "describe the following images"


@dataclass(frozen=True)
class PromptFormat:
    name: str
    images_first: bool
    instruction: str | None
    # Sampling when the run's `sampling` Param leaves a field empty (None: the engine's own default).
    sampling: dict[str, Any] = field(default_factory=dict)
    frame_sampling: str = "spread"
    version: str = "v1"

    def user_text(self, prompt: str) -> str:
        """The text part of the single user turn."""
        prompt = prompt.strip()
        if self.instruction is None:
            return prompt or EMPTY_PROMPT_TEXT
        return f"{self.instruction}\n\nPrompt: {prompt}"

    def content(self, text: str, images: list[Any]) -> list[tuple[str, Any]]:
        """The user turn as ("text", text) / ("image", image) parts, in the order the model is trained on."""
        parts = [("image", image) for image in images]
        return [*parts, ("text", text)] if self.images_first else [("text", text), *parts]


PROMPT_FORMATS = {
    "cosmos_upsampler": PromptFormat(
        name="cosmos_upsampler", images_first=True, instruction=None,
        sampling={"temperature": 0.6, "top_p": 1.0, "repetition_penalty": 1.0, "seed": None},
        frame_sampling="first", version="cosmos-transfer1",
    ),
    "instruction": PromptFormat(
        name="instruction", images_first=False, instruction=INSTRUCTION,
        sampling={"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.0, "seed": 0},
        frame_sampling="spread", version="v1",
    ),
}
# What each backend is run with when `prompt_format` is left empty: the Cosmos upsampler's own format on vLLM; the
# small text-only model needs to be told what to do.
DEFAULT_PROMPT_FORMAT = {"vllm": "cosmos_upsampler", "llama_cpp": "instruction"}
# Backend adjustments to a format's sampling: SmolLM2 repeats itself at low temperature without a penalty.
BACKEND_SAMPLING = {"llama_cpp": {"repetition_penalty": 1.3}}


def effective_sampling(prompt_format: str, backend: str, chosen: dict[str, Any]) -> dict[str, Any]:
    """The format's defaults, then the backend's adjustments, then what the run chose (None: not chosen)."""
    merged = {**PROMPT_FORMATS[prompt_format].sampling, **BACKEND_SAMPLING.get(backend, {})}
    merged.update({name: value for name, value in chosen.items() if value is not None})
    return merged
