"""Hint extraction: the project's code path against a plain per-frame ffmpeg loop, and long clips against short.

The project's path is exactly what validate.py runs for one spec (`probe`, `frame_times`, `cached_hint` into a
cold cache folder), in a pool of one thread per core as `validate_entries` uses. The baseline produces the same
frames (same times, size and JPEG quality) with the obvious loop, `ffmpeg -ss T -i clip -frames:v 1 ...` once per
frame, in the same pool. Only throughput ratios measured side by side in one run are reported.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.common import CPUS, median
from include.cosmos_upsample.prompt_formats import PROMPT_FORMATS
from include.cosmos_upsample.tokens import PixtralCounter, SearchingPixtralCounter, fit_hint
from include.cosmos_upsample.video import cached_hint, frame_names, frame_times, probe

NUM_FRAMES = 2
TOKEN_BUDGET = 4096 - 300
TYPICAL_PROMPT = "A robot arm picks up a red cup from a cluttered table and places it on a shelf."


@dataclass(frozen=True)
class HintPlan:
    """What both methods must produce for one clip; worked out before any timing."""

    clip: Path
    times: tuple[float, ...]
    width: int
    height: int


def plan_hint(clip: Path, counter: PixtralCounter) -> HintPlan:
    """The `auto` hint size validate.py would pick for a typical prompt, and its frame times."""
    info = probe(clip, clip.name)
    text = PROMPT_FORMATS["instruction"].user_text(TYPICAL_PROMPT)
    size = fit_hint(SearchingPixtralCounter(counter, text), text, info.width, info.height, NUM_FRAMES, TOKEN_BUDGET)
    return HintPlan(clip, tuple(frame_times(info.duration, NUM_FRAMES)), size.width, size.height)


def project_hint(plan: HintPlan, cache_dir: Path) -> list[Path]:
    """validate_spec's hint work for one spec: probe (for the duration), frame times, cached_hint (cold)."""
    info = probe(plan.clip, plan.clip.name)
    times = frame_times(info.duration, NUM_FRAMES)
    return cached_hint(cache_dir, plan.clip, times, plan.width, plan.height, plan.clip.name)


def bare_frame(plan: HintPlan, index: int, out_dir: Path) -> Path:
    """One frame the plain way: one ffmpeg process, input seek, scale, JPEG quality 2."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / frame_names(len(plan.times))[index]
    subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-y", "-ss", str(plan.times[index]), "-i", str(plan.clip),
         "-frames:v", "1", "-vf", f"scale={plan.width}:{plan.height}", "-q:v", "2", str(out)],
        check=True, capture_output=True,
    )
    return out


def timed_pool(tasks: list[Callable[[], object]]) -> float:
    """Wall seconds to run the tasks on one thread per core (validate_entries' parallelism); errors re-raise."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=CPUS) as pool:
        for future in [pool.submit(task) for task in tasks]:
            future.result()
    return time.perf_counter() - started


def _project_tasks(plans: list[HintPlan], folder: Path) -> list[Callable[[], object]]:
    return [lambda plan=plan, index=index: project_hint(plan, folder / f"clip-{index:03d}")
            for index, plan in enumerate(plans)]


def _bare_tasks(plans: list[HintPlan], folder: Path) -> list[Callable[[], object]]:
    return [lambda plan=plan, index=index, frame=frame: bare_frame(plan, frame, folder / f"clip-{index:03d}")
            for index, plan in enumerate(plans) for frame in range(len(plan.times))]


def same_frames(project_dir: Path, bare_dir: Path) -> bool:
    """Like for like: both methods must have written byte-identical JPEGs."""
    project = sorted(project_dir.rglob("frame-*.jpg"))
    bare = sorted(bare_dir.rglob("frame-*.jpg"))
    names = [path.relative_to(project_dir) for path in project]
    return bool(project) and names == [path.relative_to(bare_dir) for path in bare] and all(
        (project_dir / name).read_bytes() == (bare_dir / name).read_bytes() for name in names)


def hint_throughput(plans: list[HintPlan], rounds: int, scratch: Path) -> dict:
    """Clips per second of both methods over the same clips, alternating which goes first to cancel drift."""
    seconds = {"project": 0.0, "bare": 0.0}
    identical = True
    for round_index in range(rounds):
        folders = {method: scratch / f"round-{round_index}" / method for method in seconds}
        tasks = {"project": _project_tasks(plans, folders["project"]), "bare": _bare_tasks(plans, folders["bare"])}
        order = ("project", "bare") if round_index % 2 == 0 else ("bare", "project")
        for method in order:
            seconds[method] += timed_pool(tasks[method])
        identical = identical and same_frames(folders["project"], folders["bare"])
        shutil.rmtree(scratch / f"round-{round_index}")
    clips = len(plans) * rounds
    project_rate, bare_rate = clips / seconds["project"], clips / seconds["bare"]
    return {"hint_vs_bare_ffmpeg": project_rate / bare_rate, "hint_clips_per_s": project_rate,
            "bare_clips_per_s": bare_rate, "hint_clips": clips, "hint_frames_identical": identical}


def long_vs_short(short: HintPlan, long: HintPlan, reps: int, scratch: Path) -> dict:
    """Median seconds of one project hint for each clip, alternated; seeking makes their ratio about 1."""
    timings: dict[str, list[float]] = {"short": [], "long": []}
    for rep in range(reps):
        pairs = (("short", short), ("long", long)) if rep % 2 == 0 else (("long", long), ("short", short))
        for name, plan in pairs:
            folder = scratch / f"{name}-{rep}"
            started = time.perf_counter()
            project_hint(plan, folder)
            timings[name].append(time.perf_counter() - started)
            shutil.rmtree(folder)
    short_s, long_s = median(timings["short"]), median(timings["long"])
    return {"hint_long_vs_short": long_s / short_s, "hint_short_seconds": short_s, "hint_long_seconds": long_s}
