"""Test clips made once with ffmpeg and kept in bench/.cache/clips (git-ignored)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from bench.common import CLIPS_DIR

RATE = 24
# A keyframe every 2 s at 24 fps and no extra ones on scene cuts, as a camera writes it: a seek lands at most
# 47 frames before the wanted one, so the decode after a seek is bounded the same way it is on real footage.
GOP = 48


def clip(width: int, height: int, seconds: float, variant: int = 0) -> Path:
    """An H.264 testsrc2 clip of this size and length; `variant` makes distinct files of the same shape."""
    path = CLIPS_DIR / f"testsrc2-{width}x{height}-{seconds:g}s-{RATE}fps-g{GOP}-v{variant}.mp4"
    if path.is_file() and path.stat().st_size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.part.mp4")
    # Distinct variants start the test pattern at a different moment, so their bytes (and frames) differ.
    source = f"testsrc2=size={width}x{height}:rate={RATE}"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-y", "-ss", str(variant * 7), "-f", "lavfi", "-i", source,
         "-t", str(seconds), "-c:v", "libx264", "-preset", "ultrafast", "-crf", "26", "-g", str(GOP),
         "-sc_threshold", "0", "-pix_fmt", "yuv420p", str(partial)],
        check=True, capture_output=True,
    )
    partial.rename(path)
    return path


def place(source: Path, folder: Path) -> Path:
    """Put a cached clip inside an input_dir (a hard link: symlinks leaving input_dir are refused by design)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name
    if not target.exists():
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
    return target
