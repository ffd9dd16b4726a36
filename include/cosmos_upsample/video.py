"""Videos: probe with ffprobe and extract hint frames by seeking, through ffmpeg-python.

Frames are taken by input seeking (`-ss` before `-i`), one seek per frame in a single ffmpeg process, so a long
clip costs about what a short one does: nothing decodes the whole clip. The `first` sampling (the clip's first N
frames, as cosmos-transfer1's `extract_video_frames` in `cosmos_transfer1/utils/misc.py`) selects frames 0..N-1 by
index from one decode of the clip's start. A derived vis/edge hint filters only these frames, never a whole video.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import ffmpeg

HINT_FORMAT_VERSION = "jpg-q2-v1"
# The only demuxers that may open a spec's video. A playlist (hls, concat, dash) inside input_dir would make ffmpeg
# read the files it lists, wherever they are; image demuxers take a still picture for a video.
VIDEO_DEMUXERS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,mpeg,flv,ogg,asf,gif,yuv4mpegpipe"
_REFUSED_DEMUXER = re.compile(r"\[(\w+) @ [^\]]*\] Format not on whitelist")
# The longest one ffprobe/ffmpeg run may take by default (setting `ffmpeg_timeout_seconds`): a 2-frame hint of a 4K
# clip takes about a second here, so a run this long is hung (a damaged file, a stalled network mount), not slow.
DEFAULT_TIMEOUT = 120.0
# ffmpeg's words when it cannot write its output: the output folder's fault, not the video's.
OUTPUT_ERRORS = {"No space left on device": errno.ENOSPC, "Read-only file system": errno.EROFS,
                 "Disk quota exceeded": errno.EDQUOT, "Permission denied": errno.EACCES}


# Derived hints: cosmos-transfer1's "medium" presets (its default `--blur_strength`/`--canny_threshold`), as
# `generate_control_input` (cosmos_transfer1/diffusion/inference/inference_utils.py) runs them through
# `cosmos_transfer1/diffusion/datasets/augmentors/control_input.py` and `diffusion/config/transfer/augmentors.py`.
# The name goes into the hint cache key: change it when the filters change.
DERIVATIONS = {"vis": "vis-bilateral15-0.59-downup10-v1", "edge": "edge-canny-rgb-100-200-v1"}
# Upstream first fits frames into 1280x704 (`resize_frames`, 720p at 16:9) before blurring.
UPSTREAM_FRAME_SIZE = (1280, 704)
VIS_DOWNUP_FACTOR = 10  # AddControlInputBlurDownUp, "medium": (min 4 + max 16) // 2
EDGE_THRESHOLDS = (100, 200)  # AddControlInputEdge, "medium": cv2.Canny(frame, 100, 200)


class VideoError(ValueError):
    """A video that cannot serve as a hint; the message is the report's `reason`."""


@dataclass(frozen=True)
class VideoInfo:
    width: int  # as displayed, after any rotation metadata
    height: int
    duration: float | None
    frame_count: int | None  # exact when the container says, else estimated from duration and rate
    fps: float | None = None  # average frame rate; None when the container does not say


def _first_line(stderr: bytes | None) -> str:
    text = (stderr or b"").decode("utf-8", "replace").strip().splitlines()
    return text[-1] if text else "no message"


def _rotation(stream: dict) -> int:
    for side in stream.get("side_data_list", []):
        if "rotation" in side:
            return abs(int(float(side["rotation"]))) % 180
    return abs(int(stream.get("tags", {}).get("rotate", 0))) % 180


def _frame_rate(stream: dict) -> float | None:
    for key in ("avg_frame_rate", "r_frame_rate"):
        num, _, den = str(stream.get(key, "0/0")).partition("/")
        try:
            rate = float(num) / float(den or 1)
        except (ValueError, ZeroDivisionError):
            continue
        if rate > 0:
            return rate
    return None


def _frame_count(stream: dict, duration: float | None) -> int | None:
    if str(stream.get("nb_frames", "")).isdigit():
        return int(stream["nb_frames"])
    rate = _frame_rate(stream)
    if duration and rate:
        return max(1, round(duration * rate))
    return None


def run_bounded(args: list[str], timeout: float, label: str, doing: str) -> tuple[int, bytes, bytes]:
    """Run ffprobe/ffmpeg with a bound: one still running after `timeout` seconds is killed, and its spec is invalid
    (a hung decode stops that spec, never its chunk). Returns the exit status, stdout and stderr."""
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise VideoError(
            f"{label}: {doing} did not finish within {timeout:g} s (ffmpeg_timeout_seconds) and was stopped; the "
            "file may be damaged or on storage that stalls: re-encode or copy it, or raise that setting") from None
    finally:
        if process.poll() is None:  # timed out, or this task is being stopped: leave no ffmpeg behind
            process.kill()
            process.communicate()
    return process.returncode, out, err


