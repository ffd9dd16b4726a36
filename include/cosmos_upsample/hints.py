"""Which video a spec's hint frames come from, chosen as cosmos-transfer1 chooses it.

Upstream (cosmos-transfer1, `cosmos_transfer1/diffusion/inference/world_generation_pipeline.py`,
`_init_prompt_upsampler` and `_process_prompt_upsampler`) shows the Transfer upsampler the control video when the
generation uses one: vis, else edge, else the first of seg/depth in the spec's order; a vis or edge entry without
an `input_control` file is derived from the input video (`generate_control_input` in
`cosmos_transfer1/diffusion/inference/inference_utils.py`: a blur for vis, canny edges for edge). Without control
inputs upstream runs no upsampler for Transfer; here the input video is the hint then, as for every other model.

`control_inputs` takes both shapes: `{"depth": "depth.mp4"}` and upstream's
`{"depth": {"input_control": "depth.mp4", "control_weight": 0.5}}`. Keys other than the four modalities (and the
alias `segmentation`) are kept in the spec and ignored here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from include.cosmos_upsample.specs import PromptSpec, SpecError, file_identity, resolve_input_file, resolve_video

MODALITIES = ("vis", "edge", "seg", "depth")
ALIASES = {"segmentation": "seg"}
# Upstream derives these two from the input video when no file is given; seg and depth need a model to make.
DERIVABLE = ("vis", "edge")
INPUT_VIDEO = "input_video"


@dataclass(frozen=True)
class ControlEntry:
    modality: str  # vis, edge, seg or depth (an alias already mapped)
    key: str  # as written in the spec, for reasons
    path: str | None  # None: no file given


@dataclass(frozen=True)
class HintSource:
    """Where the frames come from: `name` is what the report shows; `derive` ("vis"/"edge") means the frames are
    made from the input video by that filter; `path` is the spec's own string for the file that is read."""

    name: str  # input_video, vis, edge, seg or depth
    path: str | None
    field: str  # the spec field holding `path`, for reasons
    derive: str | None = None

    @property
    def reads_input_video(self) -> bool:
        return self.name == INPUT_VIDEO or self.derive is not None


def _entry_path(value: Any, field: str, spec_name: str) -> str | None:
    if isinstance(value, Mapping):
        value = value.get("input_control")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        return value
    raise SpecError(
        f"{spec_name}: {field} is a {type(value).__name__}; give a video path, either \"{field.split('.')[-1]}\": "
        "\"file.mp4\" or {\"input_control\": \"file.mp4\"}"
    )


def control_entries(control_inputs: Mapping[str, Any], spec_name: str) -> list[ControlEntry]:
    """The spec's control inputs of the four modalities, in the spec's order; unknown keys are left out."""
    entries = []
    for key, value in control_inputs.items():
        modality = ALIASES.get(key, key)
        if modality in MODALITIES:
            field = f"control_inputs.{key}"
            entries.append(ControlEntry(modality, key, _entry_path(value, field, spec_name)))
    return entries


def _from_entry(entry: ControlEntry) -> HintSource:
    if entry.path is not None:
        return HintSource(entry.modality, entry.path, f"control_inputs.{entry.key}")
    return HintSource(entry.modality, None, "input_video_path", derive=entry.modality)


def _auto(entries: list[ControlEntry]) -> HintSource:
    by_modality: dict[str, ControlEntry] = {}
    for entry in entries:
        by_modality.setdefault(entry.modality, entry)
    for modality in DERIVABLE:  # vis before edge, wherever they stand in the spec
        if modality in by_modality:
            return _from_entry(by_modality[modality])
    # Upstream takes the first seg/depth key in the spec's order; one without a file is made by a model at
    # generation time and cannot be a hint, so it is passed over here.
    for entry in entries:
        if entry.path is not None:
            return _from_entry(entry)
    return HintSource(INPUT_VIDEO, None, "input_video_path")


def choose_source(spec: PromptSpec, mode: str, spec_name: str) -> HintSource:
    """The hint source for `hint_source=mode` (auto, input_video, vis, edge, seg, depth); SpecError when the spec
    cannot give the one asked for."""
    entries = control_entries(spec.control_inputs, spec_name)
    if mode == "auto":
        choice = _auto(entries)
    elif mode == INPUT_VIDEO:
        choice = HintSource(INPUT_VIDEO, None, "input_video_path")
    else:
        entry = next((entry for entry in entries if entry.modality == mode), None)
        if entry is not None and (entry.path is not None or mode in DERIVABLE):
            choice = _from_entry(entry)
        elif mode in DERIVABLE:  # asked for, not given: derived from the input video like an empty entry
            choice = HintSource(mode, None, "input_video_path", derive=mode)
        else:
            have = "has no file" if entry is not None else "is missing"
            raise SpecError(
                f"{spec_name}: hint_source is {mode!r} but control_inputs.{entry.key if entry else mode} {have}; "
                f"add {{\"{mode}\": {{\"input_control\": \"file.mp4\"}}}} to control_inputs or set hint_source to "
                "auto or input_video"
            )
    if choice.reads_input_video and not spec.input_video_path:
        how = f"derives the {choice.derive} hint from" if choice.derive else "takes the hint from"
        raise SpecError(f"{spec_name}: no input_video_path, and hint_source {mode!r} {how} it; add the path of "
                        "the prompt's video" + ("" if mode == INPUT_VIDEO else " or a control video"))
    return choice


def resolve_source(choice: HintSource, spec: PromptSpec, spec_path: Path, input_dir: Path) -> Path:
    """The real file the hint reads, under the same input_dir rules as the input video."""
    if choice.path is None:
        return resolve_video(spec, spec_path, input_dir)
    return resolve_input_file(choice.path, choice.field, "control video", spec_path, input_dir)


def inputs_identity(spec: PromptSpec, spec_path: Path, input_dir: Path, mode: str) -> str:
    """Identity of every file the hint depends on, for the content key: a changed control video re-upsamples."""
    choice = choose_source(spec, mode, spec_path.name)
    parts = [file_identity(resolve_source(choice, spec, spec_path, input_dir)), choice.name, choice.derive or ""]
    if spec.input_video_path and not choice.reads_input_video:
        parts.append(file_identity(resolve_video(spec, spec_path, input_dir)))
    return "|".join(parts)
