"""Hint source as cosmos-transfer1, through the real DAG (`airflow dags test`, real ffmpeg, SmolLM2 via llama.cpp).

One run over specs whose control videos have their own size and colours, so each item's frames show which video
they came from: `{"depth": "path"}`, `{"segmentation": {"input_control": "path"}}`, a `{"vis": {}}` derived from
the input video, no control inputs, and a control path that leaves input_dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from include.cosmos_upsample.specs import file_identity
from include.cosmos_upsample.video import frame_names, hint_key
from tests.helpers import latest_report, make_colour_video, make_video, mean_rgb, run_dag, write_spec
from tests.reliability.invariants import tree_digest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def hint_run(airflow_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("hint-e2e")
    folder = root / "in"
    make_video(folder / "clip.mp4", 640, 360)
    # depth: 4:3, frames 0 and 1 magenta and yellow; seg: portrait, cyan and red; both blue/white afterwards.
    make_colour_video(folder / "ctl" / "depth.mp4", ["magenta", "yellow"], "blue", 320, 240)
    make_colour_video(folder / "ctl" / "seg.mp4", ["cyan", "red"], "white", 180, 320)
    make_video(root / "outside.mp4", 64, 64)
    write_spec(folder, "plain_shape", input_video_path="clip.mp4", control_inputs={"depth": "ctl/depth.mp4"})
    write_spec(folder, "dict_shape", input_video_path="clip.mp4", control_inputs={
        "keypoint": {"input_control": "ctl/depth.mp4"},  # not a hint modality: kept, ignored
        "segmentation": {"input_control": "ctl/seg.mp4", "control_weight": 0.3},
        "depth": {"input_control": "ctl/depth.mp4"},
    })
    write_spec(folder, "derived_vis", input_video_path="clip.mp4",
               control_inputs={"depth": "ctl/depth.mp4", "vis": {"control_weight": 0.5}})
    write_spec(folder, "no_controls", input_video_path="clip.mp4")
    write_spec(folder, "edge_outside", input_video_path="clip.mp4", control_inputs={"edge": "../outside.mp4"})
    before = tree_digest(folder)
    output_dir = root / "out"
    run_dag(airflow_home, {"input_dir": str(folder), "output_dir": str(output_dir), "frame_sampling": "first",
                           "max_output_tokens": 64})
    report = latest_report(output_dir)
    return folder, output_dir, {item["spec_id"]: item for item in report["items"]}, before


def hint_frames(output_dir: Path, video: Path, item: dict, source: str, derive: str | None = None) -> list[Path]:
    hint = item["hint"]
    key = hint_key(file_identity(video.resolve()), hint["width"], hint["height"], hint["times"], "first", source,
                   derive)
    frames = [output_dir / "hints" / key / name for name in frame_names(hint["frames"])]
    assert all(frame.is_file() for frame in frames), f"no hint frames for {item['spec_id']} under hints/{key}"
    return frames


def sharpness(frame: Path) -> float:
    from PIL import Image

    with Image.open(frame) as picture:
        values = picture.convert("L").tobytes()
    return sum((values[i + 1] - values[i]) ** 2 for i in range(len(values) - 1)) / len(values)


class TestHintSourceRun:
    def test_every_spec_is_reported_with_its_source_and_times(self, hint_run):
        _, _, items, _ = hint_run
        assert {spec_id: item["status"] for spec_id, item in items.items()} == {
            "plain_shape": "upsampled", "dict_shape": "upsampled", "derived_vis": "upsampled",
            "no_controls": "upsampled", "edge_outside": "invalid"}
        assert {spec_id: item["hint"]["source"] for spec_id, item in items.items()} == {
            "plain_shape": "depth", "dict_shape": "seg", "derived_vis": "vis", "no_controls": "input_video",
            "edge_outside": None}
        assert items["plain_shape"]["hint"]["times"] == [0.0, 0.1]  # first frames: index / fps
        assert items["no_controls"]["hint"]["times"] == [0.0, 0.083]
        assert "control_inputs.edge '../outside.mp4' leaves input_dir" in items["edge_outside"]["reason"]

    def test_frames_come_from_the_control_video(self, hint_run):
        folder, output_dir, items, _ = hint_run
        depth, seg = items["plain_shape"], items["dict_shape"]
        assert depth["hint"]["width"] * 3 == depth["hint"]["height"] * 4  # the 4:3 depth clip, not 16:9
        assert seg["hint"]["height"] > seg["hint"]["width"]  # the portrait seg clip
        magenta, yellow = map(mean_rgb, hint_frames(output_dir, folder / "ctl" / "depth.mp4", depth, "depth"))
        cyan, red = map(mean_rgb, hint_frames(output_dir, folder / "ctl" / "seg.mp4", seg, "seg"))
        assert magenta[0] > 200 and magenta[1] < 40 and magenta[2] > 200
        assert yellow[0] > 200 and yellow[1] > 200 and yellow[2] < 40
        assert cyan[0] < 40 and cyan[1] > 200 and cyan[2] > 200
        assert red[0] > 200 and red[1] < 40 and red[2] < 40

    def test_vis_without_a_file_is_derived_from_the_input_video(self, hint_run):
        folder, output_dir, items, _ = hint_run
        vis, raw = items["derived_vis"], items["no_controls"]
        assert (vis["hint"]["width"], vis["hint"]["height"]) == (raw["hint"]["width"], raw["hint"]["height"])
        derived = hint_frames(output_dir, folder / "clip.mp4", vis, "vis", "vis")
        plain = hint_frames(output_dir, folder / "clip.mp4", raw, "input_video")
        for blurred, sharp in zip(derived, plain, strict=True):
            assert sharpness(blurred) < sharpness(sharp) / 4

    def test_outputs_keep_control_inputs_and_record_the_hint(self, hint_run):
        folder, output_dir, items, before = hint_run
        out = json.loads((output_dir / "specs" / "dict_shape.json").read_text())
        assert out["control_inputs"]["keypoint"] == {"input_control": "ctl/depth.mp4"}
        assert out["control_inputs"]["segmentation"]["control_weight"] == 0.3
        assert out["metadata"]["upsampling"]["hint"]["source"] == "seg"
        assert out["metadata"]["upsampling"]["hint"]["times"] == items["dict_shape"]["hint"]["times"]
        assert tree_digest(folder) == before  # inputs untouched
