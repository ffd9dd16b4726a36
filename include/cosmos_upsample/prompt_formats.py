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

`cosmos3_structured` asks for a Cosmos 3 style structured prompt: one JSON object (`COSMOS3_VIDEO_SCHEMA`), sent as
a JSON Schema `response_format` and checked against it (check `schema`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
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
# What the frames are, by the video they come from (the report's `hint.source`): an instruction's `$frames`. The control
# modalities as NVIDIA describes them to its Cosmos 3 transfer upsampler (NVIDIA/cosmos-framework,
# `cosmos_framework/model/generator/upsampler/prompts.py`, `_TRANSFER_CONTROL_MODALITY_PHRASES` and task constraint 3
# of `_TEMPLATE_TRANSFER_STRUCTURED_V4_2`), in our words.
FRAMES_SHOWN = {
    "input_video": "frames of the video to be transformed: keep its subjects, setting and motion",
    "vis": "frames of the blurred (vis) control video: keep its coarse layout, colours and motion",
    "edge": "frames of the Canny-edge control video: keep its outlines, object boundaries and motion",
    "seg": "frames of the colour-coded segmentation control video: keep its objects, regions and their placement",
    "depth": "frames of the per-pixel depth control video: keep its 3D structure and foreground/background layout",
}


def _text(max_length: int, description: str) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_length, "description": description}


def _object(fields: dict[str, dict[str, Any]], description: str = "") -> dict[str, Any]:
    schema = {"type": "object", "properties": fields, "required": list(fields), "additionalProperties": False}
    return {**schema, "description": description} if description else schema


def _list(item: dict[str, Any], max_items: int, description: str, min_items: int = 0) -> dict[str, Any]:
    return {"type": "array", "items": item, "minItems": min_items, "maxItems": max_items, "description": description}


