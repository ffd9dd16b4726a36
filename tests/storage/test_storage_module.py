"""include/cosmos_upsample/storage.py against the real moto S3 server: listing, containment after resolve, atomic
writes, the content-addressed video cache."""

from __future__ import annotations

import os
import time

import pytest

from include.cosmos_upsample.specs import SpecError
from include.cosmos_upsample.storage import (
    VideoCache,
    list_specs,
    object_identity,
    path_from,
    resolve_object,
    write_bytes_atomic,
    write_json,
)

pytestmark = pytest.mark.storage
MIB = 2**20


def _interrupted(first: bytes):
    yield first
    raise ConnectionError("upload interrupted")


@pytest.fixture
def root(bucket, s3_conn):
    return path_from(f"s3://{bucket}/in", s3_conn)


class TestAtomicWrites:
    def test_an_interrupted_upload_leaves_no_object_under_its_final_key(self, root):
        target = root.parent / "out" / "specs" / "a.json"
        # 6 MiB: more than one 5 MiB part, so a multipart upload was under way when the writer failed.
        with pytest.raises(ConnectionError):
            write_bytes_atomic(target, _interrupted(b"x" * 6 * MIB))
        assert not target.exists()
        assert [key for key in target.fs.find(root.parent.path)] == []

    def test_an_interrupted_overwrite_keeps_the_previous_object(self, root):
        target = root.parent / "out" / "specs" / "a.json"
        write_json(target, {"version": 1})
        with pytest.raises(ConnectionError):
            write_bytes_atomic(target, _interrupted(b"{" * (6 * MIB)))
        assert target.read_text() == '{\n  "version": 1\n}\n'

    def test_the_hazard_is_real_on_this_server(self, root):
        """Why the transaction is needed: a plain open("wb") commits what was written before the exception."""
        target = root.parent / "plain.bin"
        with pytest.raises(ConnectionError), target.open("wb") as handle:
            handle.write(b"partial")
            raise ConnectionError("upload interrupted")
        assert target.read_bytes() == b"partial"


class TestListingAndContainment:
    @pytest.fixture
    def tree(self, root):
        for key in ("top.json", "2026/01/a.json", "2026/01/a.mp4", "2026/02/b.json", "2026/02/notes.txt",
                    "shared/clip.mp4"):
            (root / key).write_bytes(b"{}" if key.endswith(".json") else b"\x00video")
        (root / "2026/01/empty.mp4").write_bytes(b"")
        (root.parent / "outside.mp4").write_bytes(b"\x00secret")
        return root

    def test_patterns_select_nested_or_top_level_specs(self, tree):
        assert [p.path.split("/in/")[1] for p in list_specs(tree, "**/*.json")] == [
            "2026/01/a.json", "2026/02/b.json", "top.json"]
        assert [p.name for p in list_specs(tree, "*.json")] == ["top.json"]

    def test_a_video_next_to_the_spec_then_at_input_dir(self, tree):
        spec = tree / "2026/01/a.json"
        assert resolve_object("a.mp4", "input_video_path", "video", spec, tree).path.endswith("/in/2026/01/a.mp4")
        assert resolve_object("shared/clip.mp4", "input_video_path", "video", spec, tree).path.endswith(
            "/in/shared/clip.mp4")

    @pytest.mark.parametrize("raw", ["../../../outside.mp4", "../../../../outside.mp4", "2026/../../outside.mp4",
                                     "/outside.mp4", "s3://elsewhere/x.mp4"])
    def test_keys_that_leave_the_prefix_are_refused_after_resolve(self, tree, raw):
        with pytest.raises(SpecError, match=r"^a\.json: input_video_path .* leaves input_dir"):
            resolve_object(raw, "input_video_path", "video", tree / "2026/01/a.json", tree)

    @pytest.mark.parametrize(("raw", "words"), [("nope.mp4", "not found under input_dir"),
                                                ("empty.mp4", "empty (0 bytes)"),
                                                ("../01", "not an object")])
    def test_missing_empty_and_folder_objects_have_reasons(self, tree, raw, words):
        with pytest.raises(SpecError, match=r"^a\.json: ") as caught:
            resolve_object(raw, "input_video_path", "video", tree / "2026/01/a.json", tree)
        assert words in str(caught.value)

    def test_identity_changes_with_a_new_upload(self, tree):
        video = tree / "shared/clip.mp4"
        before = object_identity(video)
        video.write_bytes(b"\x00other video")
        assert object_identity(video) != before


class TestVideoCache:
    def test_fetched_once_then_hits_by_content(self, root, tmp_path):
        (root / "a/clip.mp4").write_bytes(b"\x00" * 1000)
        (root / "b/same-bytes.mp4").write_bytes(b"\x00" * 1000)
        cache = VideoCache(tmp_path / "videos", max_bytes=10 * MIB)
        first = cache.local_copy(root / "a/clip.mp4")
        assert first.read_bytes() == b"\x00" * 1000 and first.suffix == ".mp4"
        assert cache.local_copy(root / "a/clip.mp4") == first
        assert cache.local_copy(root / "b/same-bytes.mp4") == first  # same content: same entry
        assert cache.stats.as_dict() == {"hits": 2, "downloads": 1, "bytes_downloaded": 1000, "evicted": 0}

    def test_least_recently_used_entries_are_evicted_above_the_cap(self, root, tmp_path):
        cache = VideoCache(tmp_path / "videos", max_bytes=2500)
        paths = []
        for index in range(3):
            (root / f"v{index}.mp4").write_bytes(bytes([index]) * 1000)
            paths.append(cache.local_copy(root / f"v{index}.mp4"))
        assert cache.stats.evicted == 0  # all used within the grace period: none taken from a running task
        hour_ago = time.time() - 3600
        os.utime(paths[0], (hour_ago, hour_ago - 10))
        os.utime(paths[1], (hour_ago, hour_ago))
        assert cache.evict() == 1
        assert not paths[0].exists() and paths[1].exists() and paths[2].exists()
