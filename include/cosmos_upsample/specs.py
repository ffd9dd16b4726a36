"""PromptSpec files: the model, loading with reasons a user can act on, and safe video paths."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from include.cosmos_upsample.storage import is_remote, object_identity, resolve_object

# Spec ids become file names under output_dir/specs, so they must be a single harmless path component.
SPEC_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class SpecError(ValueError):
    """A spec that cannot be used; the message is the report's `reason`."""


class PromptSpec(BaseModel):
    # Unknown fields are kept (extra="allow") so a round trip through this model loses nothing.
    model_config = ConfigDict(extra="allow")

    id: str | None = None
    name: str = ""
    prompt: str
    negative_prompt: str | None = ""
    input_video_path: str | None = None
    control_inputs: dict[str, Any] = Field(default_factory=dict)
    timestamp: str | None = None
    is_upsampled: bool = False
    parent_prompt_text: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


def id_from_file_name(stem: str) -> str:
    """A spec without an `id` is named after its file; any file name works, so characters that cannot be in an
    output file name (spaces, shell metacharacters, bytes that are not UTF-8) become '_'. An explicit `id` is
    checked, never rewritten; two files that end up with the same id are caught as duplicates."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).lstrip("._-")[:128]
    return cleaned or "spec"


def read_spec_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SpecError(f"{path.name}: cannot be read ({exc.strerror}); check the file's permissions") from None


def load_spec(path: Path) -> PromptSpec:
    """Parse a spec file, or raise SpecError naming the file and what to fix."""
    return parse_spec(read_spec_bytes(path), path)


def parse_spec(raw: bytes, path: Path) -> PromptSpec:
    """A spec file's bytes as a PromptSpec (its id from the file name when it has none), or SpecError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path.name}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path.name}: broken JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path.name}: JSON is a {type(data).__name__}, expected an object with a 'prompt'")
    if not isinstance(data.get("prompt"), str) or not data["prompt"].strip():
        raise SpecError(f"{path.name}: missing prompt; add a non-empty \"prompt\" string")
    try:
        spec = PromptSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise SpecError(f"{path.name}: field '{where}': {first['msg']}") from None
    if spec.id is None:
        spec.id = id_from_file_name(path.stem)
    if not SPEC_ID_PATTERN.match(spec.id):
        raise SpecError(
            f"{path.name}: id {spec.id!r} is not usable as a file name; use letters, digits, '.', '_' or '-' "
            "(at most 128, starting with a letter or digit)"
        )
    return spec


def is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_spec_file(path: Path, input_dir: Path) -> None:
    """A spec file that is a symlink leading out of input_dir is refused before it is read. (Object storage has no
    symlinks; its spec keys come from listing input_dir's prefix.)"""
    if is_remote(path):
        return
    if not is_within(Path(os.path.realpath(path)), Path(input_dir).resolve()):
        raise SpecError(f"{path.name}: is a symlink to a file outside input_dir; copy the spec into input_dir")


def resolve_video(spec: PromptSpec, spec_path: Path, input_dir: Path) -> Path:
    """The spec's video as a real path inside input_dir; symlinks and '..' that leave it are refused."""
    if not spec.input_video_path:
        raise SpecError(f"{spec_path.name}: no input_video_path; add the path of the prompt's video")
    return resolve_input_file(spec.input_video_path, "input_video_path", "video", spec_path, input_dir)


def resolve_input_file(raw: str, field: str, noun: str, spec_path: Path, input_dir: Path) -> Path:
    """A file a spec names (its video, a control video) as a real path inside input_dir: relative paths start at
    input_dir; symlinks and '..' that leave it are refused. `field` and `noun` name it in the reason, e.g.
    ("control_inputs.depth", "control video"). A spec in a sub-folder (spec_pattern **/*.json) may also name a file
    next to itself: that is tried first. On object storage the same rules hold for keys (storage.resolve_object)."""
    if is_remote(input_dir):
        return resolve_object(raw, field, noun, spec_path, input_dir)
    root = input_dir.resolve()
    candidate = Path(raw)
    if not candidate.is_absolute():
        candidate = root / candidate
    real = Path(os.path.realpath(candidate))
    beside = Path(os.path.realpath(spec_path.parent / raw))
    if beside != real and is_within(beside, root) and beside.is_file():
        real = beside
    if not is_within(real, root):
        raise SpecError(
            f"{spec_path.name}: {field} {raw!r} leaves input_dir {str(root)!r}; keep videos inside input_dir"
        )
    if not real.exists():
        raise SpecError(f"{spec_path.name}: {noun} {raw!r} not found under input_dir; fix {field} or add the file")
    if not real.is_file():
        raise SpecError(f"{spec_path.name}: {noun} {raw!r} ({field}) is not a regular file")
    if real.stat().st_size == 0:
        raise SpecError(f"{spec_path.name}: {noun} {raw!r} ({field}) is empty (0 bytes); replace it")
    return real


def file_identity(path: Path) -> str:
    """Cheap identity of a (possibly large) file: a changed video gets a new size or mtime (an object: its ETag)."""
    if is_remote(path):
        return object_identity(path)
    stat = path.stat()
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def content_key(spec_id: str, spec_bytes: bytes, video_identity: str, settings_fingerprint: str) -> str:
    """Same spec (its id: the output it makes), same bytes, same video and same settings: the same answer, so the
    output can be reused. The id is part of it: two files with the same bytes and no `id` are two specs (named by
    their files), two items, two outputs."""
    digest = hashlib.sha256()
    for part in (spec_id.encode(), spec_bytes, video_identity.encode(), settings_fingerprint.encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:32]


def original_prompt(spec: PromptSpec) -> str:
    """The user's own short prompt: for an input that was upsampled before (sent again only with `force`), the one
    it kept in parent_prompt_text, so the lineage is never lost."""
    return (spec.parent_prompt_text if spec.is_upsampled else None) or spec.prompt


def upsampled_spec(spec: PromptSpec, new_prompt: str, provenance: dict[str, Any]) -> dict[str, Any]:
    """The output spec: new prompt, original kept in parent_prompt_text, provenance in metadata.upsampling."""
    data = spec.model_dump(mode="json")
    data["prompt"] = new_prompt
    data["is_upsampled"] = True
    data["parent_prompt_text"] = original_prompt(spec)
    data["metadata"] = {**spec.metadata, "upsampling": provenance}
    return data
