"""Validate one spec: parse, choose and find the hint's video, probe it, size the hint to the token budget,
extract the frames.

Every failure becomes an `invalid` item with a reason naming the file and the fix; nothing raised here stops
the other specs of the chunk.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from include.cosmos_upsample.hints import HintSource, choose_source, resolve_source
from include.cosmos_upsample.items import Hint, Item, Tokens, failed_item, invalid_item
from include.cosmos_upsample.layout import OutputLayout
from include.cosmos_upsample.settings import Settings, local_model_path, parse_resolution
from include.cosmos_upsample.specs import PromptSpec, SpecError, check_spec_file, file_identity, load_spec
from include.cosmos_upsample.storage import VideoCache, local_file, path_from
from include.cosmos_upsample.tokens import (
    PixtralCounter,
    PromptTooLong,
    SearchingPixtralCounter,
    fit_hint,
    pixtral_counter,
    planner_tokenizer_file,
)
from include.cosmos_upsample.video import VideoError, VideoInfo, cached_hint, hint_key, hint_times, probe_once

log = logging.getLogger(__name__)


@dataclass
class Counters:
    """The hint is always sized for the Pixtral family; `prompt` counts what the chosen backend receives."""

    pixtral: PixtralCounter
    prompt: object  # a TokenCounter
    frames_sent: bool
    lock: threading.Lock


def make_counters(settings: Settings) -> Counters:
    pixtral = pixtral_counter(planner_tokenizer_file(settings), settings.format.images_first, settings.format.system)
    if settings.backend == "vllm":
        return Counters(pixtral, pixtral, True, threading.Lock())
    from include.cosmos_upsample.tokens import LlamaCppCounter

    return Counters(pixtral, LlamaCppCounter(local_model_path(settings.model_id), settings.format), False,
                    threading.Lock())


@dataclass(frozen=True)
class HintVideo:
    source: HintSource
    path: Path  # as named: a local file or an object in storage (its identity keys the hint cache)
    info: VideoInfo
    label: str  # names the spec and the video in reasons
    local: Path | None = None  # the file ffmpeg reads: `path` itself, or the object's copy in the video cache


def _hint_video(spec: PromptSpec, source: Path, settings: Settings, videos: VideoCache | None = None) -> HintVideo:
    """The video the hint frames come from (hint_source), found under input_dir's rules and probed."""
    choice = choose_source(spec, settings.hint_source, source.name)
    video = resolve_source(choice, spec, source, path_from(settings.input_dir))
    if choice.path is None:
        label = f"{source.name}: video {spec.input_video_path!r}"
        label += f" (deriving the {choice.derive} hint)" if choice.derive else ""
    else:
        label = f"{source.name}: {choice.field} video {choice.path!r}"
    local = local_file(video, videos)
    info = probe_once(local, label, timeout=settings.ffmpeg_timeout_seconds)
    if info.frame_count is not None and info.frame_count < settings.num_frames:
        raise VideoError(
            f"{label} has {info.frame_count} frame(s), fewer than num_frames={settings.num_frames}; "
            "use a longer clip or lower num_frames"
        )
    return HintVideo(choice, video, info, label, local)


def _write_hint(hint: HintVideo, times: list[float], size: tuple[int, int], settings: Settings,
                layout: OutputLayout) -> list[str]:
    sampling = settings.frames_from
    key = hint_key(file_identity(hint.path), size[0], size[1], times, sampling, hint.source.name, hint.source.derive)
    frames = cached_hint(layout.hint_dir(key), hint.local or hint.path, times, size[0], size[1], hint.label,
                         first=sampling == "first", derive=hint.source.derive,
                         source_size=(hint.info.width, hint.info.height), timeout=settings.ffmpeg_timeout_seconds)
    return [str(path) for path in frames]


def validate_spec(source: Path, key: str, settings: Settings, counters: Counters, layout: OutputLayout,
                  videos: VideoCache | None = None, spec_data: dict | None = None) -> Item:
    """`spec_data`: the spec as discover read it (its key hashes those bytes); without it (a spec discover could not
    read) the file is read here, for the reason."""
    budget = settings.token_budget
    try:
        check_spec_file(source, path_from(settings.input_dir))
        spec = PromptSpec.model_validate(spec_data) if spec_data is not None else load_spec(source)
        hint = _hint_video(spec, source, settings, videos)
        text = settings.user_text(spec, hint.source.name)
        size = _hint_size(settings, counters, text, hint.info.width, hint.info.height, source.name)
        frames = settings.num_frames
        with counters.lock:
            prompt_tokens = counters.prompt.count(text, size[0], size[1], frames if counters.frames_sent else 0)
        if prompt_tokens > budget:
            raise PromptTooLong(
                f"{source.name}: needs {prompt_tokens} prompt tokens at hint {size[0]}x{size[1]}, over the budget "
                f"of {budget}; shorten the prompt, lower num_frames or the hint size"
            )
        times = hint_times(settings.frames_from, hint.info, frames)
        frame_paths: list[str] = []
        if not settings.dry_run:
            try:
                frame_paths = _write_hint(hint, times, size, settings, layout)
            except OSError as exc:  # the output folder is full, read-only or gone; the input is fine
                return failed_item(source, f"{source.name}: could not write its hint frames ({exc}); free space or "
                                           f"fix permissions under {layout.hints_dir}, then re-run", budget)
    except (SpecError, VideoError, PromptTooLong) as exc:
        return invalid_item(source, str(exc), budget)
    return Item(
        spec_id=spec.id, source_path=str(source), status="valid", name=spec.name, original_prompt=spec.prompt,
        tokens=Tokens(prompt=prompt_tokens, budget=budget),
        hint=Hint(width=size[0], height=size[1], frames=frames, source=hint.source.name, times=times),
        frames_sent=frames if counters.frames_sent else 0, key=key, text=text, frame_paths=frame_paths,
        spec=spec.model_dump(mode="json"),
    )


def _hint_size(settings: Settings, counters: Counters, text: str, width: int, height: int, name: str):
    if settings.hint_resolution != "auto":
        return parse_resolution(settings.hint_resolution)
    try:
        with counters.lock:
            size = fit_hint(SearchingPixtralCounter(counters.pixtral, text), text, width, height,
                            settings.num_frames, settings.token_budget)
    except PromptTooLong as exc:
        raise PromptTooLong(f"{name}: {exc}") from None
    return size.width, size.height


def validate_entries(entries: list[dict], settings: Settings, layout: OutputLayout,
                     videos: VideoCache | None = None) -> list[Item]:
    """Validate a chunk with one ffmpeg process per core at a time; results keep the chunk's order. `videos`: the
    work_dir cache that object-storage videos are fetched into."""
    counters = make_counters(settings)
    started, total = time.monotonic(), len(entries)
    done = 0

    def one(entry: dict) -> Item:
        nonlocal done
        source = path_from(entry["source_path"])
        try:
            item = validate_spec(source, entry["key"], settings, counters, layout, videos, entry.get("spec"))
        except Exception as exc:  # an input nobody foresaw must not take the chunk's other specs down with it
            log.exception("validating %s crashed", source)
            item = failed_item(source, f"{source.name}: validation crashed ({type(exc).__name__}: {exc}); see the "
                                       "validate task's log", settings.token_budget)
        done += 1
        if done % 10 == 0 or done == total:
            elapsed = time.monotonic() - started
            log.info("validated %d/%d specs, ETA %.0fs", done, total, elapsed / done * (total - done))
        return item

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, entries))
