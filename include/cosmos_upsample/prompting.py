"""The instruction the model gets: one place, so what is counted is exactly what is sent."""

from __future__ import annotations

# After NVIDIA's own Cosmos prompt upsamplers: describe only what the video shows, concisely.
INSTRUCTION = (
    "Your task is to transform a given prompt into a refined and concise video description, no more than 150 "
    "words. Focus only on the content, not the filming style. Describe the scene, the objects, their motion and "
    "the lighting precisely. Never mention things outside the video, never describe the frames as images, and "
    "answer with the description only."
)

PROMPT_VERSION = "v1"


def build_user_text(prompt: str) -> str:
    """The text part of the single user turn; the hint frames follow it as images (VLM backends only)."""
    return f"{INSTRUCTION}\n\nPrompt: {prompt.strip()}"