# Cosmos 3's video JSON prompt, written as a JSON Schema. The fields and their meaning follow NVIDIA's template for
# its upsampler (NVIDIA/cosmos-framework, `cosmos_framework/inference/prompting_templates/external_api/
# t2v_i2v_video_json_schema.json`; the transfer variant `_TEMPLATE_TRANSFER_OUTPUT_JSON_V4_2` in
# `cosmos_framework/model/generator/upsampler/prompts.py` keeps the subject fields below). Left out: the generation
# parameters resolution, aspect_ratio, duration and fps, which NVIDIA's client pins after the answer from its own
# arguments (`_apply_t2v_output_parameters`), and the human-only and audio fields a control-video transfer has no use
# for. Every string has a length bound: the grammar of a JSON Schema `response_format` then closes every field, so a
# model that rambles still returns one whole object instead of being cut off mid-string.
_SHORT, _MEDIUM, _LONG = 80, 300, 1000
COSMOS3_VIDEO_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Cosmos 3 structured video prompt",
    **_object({
        "subjects": _list(_object({
            "description": _text(_LONG, "full visual description of the subject: appearance, colours, materials"),
            "appearance_details": _text(_MEDIUM, "further visible details: accessories, markings, distinguishing "
                                                 "features"),
            "relationship": _text(_MEDIUM, "how the subject relates to the other subjects and to the scene"),
            "location": _text(_SHORT, "where in the frame, e.g. 'center foreground', 'left background'"),
            "relative_size": _text(_SHORT, "size within the frame: small, medium or large"),
            "orientation": _text(_SHORT, "which way the subject faces relative to the camera"),
            "pose": _text(_MEDIUM, "body position and posture"),
            "action": _text(_MEDIUM, "what the subject does, briefly"),
            "state_changes": _text(_MEDIUM, "how pose or action change over the clip; 'No significant change.' "
                                            "if static"),
        }), 8, "every subject of the video", min_items=1),
        "background_setting": _text(_LONG, "the environment and setting, in full prose"),
        "lighting": _object({
            "conditions": _text(_MEDIUM, "type and quality of the light, e.g. overcast daylight, studio lighting"),
            "direction": _text(_SHORT, "where the light comes from, e.g. front-lit, side-lit from the right"),
            "shadows": _text(_MEDIUM, "the shadows and where they fall"),
            "illumination_effect": _text(_MEDIUM, "the overall effect of the light on the scene"),
        }),
        "aesthetics": _object({
            "composition": _text(_MEDIUM, "framing and compositional choices"),
            "color_scheme": _text(_MEDIUM, "dominant colours and palette"),
            "mood_atmosphere": _text(_MEDIUM, "the emotional atmosphere, in short phrases"),
        }),
        "cinematography": _object({
            "camera_motion": _text(_MEDIUM, "camera movement, e.g. static, pan left, tracking shot, handheld"),
            "framing": _text(_SHORT, "shot type, e.g. close-up, medium shot, wide shot"),
            "camera_angle": _text(_SHORT, "angle, e.g. eye-level, low angle, overhead"),
            "depth_of_field": _text(_SHORT, "shallow, deep or uniform"),
            "focus": _text(_MEDIUM, "what is in sharp focus"),
            "lens_focal_length": _text(_SHORT, "descriptive focal length, e.g. wide-angle, standard, telephoto"),
        }),
        "style_medium": _text(_SHORT, "visual medium, e.g. live-action video, CGI, drone footage"),
        "artistic_style": _text(_SHORT, "genre or approach, e.g. realistic, cinematic, documentary"),
        "context": _text(_MEDIUM, "scene context or use case, briefly"),
        "text_and_signage_elements": _list(_text(_MEDIUM, "one visible text, sign or label and where it is"), 8,
                                           "visible text and signage; [] when there is none"),
        "actions": _list(_object({
            "time": _text(_SHORT, "'M:SS-M:SS' within the clip, e.g. '0:00-0:04'"),
            "description": _text(_MEDIUM, "what happens in this interval"),
        }), 12, "the timed events of the video", min_items=1),
        "segments": _list(_object({
            "segment_index": {"type": "integer", "minimum": 0, "description": "0-based index"},
            "time_range": _text(_SHORT, "'M:SS-M:SS' spanning this segment"),
            "description": _text(_MEDIUM, "what happens in this segment"),
            "key_changes": _text(_MEDIUM, "notable changes within the segment"),
            "camera": _text(_MEDIUM, "camera behaviour in this segment"),
        }), 8, "the video's segments in order", min_items=1),
        "transitions": _list(_text(_MEDIUM, "one transition between segments"), 8,
                             "transitions between segments; [] for a single continuous shot"),
        "temporal_caption": _text(2000, "a temporally coherent narrative of the whole video, beat by beat in M:SS "
                                        "time"),
    }),
}


def schema_outline(schema: dict[str, Any]) -> Any:
    """The schema as the answer's shape with each field's description in place of its value: what the model reads
    (upstream shows its template the same way; the grammar then holds the answer to the schema itself)."""
    kind = schema.get("type")
    if kind == "object":
        return {name: schema_outline(field) for name, field in schema["properties"].items()}
    if kind == "array":
        return [schema_outline(schema["items"])]
    if kind == "integer":
        return f"integer; {schema.get('description', '')}".rstrip("; ")
    return schema.get("description", "")


# Our own words for the task NVIDIA's `t2v_i2v_video_prompt.txt` and the transfer instructions of `prompts.py` set:
# a dense, complete, grounded JSON description; empty values only where a field cannot apply; JSON only.
COSMOS3_INSTRUCTION = (
    "You write prompts for a video generation model. Turn the short request below into one dense JSON description "
    "of the video to generate. The attached images are $frames. Give every field specific, physically plausible "
    "detail consistent with the request and the images, also where the request says nothing about it; leave a "
    "list empty only when it cannot apply (no visible text, a single continuous shot). Times are M:SS within the "
    "clip. Answer with the JSON object only, in this shape:\n"
    + json.dumps(schema_outline(COSMOS3_VIDEO_SCHEMA), indent=1).replace("$", "$$")
)
# NVIDIA's client's system turn (`SYSTEM_MESSAGE` in prompt_upsampling.py).
COSMOS3_SYSTEM = "You are a helpful assistant."
# NVIDIA's client's sampling (`PromptUpsamplerConfig`: temperature 0.7, top_p 0.8, top_k 20; the same defaults in
# `cosmos_framework/inference/args.py`, `PromptUpsamplingOverrides`).
COSMOS3_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.0, "seed": None}


