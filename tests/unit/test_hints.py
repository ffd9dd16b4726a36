from __future__ import annotations

import json
import os
import re

import pytest

from include.cosmos_upsample.hints import choose_source, control_entries, inputs_identity, resolve_source
from include.cosmos_upsample.specs import PromptSpec, SpecError, load_spec, upsampled_spec


def spec(video: str | None = "in.mp4", **controls) -> PromptSpec:
    return PromptSpec(prompt="A cup", input_video_path=video, control_inputs=controls)


def chosen(mode: str = "auto", video: str | None = "in.mp4", **controls) -> tuple[str, str | None, str | None]:
    choice = choose_source(spec(video, **controls), mode, "s.json")
    return choice.name, choice.path, choice.derive


class TestControlEntries:
    def test_both_shapes_alias_and_unknown_keys(self):
        entries = control_entries({"depth": "d.mp4", "segmentation": {"input_control": "s.mp4", "control_weight": 0.5},
                                   "keypoint": {"input_control": "k.mp4"}, "vis": {}}, "s.json")
        assert [(e.modality, e.key, e.path) for e in entries] == [
            ("depth", "depth", "d.mp4"), ("seg", "segmentation", "s.mp4"), ("vis", "vis", None)]

    @pytest.mark.parametrize("value", [{}, {"input_control": None}, None, "", {"input_control": "  "}])
    def test_entries_without_a_file(self, value):
        assert control_entries({"edge": value}, "s.json")[0].path is None

    @pytest.mark.parametrize("value", [5, ["d.mp4"], {"input_control": 3}])
    def test_malformed_entry_names_the_field(self, value):
        with pytest.raises(SpecError, match=r"^s\.json: control_inputs\.depth is a"):
            control_entries({"depth": value}, "s.json")

    def test_unknown_keys_are_kept_in_the_output_spec(self, tmp_path):
        path = tmp_path / "s.json"
        path.write_text(json.dumps({"prompt": "x", "control_inputs": {"hdmap": {"input_control": "h.mp4"}}}))
        out = upsampled_spec(load_spec(path), "long", {})
        assert out["control_inputs"] == {"hdmap": {"input_control": "h.mp4"}}


class TestAutoRule:
    def test_no_control_inputs_takes_the_input_video(self):
        assert chosen() == ("input_video", None, None)
        assert chosen(hdmap="h.mp4") == ("input_video", None, None)

    def test_vis_before_edge_wherever_they_stand(self):
        assert chosen(edge="e.mp4", depth="d.mp4", vis={"input_control": "v.mp4"}) == ("vis", "v.mp4", None)
        assert chosen(depth="d.mp4", edge={"input_control": "e.mp4"}) == ("edge", "e.mp4", None)

    def test_first_of_seg_and_depth_in_the_spec_order(self):
        assert chosen(depth="d.mp4", seg="s.mp4") == ("depth", "d.mp4", None)
        assert chosen(segmentation={"input_control": "s.mp4"}, depth="d.mp4") == ("seg", "s.mp4", None)

    def test_seg_or_depth_without_a_file_is_passed_over(self):
        assert chosen(seg={}, depth="d.mp4") == ("depth", "d.mp4", None)
        assert chosen(seg={"input_control": None}) == ("input_video", None, None)

    def test_vis_or_edge_without_a_file_is_derived_from_the_input_video(self):
        assert chosen(vis={}, depth="d.mp4") == ("vis", None, "vis")
        assert chosen(edge={"input_control": None}, seg="s.mp4") == ("edge", None, "edge")

    def test_no_input_video_is_fine_when_the_hint_is_a_control_video(self):
        assert chosen(video=None, depth="d.mp4") == ("depth", "d.mp4", None)
        with pytest.raises(SpecError, match="no input_video_path, and hint_source 'auto' derives the vis hint"):
            chosen(video=None, vis={})
        with pytest.raises(SpecError, match="no input_video_path"):
            chosen(video=None)


class TestForcedSource:
    def test_input_video_ignores_control_inputs(self):
        assert chosen("input_video", vis="v.mp4", depth="d.mp4") == ("input_video", None, None)

    def test_a_modality_is_taken_even_when_auto_would_prefer_another(self):
        assert chosen("depth", vis="v.mp4", depth={"input_control": "d.mp4"}) == ("depth", "d.mp4", None)
        assert chosen("seg", segmentation="s.mp4") == ("seg", "s.mp4", None)

    def test_missing_vis_or_edge_is_derived(self):
        assert chosen("edge", depth="d.mp4") == ("edge", None, "edge")
        assert chosen("vis") == ("vis", None, "vis")

    @pytest.mark.parametrize(("controls", "words"), [
        ({}, "control_inputs.seg is missing"),
        ({"vis": "v.mp4"}, "control_inputs.seg is missing"),
        ({"segmentation": {}}, "control_inputs.segmentation has no file"),
    ])
    def test_seg_or_depth_that_cannot_be_had_is_a_clear_reason(self, controls, words):
        with pytest.raises(SpecError, match=words) as info:
            chosen("seg", **controls)
        assert str(info.value).startswith("s.json: hint_source is 'seg'")
        assert "set hint_source to auto or input_video" in str(info.value)


class TestResolveSource:
    """Control paths obey the input video's rules: inside input_dir, no symlink out, present and not empty."""

    @pytest.fixture
    def folder(self, tmp_path):
        inner = tmp_path / "in"
        (inner / "ctl").mkdir(parents=True)
        (inner / "in.mp4").write_bytes(b"video")
        (inner / "ctl" / "d.mp4").write_bytes(b"depth")
        (tmp_path / "secret.mp4").write_bytes(b"secret")
        os.symlink(tmp_path / "secret.mp4", inner / "link.mp4")
        (inner / "empty.mp4").write_bytes(b"")
        return inner

    def resolve(self, folder, mode="auto", **controls):
        one = spec("in.mp4", **controls)
        return resolve_source(choose_source(one, mode, "s.json"), one, folder / "s.json", folder)

    def test_relative_to_input_dir(self, folder):
        assert self.resolve(folder, depth={"input_control": "ctl/d.mp4"}) == (folder / "ctl" / "d.mp4").resolve()
        assert self.resolve(folder, vis={}) == (folder / "in.mp4").resolve()

    @pytest.mark.parametrize(("path", "words"), [
        ("../secret.mp4", "control_inputs.depth '../secret.mp4' leaves input_dir"),
        ("link.mp4", "control_inputs.depth 'link.mp4' leaves input_dir"),
        ("/etc/passwd", "leaves input_dir"),
        ("nope.mp4", "control video 'nope.mp4' not found under input_dir; fix control_inputs.depth"),
        ("empty.mp4", "control video 'empty.mp4' (control_inputs.depth) is empty (0 bytes)"),
        ("ctl", "is not a regular file"),
    ])
    def test_unusable_control_paths_are_refused_with_the_spec_and_field(self, folder, path, words):
        with pytest.raises(SpecError, match=re.escape(words)) as info:
            self.resolve(folder, depth=path)
        assert str(info.value).startswith("s.json: ")

    def test_content_identity_follows_the_control_video(self, folder):
        one = spec("in.mp4", depth="ctl/d.mp4")
        before = inputs_identity(one, folder / "s.json", folder, "auto")
        assert before != inputs_identity(one, folder / "s.json", folder, "input_video")
        (folder / "ctl" / "d.mp4").write_bytes(b"another depth video")
        assert inputs_identity(one, folder / "s.json", folder, "auto") != before
