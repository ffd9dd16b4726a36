"""Helpers for tests: real videos from ffmpeg, spec files, and `airflow dags test` runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

# The deployment default of the `quality` Param for every test (tests/conftest.py sets COSMOS_UPSAMPLE_QUALITY): the
# content checks off, because the test models cannot pass them and most tiers test other concerns. SmolLM2-135M
# cannot write a Cosmos paragraph, least of all in the 16-64 answer tokens those tiers give it, and the tiny
# random-weight Pixtral writes token soup. Every answer is still judged (and `empty` still applies); the gate's own
# tests pass STRICT_QUALITY (the prompt format's real thresholds) as the `quality` Param, which wins over the default.
QUALITY_ENV = "COSMOS_UPSAMPLE_QUALITY"
RELAXED_QUALITY = {"skip": ["truncated", "too_short", "too_long", "repetition", "meta", "refusal", "language", "echo",
                            "blocklist"]}
STRICT_QUALITY = {"skip": []}


def make_video(path: Path, width: int = 320, height: int = 180, seconds: float = 2.0, rate: int = 12) -> Path:
    """A real H.264 clip from ffmpeg's test source."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate={rate}",
         "-t", str(seconds), "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(path)],
        check=True,
    )
    return path


def make_colour_video(path: Path, first: list[str], rest: str, width: int = 160, height: int = 120,
                      seconds: float = 1.0, rate: int = 10) -> Path:
    """A real H.264 clip of solid colour `rest` whose frames 0, 1, ... are the colours in `first`: which frames a
    hint took is visible in the hint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    boxes = "".join(f",drawbox=c={colour}:t=fill:enable='eq(n,{index})'" for index, colour in enumerate(first))
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"color=c={rest}:s={width}x{height}:r={rate}:d={seconds}",
         "-vf", f"null{boxes}", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(path)],
        check=True,
    )
    return path


def mean_rgb(image: Path) -> tuple[float, float, float]:
    """The average colour of a hint frame, 0-255 per channel."""
    from PIL import Image, ImageStat

    with Image.open(image) as picture:
        return tuple(ImageStat.Stat(picture.convert("RGB")).mean)


def write_spec(folder: Path, stem: str, **fields) -> Path:
    path = folder / f"{stem}.json"
    path.write_text(json.dumps({"id": stem, "prompt": f"A robot arm picks up a red cup ({stem}).", **fields}))
    return path


def run_dag(env: dict[str, str], conf: dict, extra_env: dict[str, str] | None = None,
            expect_success: bool = True) -> subprocess.CompletedProcess:
    """`airflow dags test cosmos_prompt_upsample -c CONF`, exactly as a user runs it."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "dags", "test", "cosmos_prompt_upsample", "-c",
         json.dumps(conf)],
        env={**env, **(extra_env or {})}, capture_output=True, text=True, timeout=1200,
    )
    finished = re.search(r"DagRun Finished: .*? state=(\w+)", result.stdout + result.stderr)
    succeeded = bool(finished) and finished.group(1) == "success"
    if succeeded != expect_success:
        print(result.stdout[-20000:], result.stderr[-20000:])
        raise AssertionError(f"DAG run {'failed' if expect_success else 'succeeded'} unexpectedly")
    return result


def latest_report(output_dir: Path) -> dict:
    reports = sorted((output_dir / "reports").glob("*.json"), key=lambda path: path.stat().st_mtime)
    return json.loads(reports[-1].read_text())
