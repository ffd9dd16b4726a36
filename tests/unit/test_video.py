from __future__ import annotations

import subprocess

import pytest

from include.cosmos_upsample.video import (
    VideoError,
    cached_hint,
    first_frame_times,
    frame_names,
    frame_times,
    hint_key,
    hint_times,
    probe,
    probe_once,
)
from tests.helpers import make_colour_video, make_video, mean_rgb


class TestProbe:
    def test_size_duration_and_frames(self, sample_video):
        info = probe(sample_video, "clip")
        assert (info.width, info.height) == (640, 360)
        assert info.duration == pytest.approx(2.0, abs=0.1)
        assert info.frame_count == 24

    def test_audio_only_file_is_refused(self, tmp_path):
        audio = tmp_path / "tone.m4a"
        subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=duration=1", str(audio)], check=True)
        with pytest.raises(VideoError, match="no video stream"):
            probe(audio, "tone")

    def test_garbage_is_refused(self, tmp_path):
        garbage = tmp_path / "x.mp4"
        garbage.write_bytes(b"\x00not a video" * 100)
        with pytest.raises(VideoError, match="unreadable video"):
            probe(garbage, "x")


class TestProbeOnce:
    def test_a_video_is_probed_once_until_it_changes(self, tmp_path, monkeypatch):
        from include.cosmos_upsample import video

        clip = make_video(tmp_path / "clip.mp4", 64, 36, seconds=1)
        probed = []
        monkeypatch.setattr(video, "probe", lambda path, label, **how: probed.append(label) or probe(path, label))
        first = probe_once(clip, "a.json")
        assert probe_once(clip, "b.json") == first and probed == ["a.json"]
        make_video(clip, 80, 48, seconds=1)  # rewritten in place: a new size, mtime and ctime
        assert (probe_once(clip, "c.json").width, probed) == (80, ["a.json", "c.json"])

    def test_failures_are_not_kept_and_name_each_spec(self, tmp_path):
        garbage = tmp_path / "x.mp4"
        garbage.write_bytes(b"\x00not a video" * 100)
        for label in ("a.json", "b.json"):
            with pytest.raises(VideoError, match=f"^{label}: unreadable video"):
                probe_once(garbage, label)