def probe(path: Path, label: str, timeout: float = DEFAULT_TIMEOUT) -> VideoInfo:
    """Size, duration and frame count of the first video stream; VideoError says what is wrong and what to do."""
    # The arguments of ffmpeg-python's `ffmpeg.probe` (ffmpeg/_probe.py), run with a bound: it has none.
    args = ["ffprobe", "-show_format", "-show_streams", "-of", "json", "-format_whitelist", VIDEO_DEMUXERS, str(path)]
    code, out, err = run_bounded(args, timeout, label, "ffprobe")
    if code != 0:
        refused = _REFUSED_DEMUXER.search(err.decode("utf-8", "replace"))
        if refused:
            raise VideoError(
                f"{label}: ffmpeg reads it as {refused[1]}, not as a video (playlists and images are refused: they "
                "can point outside input_dir); use a video file such as MP4, MOV, MKV, WebM, AVI or MPEG-TS"
            )
        raise VideoError(f"{label}: unreadable video ({_first_line(err)}); re-encode it, e.g. as H.264 MP4")
    info = json.loads(out.decode("utf-8"))
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
    return VideoInfo(width, height, duration, _frame_count(stream, duration), _frame_rate(stream))


# Probes kept per process: specs share clips (several prompts per video), and one ffprobe costs ~0.07-0.1 s of
# process start-up, most of a dry run's validation.
PROBE_CACHE_SIZE = 4096
_probed: OrderedDict[tuple, VideoInfo] = OrderedDict()
_probed_lock = threading.Lock()


