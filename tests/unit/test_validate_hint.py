"""validate_spec's hint part in process: real ffmpeg, the real Pixtral tokenizer (mistral-common), real files."""

from __future__ import annotations

import json

import pytest

from include.cosmos_upsample.layout import OutputLayout
from include.cosmos_upsample.settings import Settings
from include.cosmos_upsample.validate import make_counters, validate_spec
from tests.helpers import make_colour_video, make_video, mean_rgb


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("hint-in")
    make_video(root / "in.mp4", 640, 360, seconds=2)
    # Frame 0 magenta, frame 1 yellow, then blue: a 4:3 control clip unlike the 16:9 input video.
    make_colour_video(root / "ctl" / "depth.mp4", ["magenta", "yellow"], "blue", 320, 240)
    make_video(root / "one_frame.mp4", 64, 64, seconds=0.1, rate=10)
    return root


def run(folder, tmp_path, controls, **settings):
    source = folder / f"s{abs(hash(json.dumps(controls, sort_keys=True)))}.json"
    source.write_text(json.dumps({"prompt": "A robot arm picks up a red cup.", "input_video_path": "in.mp4",
                                  "control_inputs": controls}))
    chosen = Settings(input_dir=str(folder), output_dir=str(tmp_path), backend="vllm", **settings)
    return validate_spec(source, "key", chosen, make_counters(chosen), OutputLayout.at(tmp_path))


class TestHintInValidation:
    def test_first_frames_of_the_control_video(self, folder, tmp_path):
        item = run(folder, tmp_path, {"depth": {"input_control": "ctl/depth.mp4", "control_weight": 0.5}})
        assert item.status == "valid", item.reason
        assert item.hint.source == "depth" and item.hint.times == [0.0, 0.1]  # cosmos_upsampler: first frames
        assert item.hint.width * 3 == item.hint.height * 4  # sized on the control video's 4:3, not 16:9
        magenta, yellow = (mean_rgb(path) for path in item.frame_paths)
        assert magenta[0] > 200 and magenta[2] > 200 and magenta[1] < 40
        assert yellow[0] > 200 and yellow[1] > 200 and yellow[2] < 40

    def test_spread_sampling_and_forced_input_video(self, folder, tmp_path):
        item = run(folder, tmp_path, {"depth": "ctl/depth.mp4"}, hint_source="input_video", frame_sampling="spread")
        assert item.status == "valid", item.reason
        assert item.hint.source == "input_video" and item.hint.times == [0.5, 1.5]
        assert item.hint.width * 9 == item.hint.height * 16

    def test_derived_vis_is_recorded_and_cached_apart_from_the_raw_hint(self, folder, tmp_path):
        derived = run(folder, tmp_path, {"vis": {}})
        raw = run(folder, tmp_path, {})
        assert (derived.hint.source, raw.hint.source) == ("vis", "input_video")
        assert derived.hint.times == raw.hint.times == [0.0, 0.083]
        assert derived.frame_paths[0] != raw.frame_paths[0]
        assert derived.frame_paths[0].rsplit("/", 2)[-2] != raw.frame_paths[0].rsplit("/", 2)[-2]

    @pytest.mark.parametrize(("controls", "settings", "words"), [
        ({"seg": {}}, {"hint_source": "seg"}, "hint_source is 'seg' but control_inputs.seg has no file"),
        ({"depth": "../../etc/passwd"}, {}, "control_inputs.depth '../../etc/passwd' leaves input_dir"),
        ({"depth": "one_frame.mp4"}, {}, "control_inputs.depth video 'one_frame.mp4' has 1 frame(s)"),
    ])
    def test_unusable_sources_are_invalid_with_a_reason(self, folder, tmp_path, controls, settings, words):
        item = run(folder, tmp_path, controls, **settings)
        assert item.status == "invalid" and words in item.reason
