from __future__ import annotations

import json
import os

import pytest

from include.cosmos_upsample.specs import SpecError, content_key, load_spec, resolve_video, upsampled_spec


def write(tmp_path, name, content: bytes | str):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


class TestLoadSpec:
    @pytest.mark.parametrize(
        ("content", "reason"),
        [
            ('{"prompt": "x",', "broken JSON at line 1"),
            ('["a list"]', "JSON is a list, expected an object"),
            ('{"id": "a"}', "missing prompt"),
            ('{"prompt": "   "}', "missing prompt"),
            (b'{"prompt": "caf\xe9"}', "not valid UTF-8"),
            ('{"prompt": "x", "id": "../escape"}', "not usable as a file name"),
            ('{"prompt": "x", "metadata": "not a dict"}', "field 'metadata'"),
        ],
    )
    def test_bad_specs_name_the_file_and_the_fix(self, tmp_path, content, reason):
        with pytest.raises(SpecError, match=reason) as info:
            load_spec(write(tmp_path, "bad.json", content))
        assert str(info.value).startswith("bad.json: ")

    def test_unknown_fields_are_kept_and_id_defaults_to_stem(self, tmp_path):
        spec = load_spec(write(tmp_path, "cup.json", json.dumps({"prompt": "A cup", "guidance": 7, "extra": [1]})))
        assert spec.id == "cup"
        out = upsampled_spec(spec, "A long description", {"model": "m"})
        assert out["guidance"] == 7 and out["extra"] == [1]
        assert out["prompt"] == "A long description" and out["parent_prompt_text"] == "A cup"
        assert out["is_upsampled"] is True and out["metadata"]["upsampling"] == {"model": "m"}

    def test_an_upsampled_input_sent_again_keeps_the_users_original_prompt(self, tmp_path):
        earlier = {"prompt": "A long description of a red cup on a table.", "is_upsampled": True,
                   "parent_prompt_text": "A cup"}
        out = upsampled_spec(load_spec(write(tmp_path, "cup.json", json.dumps(earlier))), "Another long one", {})
        assert out["prompt"] == "Another long one" and out["parent_prompt_text"] == "A cup"


class TestResolveVideo:
    def spec(self, tmp_path, video_path):
        return load_spec(write(tmp_path, "s.json", json.dumps({"prompt": "x", "input_video_path": video_path})))

    def test_relative_path_inside_input_dir(self, tmp_path):
        (tmp_path / "v.mp4").write_bytes(b"data")
        spec = self.spec(tmp_path, "v.mp4")
        assert resolve_video(spec, tmp_path / "s.json", tmp_path) == (tmp_path / "v.mp4").resolve()

    @pytest.mark.parametrize("video_path", ["../outside.mp4", "/etc/passwd"])
    def test_paths_leaving_input_dir_are_refused(self, tmp_path, video_path):
        inner = tmp_path / "in"
        inner.mkdir()
        (tmp_path / "outside.mp4").write_bytes(b"data")
        with pytest.raises(SpecError, match="leaves input_dir"):
            resolve_video(self.spec(inner, video_path), inner / "s.json", inner)

    def test_symlink_out_of_input_dir_is_refused(self, tmp_path):
        inner = tmp_path / "in"
        inner.mkdir()
        (tmp_path / "secret.mp4").write_bytes(b"data")
        os.symlink(tmp_path / "secret.mp4", inner / "link.mp4")
        with pytest.raises(SpecError, match="leaves input_dir"):
            resolve_video(self.spec(inner, "link.mp4"), inner / "s.json", inner)

    def test_missing_and_empty_videos(self, tmp_path):
        with pytest.raises(SpecError, match="not found"):
            resolve_video(self.spec(tmp_path, "nope.mp4"), tmp_path / "s.json", tmp_path)
        (tmp_path / "empty.mp4").write_bytes(b"")
        with pytest.raises(SpecError, match="empty"):
            resolve_video(self.spec(tmp_path, "empty.mp4"), tmp_path / "s.json", tmp_path)


def test_content_key_changes_with_any_input():
    key = content_key("a", b"spec", "video|1|2", "fp")
    assert key == content_key("a", b"spec", "video|1|2", "fp")
    # The spec's id is part of it: byte-identical files without an id (ids from their names) are two items.
    assert len({key, content_key("b", b"spec", "video|1|2", "fp"), content_key("a", b"spec2", "video|1|2", "fp"),
                content_key("a", b"spec", "video|1|3", "fp"), content_key("a", b"spec", "video|1|2", "fp2")}) == 5