def probe_once(path: Path, label: str, timeout: float = DEFAULT_TIMEOUT) -> VideoInfo:
    """`probe`, run once per version of a file in this process: keyed by the path and its inode, size, mtime and
    ctime, so a replaced or rewritten video is probed again. Failures are not kept: their reason names the spec."""
    try:
        stat = os.stat(path)
    except OSError:
        return probe(path, label, timeout=timeout)  # probe words what is wrong with it
    key = (str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    with _probed_lock:
        info = _probed.get(key)
        if info is not None:
            _probed.move_to_end(key)
            return info
    info = probe(path, label, timeout=timeout)
    with _probed_lock:
        _probed[key] = info
        if len(_probed) > PROBE_CACHE_SIZE:
            _probed.popitem(last=False)
    return info


def frame_times(duration: float | None, count: int) -> list[float]:
    """Spread `count` frames over the clip, each in the middle of its slice, never at the very end."""
    if not duration or duration <= 0:
        return [0.0] * count
    return [round(duration * (index + 0.5) / count, 3) for index in range(count)]


def first_frame_times(fps: float | None, count: int) -> list[float]:
    """Times of frames 0..count-1 (the `first` sampling), for the report; 0.0 each when the rate is unknown."""
    if not fps:
        return [0.0] * count
    return [round(index / fps, 3) for index in range(count)]


def hint_times(sampling: str, info: VideoInfo, count: int) -> list[float]:
    """Seconds into the clip of each hint frame: `spread` over it, or its `first` frames."""
    if sampling == "first":
        return first_frame_times(info.fps, count)
    return frame_times(info.duration, count)


def hint_key(video_identity: str, width: int, height: int, times: list[float], sampling: str,
             source: str = "input_video", derive: str | None = None) -> str:
    """The hint cache's folder name: what is read, how it is filtered, which frames, at what size."""
    derivation = DERIVATIONS[derive] if derive else "raw"
    raw = (f"{video_identity}|{source}|{derivation}|{sampling}|{','.join(map(str, times))}|{width}x{height}|"
           f"{len(times)}|{HINT_FORMAT_VERSION}")
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


def _vis(stream, source_size: tuple[int, int], width: int, height: int):
    """Upstream's vis blur: at most 1280x704, area-downscaled by 2, `cv2.bilateralFilter(d=30, sigmaColor=150,
    sigmaSpace=100)`, back up, then bicubic down by 10 and up again. What differs: ffmpeg's bilateral is
    recursive, so its spatial sigma (pixels) is set to the 15-pixel radius that upstream's d=30 window truncates
    the 100-pixel Gaussian to; its range sigma is per plane (150/255 of Y, U and V) where OpenCV measures the colour
    distance over all three channels; the last step scales straight to the hint size instead of back to the
    frame's size first."""
    src_w, src_h = source_size
    ratio = min(1.0, UPSTREAM_FRAME_SIZE[0] / src_w, UPSTREAM_FRAME_SIZE[1] / src_h)
    base_w, base_h = int(src_w * ratio + 0.5), int(src_h * ratio + 0.5)
    stream = stream.filter("scale", max(2, base_w // 2), max(2, base_h // 2), flags="area")
    stream = stream.filter("bilateral", sigmaS=15, sigmaR=round(150 / 255, 4), planes=7)
    stream = stream.filter("scale", max(2, int(base_w / VIS_DOWNUP_FACTOR)), max(2, int(base_h / VIS_DOWNUP_FACTOR)),
                           flags="bicubic")
    return stream.filter("scale", width, height, flags="bicubic")


def _edge(stream, width: int, height: int):
    """Upstream's edge map: `cv2.Canny(frame, 100, 200)` on the colour frame, white edges on black. ffmpeg's
    `edgedetect` in canny mode runs the same Canny (L1 Sobel gradient, non-maximum suppression, hysteresis, the
    thresholds as fractions of 255) on each of R, G and B; the brightest of the three then makes the white-on-black
    map. What differs: OpenCV takes the strongest channel's gradient before suppression where this joins the three
    channels' edges after it; ffmpeg smooths with a 5x5 Gaussian first (OpenCV does not), so weak edges drop out
    sooner; and it runs at the hint size, not at up to 1280x704, so edges stay one pixel wide in what the model
    sees."""
    low, high = EDGE_THRESHOLDS
    stream = stream.filter("scale", width, height).filter("format", "gbrp")
    stream = stream.filter("edgedetect", low=round(low / 255, 4), high=round(high / 255, 4), mode="canny")
    brightest = "max(max(r(X,Y),g(X,Y)),b(X,Y))"
    return stream.filter("geq", r=brightest, g=brightest, b=brightest)


def hint_frame_stream(stream, width: int, height: int, derive: str | None = None,
                      source_size: tuple[int, int] | None = None):
    """One frame's filters: scaled to the hint size, derived (vis blur / edge map) first when asked."""
    if derive == "vis":
        return _vis(stream, source_size or (width, height), width, height)
    if derive == "edge":
        return _edge(stream, width, height)
    return stream.filter("scale", width, height)


def extract_frames(video: Path, times: list[float], width: int, height: int, out_dir: Path, label: str, *,
                   first: bool = False, derive: str | None = None, source_size: tuple[int, int] | None = None,
                   timeout: float = DEFAULT_TIMEOUT) -> None:
    """Write frame-NN.jpg into out_dir in one ffmpeg process: one input seek per frame (`times`), or with `first`
    frames 0..N-1 selected by index from a single decode of the clip's start."""
    names = frame_names(len(times))
    outputs = []
    shared = ffmpeg.input(str(video), format_whitelist=VIDEO_DEMUXERS) if first else None
    for index, (name, seconds) in enumerate(zip(names, times, strict=True)):
        if shared is not None:
            frame = shared.video.filter("select", f"eq(n,{index})")
        else:
            seek = {"ss": seconds} if seconds else {}
            frame = ffmpeg.input(str(video), format_whitelist=VIDEO_DEMUXERS, **seek).video
        frame = hint_frame_stream(frame, width, height, derive, source_size)
        outputs.append(frame.output(str(out_dir / name), vframes=1, **{"q:v": 2}))
    args = ffmpeg.merge_outputs(*outputs).global_args("-nostdin", "-v", "error").compile(overwrite_output=True)
    code, _, err = run_bounded(args, timeout, label, "ffmpeg extracting its hint frames")
    if code != 0:
        _raise_if_output_error(err, out_dir)
        raise VideoError(f"{label}: frame extraction failed ({_first_line(err)}); the video may be corrupt")
    for name, seconds in zip(names, times, strict=True):
        produced = out_dir / name
        if not produced.exists() or produced.stat().st_size == 0:
            raise VideoError(
                f"{label}: no frame could be decoded at {seconds:.2f}s; the video is probably truncated, re-encode it"
            )


def cached_hint(cache_dir: Path, video: Path, times: list[float], width: int, height: int, label: str, *,
                first: bool = False, derive: str | None = None,
                source_size: tuple[int, int] | None = None, timeout: float = DEFAULT_TIMEOUT) -> list[Path]:
    """The hint frames in cache_dir, extracted once: a temp folder renamed into place, so no half hint is seen.
    cache_dir's name must hold everything that makes the frames (see `hint_key`)."""
    names = frame_names(len(times))
    if all((cache_dir / name).is_file() for name in names):
        return [cache_dir / name for name in names]
    # Specs that share a clip share its hints: the chunk's other thread waits for this one's frames.
    with _hint_lock(cache_dir):
        if all((cache_dir / name).is_file() for name in names):
            return [cache_dir / name for name in names]
        _extract_into(cache_dir, names, video, times, width, height, label, first=first, derive=derive,
                      source_size=source_size, timeout=timeout)
    return [cache_dir / name for name in names]


_hint_locks: dict[str, threading.Lock] = {}
_hint_locks_lock = threading.Lock()


def _hint_lock(cache_dir: Path) -> threading.Lock:
    with _hint_locks_lock:
        if len(_hint_locks) > PROBE_CACHE_SIZE:
            _hint_locks.clear()  # only a race between this process's threads is at stake; a rare repeat is harmless
        return _hint_locks.setdefault(str(cache_dir), threading.Lock())


def _extract_into(cache_dir: Path, names: list[str], video: Path, times: list[float], width: int, height: int,
                  label: str, **how) -> None:
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", dir=cache_dir.parent))
    try:
        extract_frames(video, times, width, height, staging, label, **how)
        try:
            staging.rename(cache_dir)
        except OSError:
            # Another task made the same hint meanwhile; theirs is identical.
            if not all((cache_dir / name).is_file() for name in names):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
