"""Videos: probe with ffprobe and extract hint frames by seeking, through ffmpeg-python.

Frames are taken by input seeking (`-ss` before `-i`), one seek per frame in a single ffmpeg process, so a long
clip costs about what a short one does: nothing decodes the whole clip.
"""

from __future__ import annotations

import errno
import hashlib
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ffmpeg

HINT_FORMAT_VERSION = "jpg-q2-v1"
# The only demuxers that may open a spec's video. A playlist (hls, concat, dash) inside input_dir would make ffmpeg
# read the files it lists, wherever they are; image demuxers take a still picture for a video.
VIDEO_DEMUXERS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,mpeg,flv,ogg,asf,gif,yuv4mpegpipe"
_REFUSED_DEMUXER = re.compile(r"\[(\w+) @ [^\]]*\] Format not on whitelist")
# ffmpeg's words when it cannot write its output: the output folder's fault, not the video's.
OUTPUT_ERRORS = {"No space left on device": errno.ENOSPC, "Read-only file system": errno.EROFS,
                 "Disk quota exceeded": errno.EDQUOT, "Permission denied": errno.EACCES}


class VideoError(ValueError):
    """A video that cannot serve as a hint; the message is the report's `reason`."""


@dataclass(frozen=True)
class VideoInfo:
    width: int  # as displayed, after any rotation metadata
    height: int
    duration: float | None
    frame_count: int | None  # exact when the container says, else estimated from duration and rate


def _first_line(stderr: bytes | None) -> str:
    text = (stderr or b"").decode("utf-8", "replace").strip().splitlines()
    return text[-1] if text else "no message"


def _rotation(stream: dict) -> int:
    for side in stream.get("side_data_list", []):
        if "rotation" in side:
            return abs(int(float(side["rotation"]))) % 180
    return abs(int(stream.get("tags", {}).get("rotate", 0))) % 180


def _frame_count(stream: dict, duration: float | None) -> int | None:
    if str(stream.get("nb_frames", "")).isdigit():
        return int(stream["nb_frames"])
    rate = stream.get("avg_frame_rate", "0/0")
    num, _, den = rate.partition("/")
    if duration and den not in ("", "0") and float(num) > 0:
        return max(1, round(duration * float(num) / float(den)))
    return None


def probe(path: Path, label: str) -> VideoInfo:
    """Size, duration and frame count of the first video stream; VideoError says what is wrong and what to do."""
    try:
        info = ffmpeg.probe(str(path), format_whitelist=VIDEO_DEMUXERS)
    except ffmpeg.Error as exc:
        refused = _REFUSED_DEMUXER.search((exc.stderr or b"").decode("utf-8", "replace"))
        if refused:
            raise VideoError(
                f"{label}: ffmpeg reads it as {refused[1]}, not as a video (playlists and images are refused: they "
                "can point outside input_dir); use a video file such as MP4, MOV, MKV, WebM, AVI or MPEG-TS"
            ) from None
        raise VideoError(
            f"{label}: unreadable video ({_first_line(exc.stderr)}); re-encode it, e.g. as H.264 MP4"
        ) from None
    streams = [s for s in info.get("streams", []) if s.get("codec_type") == "video"]
    if not streams:
        raise VideoError(f"{label}: no video stream (audio-only or not a video); point it at a video file")
    stream = streams[0]
    width, height = int(stream.get("width") or 0), int(stream.get("height") or 0)
    if width < 2 or height < 2:
        raise VideoError(f"{label}: video has no usable frame size ({width}x{height}); re-encode it")
    if _rotation(stream) == 90:
        width, height = height, width
    raw_duration = stream.get("duration") or info.get("format", {}).get("duration")
    duration = float(raw_duration) if raw_duration not in (None, "N/A") else None
    return VideoInfo(width, height, duration, _frame_count(stream, duration))


def frame_times(duration: float | None, count: int) -> list[float]:
    """Spread `count` frames over the clip, each in the middle of its slice, never at the very end."""
    if not duration or duration <= 0:
        return [0.0] * count
    return [round(duration * (index + 0.5) / count, 3) for index in range(count)]


def hint_key(video_identity: str, width: int, height: int, frames: int) -> str:
    raw = f"{video_identity}|{width}x{height}|{frames}|{HINT_FORMAT_VERSION}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def frame_names(frames: int) -> list[str]:
    return [f"frame-{index:02d}.jpg" for index in range(frames)]


def _raise_if_output_error(stderr: bytes | None, out_dir: Path) -> None:
    """A full or read-only output folder is an OSError naming the folder, so the item fails instead of being
    called invalid for a video that is fine."""
    text = (stderr or b"").decode("utf-8", "replace")
    for words, code in OUTPUT_ERRORS.items():
        if words in text:
            raise OSError(code, f"{words} (ffmpeg writing hint frames)", str(out_dir))


def extract_frames(video: Path, times: list[float], width: int, height: int, out_dir: Path, label: str) -> None:
    """Write frame-NN.jpg into out_dir in one ffmpeg process, one input seek per frame."""
    outputs = []
    for name, seconds in zip(frame_names(len(times)), times, strict=True):
        seek = {"ss": seconds} if seconds else {}
        source = ffmpeg.input(str(video), format_whitelist=VIDEO_DEMUXERS, **seek)
        scaled = source.video.filter("scale", width, height)
        outputs.append(scaled.output(str(out_dir / name), vframes=1, **{"q:v": 2}))
    try:
        ffmpeg.merge_outputs(*outputs).global_args("-nostdin", "-v", "error").run(
            capture_stdout=True, capture_stderr=True, overwrite_output=True
        )
    except ffmpeg.Error as exc:
        _raise_if_output_error(exc.stderr, out_dir)
        raise VideoError(
            f"{label}: frame extraction failed ({_first_line(exc.stderr)}); the video may be corrupt"
        ) from None
    for name, seconds in zip(frame_names(len(times)), times, strict=True):
        produced = out_dir / name
        if not produced.exists() or produced.stat().st_size == 0:
            raise VideoError(
                f"{label}: no frame could be decoded at {seconds:.2f}s; the video is probably truncated, re-encode it"
            )


def cached_hint(cache_dir: Path, video: Path, times: list[float], width: int, height: int, label: str) -> list[Path]:
    """The hint frames in cache_dir, extracted once: a temp folder renamed into place, so no half hint is seen."""
    names = frame_names(len(times))
    if all((cache_dir / name).is_file() for name in names):
        return [cache_dir / name for name in names]
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", dir=cache_dir.parent))
    try:
        extract_frames(video, times, width, height, staging, label)
        try:
            staging.rename(cache_dir)
        except OSError:
            # Another task made the same hint meanwhile; theirs is identical.
            if not all((cache_dir / name).is_file() for name in names):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [cache_dir / name for name in names]