@dataclass(frozen=True)
class PromptFormat:
    name: str
    images_first: bool
    instruction: str | None
    # Sampling when the run's `sampling` Param leaves a field empty (None: the engine's own default).
    sampling: dict[str, Any] = field(default_factory=dict)
    frame_sampling: str = "spread"
    version: str = "v1"
    system: str | None = None  # a system turn before the user turn, counted and sent like the rest
    # The answer's JSON Schema: sent as a `response_format` and checked (`schema`); None: the answer is prose.
    response_schema: dict[str, Any] | None = None

    def user_text(self, prompt: str, hint_source: str | None = None) -> str:
        """The text part of the single user turn; `hint_source` (input_video, vis, edge, seg, depth) fills an
        instruction's `$frames`."""
        prompt = prompt.strip()
        if self.instruction is None:
            return prompt or EMPTY_PROMPT_TEXT
        frames = FRAMES_SHOWN.get(hint_source or "input_video", FRAMES_SHOWN["input_video"])
        return f"{Template(self.instruction).safe_substitute(frames=frames)}\n\nPrompt: {prompt}"

    def content(self, text: str, images: list[Any]) -> list[tuple[str, Any]]:
        """The user turn as ("text", text) / ("image", image) parts, in the order the model is trained on."""
        parts = [("image", image) for image in images]
        return [*parts, ("text", text)] if self.images_first else [("text", text), *parts]

    def chat_messages(self, text: str, images: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """The request's messages in the OpenAI chat form vLLM, llama.cpp and inference services take: the system
        turn if the format has one, then the user turn (`images`: content parts such as {"type": "image_url", ...};
        None: a text-only model, the text as plain content)."""
        if images is None:
            user: dict[str, Any] = {"role": "user", "content": text}
        else:
            parts = self.content(text, images)
            user = {"role": "user", "content": [part if kind == "image" else {"type": "text", "text": part}
                                                for kind, part in parts]}
        return [*([{"role": "system", "content": self.system}] if self.system else []), user]


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
    # After NVIDIA's Cosmos 3 upsampling client (NVIDIA/cosmos-framework, `cosmos_framework/inference/
    # prompt_upsampling.py`, `build_i2v_messages`: the system turn "You are a helpful assistant.", then one user turn
    # with the image first, then the instruction and the request). Frames spread over the clip: the answer describes
    # the whole video's timeline (actions, segments, temporal_caption), not only its opening.
    "cosmos3_structured": PromptFormat(
        name="cosmos3_structured", images_first=True, instruction=COSMOS3_INSTRUCTION, sampling=COSMOS3_SAMPLING,
        frame_sampling="spread", version="cosmos3-v1", system=COSMOS3_SYSTEM, response_schema=COSMOS3_VIDEO_SCHEMA,
    ),
}
# What each backend is run with when `prompt_format` is left empty: the Cosmos upsampler's own format on vLLM; the
# small text-only model needs to be told what to do.
DEFAULT_PROMPT_FORMAT = {"vllm": "cosmos_upsampler", "llama_cpp": "instruction"}
# Backend adjustments to a format's sampling: SmolLM2 repeats itself at low temperature without a penalty.
BACKEND_SAMPLING = {"llama_cpp": {"repetition_penalty": 1.3}}


def frame_content(path: Path) -> dict[str, Any]:
    """A hint frame (a JPEG file) as an image content part with a data URL."""
    return {"type": "image_url",
            "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode("ascii")}}


def request_messages(prompt_format: str, text: str, frames: Iterable[Path]) -> list[dict[str, Any]]:
    """An item's messages as the local engine and an inference service receive them alike."""
    return PROMPT_FORMATS[prompt_format].chat_messages(text, [frame_content(path) for path in frames])


def effective_sampling(prompt_format: str, backend: str, chosen: dict[str, Any]) -> dict[str, Any]:
    """The format's defaults, then the backend's adjustments, then what the run chose (None: not chosen)."""
    merged = {**PROMPT_FORMATS[prompt_format].sampling, **BACKEND_SAMPLING.get(backend, {})}
    merged.update({name: value for name, value in chosen.items() if value is not None})
    return merged