class TestFrames:
    def test_frame_times_spread_inside_the_clip(self):
        assert frame_times(10.0, 2) == [2.5, 7.5]
        assert frame_times(None, 2) == [0.0, 0.0]

    def test_hint_frames_have_the_requested_size_and_are_cached(self, tmp_path, sample_video):
        frames = cached_hint(tmp_path / "hint", sample_video, [0.5, 1.5], 320, 180, "clip")
        assert [path.name for path in frames] == ["frame-00.jpg", "frame-01.jpg"]
        out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=width,height", "-of", "csv=p=0",
                              str(frames[0])], capture_output=True, text=True, check=True).stdout.strip()
        assert out == "320,180"
        mtime = frames[0].stat().st_mtime_ns
        cached_hint(tmp_path / "hint", sample_video, [0.5, 1.5], 320, 180, "clip")
        assert frames[0].stat().st_mtime_ns == mtime

    def test_threads_asking_for_one_hint_extract_it_once(self, tmp_path, sample_video, monkeypatch):
        from concurrent.futures import ThreadPoolExecutor

        from include.cosmos_upsample import video

        runs = []
        real = video.extract_frames
        monkeypatch.setattr(video, "extract_frames", lambda *args, **kwargs: runs.append(1) or real(*args, **kwargs))
        with ThreadPoolExecutor(4) as pool:
            hints = list(pool.map(lambda _: cached_hint(tmp_path / "hint", sample_video, [0.5], 64, 36, "clip"),
                                  range(4)))
        assert len(runs) == 1 and all(hint == hints[0] for hint in hints)

    def test_truncated_video_gives_a_clear_reason(self, tmp_path):
        video = make_video(tmp_path / "long.mp4", 320, 180, seconds=4)
        truncated = tmp_path / "cut.mp4"
        truncated.write_bytes(video.read_bytes()[: video.stat().st_size // 3])
        with pytest.raises(VideoError, match="truncated|corrupt|unreadable"):
            info = probe(truncated, "cut")
            cached_hint(tmp_path / "hint", truncated, frame_times(info.duration, 2), 160, 90, "cut")


def pixels(path):
    from PIL import Image

    with Image.open(path) as picture:
        return list(picture.convert("L").tobytes())


class TestFirstSampling:
    """`first`: frames 0..N-1 as cosmos-transfer1's extract_video_frames reads them; times are index / fps."""

    def test_first_frame_times(self):
        assert first_frame_times(24.0, 3) == [0.0, 0.042, 0.083]
        assert first_frame_times(None, 2) == [0.0, 0.0]

    def test_hint_times_follow_the_sampling(self, sample_video):
        info = probe(sample_video, "clip")
        assert info.fps == pytest.approx(12.0)
        assert hint_times("first", info, 2) == [0.0, 0.083]
        assert hint_times("spread", info, 2) == frame_times(info.duration, 2)

    def test_first_frames_are_frames_zero_and_one(self, tmp_path):
        video = make_colour_video(tmp_path / "c.mp4", ["red", "blue"], "lime")
        info = probe(video, "c")
        first = cached_hint(tmp_path / "first", video, hint_times("first", info, 2), 80, 60, "c", first=True)
        spread = cached_hint(tmp_path / "spread", video, hint_times("spread", info, 2), 80, 60, "c")
        red, blue = (mean_rgb(path) for path in first)
        assert red[0] > 200 and max(red[1:]) < 40 and blue[2] > 200 and max(blue[:2]) < 40
        assert all(colour[1] > 200 and colour[0] < 40 for colour in map(mean_rgb, spread))  # lime, mid-clip


@pytest.fixture(scope="module")
def hints(tmp_path_factory, sample_video):
    root = tmp_path_factory.mktemp("derived")
    info = probe(sample_video, "clip")
    times = frame_times(info.duration, 2)
    made = {}
    for derive in (None, "vis", "edge"):
        for attempt in ("a", "b"):
            made[derive, attempt] = cached_hint(root / f"{derive}-{attempt}", sample_video, times, 320, 180,
                                                "clip", derive=derive, source_size=(info.width, info.height))
    return made


class TestDerivedHints:
    """vis/edge made from the input video's hint frames only, with upstream's medium presets."""

    @pytest.mark.parametrize("derive", ["vis", "edge"])
    def test_derived_frames_differ_from_the_raw_ones_and_are_deterministic(self, hints, derive):
        for index in range(2):
            raw, first, again = (pixels(hints[key][index]) for key in ((None, "a"), (derive, "a"), (derive, "b")))
            assert first == again
            assert sum(abs(a - b) for a, b in zip(raw, first, strict=True)) / len(raw) > 10

    def test_edge_frames_are_mostly_dark_with_bright_edges(self, hints):
        for frame in hints["edge", "a"]:
            values = pixels(frame)
            dark = sum(value < 40 for value in values) / len(values)
            bright = sum(value > 200 for value in values) / len(values)
            assert dark > 0.8 and bright > 0.01
            colour = mean_rgb(frame)
            assert max(colour) - min(colour) < 3  # white on black, not coloured edges

    def test_vis_is_a_blur_of_the_same_picture(self, hints):
        for raw_path, vis_path in zip(hints[None, "a"], hints["vis", "a"], strict=True):
            raw, vis = pixels(raw_path), pixels(vis_path)
            assert abs(sum(raw) / len(raw) - sum(vis) / len(vis)) < 10  # same overall brightness

            def sharpness(values):  # energy of the jumps between horizontal neighbours: a blur spreads each jump
                return sum((values[i + 1] - values[i]) ** 2 for i in range(len(values) - 1)) / len(values)
            assert sharpness(vis) < sharpness(raw) / 4

    def test_frame_names_are_the_same_for_every_source(self, hints):
        assert [path.name for path in hints["edge", "a"]] == frame_names(2)


def test_hint_key_holds_source_derivation_and_sampling():
    base = ("clip|1|2", 320, 180, [0.5, 1.5], "spread")
    keys = {
        hint_key(*base),
        hint_key(*base, source="depth"),
        hint_key(*base, source="vis", derive="vis"),
        hint_key(*base, source="edge", derive="edge"),
        hint_key("clip|1|2", 320, 180, [0.0, 0.083], "first"),
        hint_key("clip|1|2", 320, 180, [0.5], "spread"),
        hint_key("clip|1|3", 320, 180, [0.5, 1.5], "spread"),
    }
    assert len(keys) == 7 and hint_key(*base) == hint_key(*base)


class TestBoundedRuns:
    """ffprobe and ffmpeg never wait forever: a FIFO with no writer makes the real binaries block on their first read,
    as a hung decode (a stalled network mount, a damaged file) does. Validation never hands them one (videos must be
    regular files); these call the video module directly."""

    @pytest.fixture
    def fifo(self, tmp_path):
        import os

        path = tmp_path / "stalled.mp4"
        os.mkfifo(path)
        return path

    def test_a_probe_that_hangs_is_stopped_and_named(self, fifo):
        with pytest.raises(VideoError, match=r"spec\.json: ffprobe did not finish within 1 s \(ffmpeg_timeout_seconds"):
            probe(fifo, "spec.json", timeout=1)
        assert not running_with(fifo)

    def test_an_extraction_that_hangs_is_stopped_and_named(self, fifo, tmp_path):
        from include.cosmos_upsample.video import extract_frames

        with pytest.raises(VideoError, match="ffmpeg extracting its hint frames did not finish within 1 s"):
            extract_frames(fifo, [0.5], 32, 18, tmp_path, "spec.json", timeout=1)
        assert not running_with(fifo)


def running_with(path) -> list[str]:
    """Processes whose command line names `path` (none may outlive a bounded run)."""
    found = subprocess.run(["pgrep", "-f", str(path)], capture_output=True, text=True).stdout.split()
    return found
