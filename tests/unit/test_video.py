from __future__ import annotations

import subprocess

import pytest

from include.cosmos_upsample.video import VideoError, cached_hint, frame_times, probe
from tests.helpers import make_video


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

    def test_truncated_video_gives_a_clear_reason(self, tmp_path):
        video = make_video(tmp_path / "long.mp4", 320, 180, seconds=4)
        truncated = tmp_path / "cut.mp4"
        truncated.write_bytes(video.read_bytes()[: video.stat().st_size // 3])
        with pytest.raises(VideoError, match="truncated|corrupt|unreadable"):
            info = probe(truncated, "cut")
            cached_hint(tmp_path / "hint", truncated, frame_times(info.duration, 2), 160, 90, "cut")
