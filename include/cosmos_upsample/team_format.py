"""A team's own request format without code: Params `prompt_template` (a Jinja2 file that renders the user turn's
text from the spec) and `response_schema` (a JSON Schema file the answer must follow).

The template replaces the prompt format's text; everything else (system turn, frames and their order, sampling) stays
the chosen prompt format's. The schema is sent as the request's JSON Schema `response_format` and checked on every
answer (check `schema`), like cosmos3_structured's own. Both files are read where the planner runs (the Airflow
workers); the rendered text and the schema travel in the job's manifest, so the model side never reads them.
Their contents are part of the format's version, hence of every content key: editing either re-upsamples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from include.cosmos_upsample.prompt_formats import PromptFormat
from include.cosmos_upsample.specs import SpecError


def _read(path: str, what: str, fix: str) -> tuple[str, str]:
    """The file's text and a short digest of it; a missing or unreadable file names the setting to fix."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {path!r} cannot be read ({exc}); {fix}") from None
    return text, hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _stamp(path: str) -> tuple[str, int, int]:
    """Cache key of a file's contents: re-read when it changes."""
    try:
        stat = Path(path).expanduser().stat()
    except OSError:
        return path, -1, -1
    return path, stat.st_mtime_ns, stat.st_size


@lru_cache(maxsize=16)
def _template(stamp: tuple[str, int, int]) -> tuple[Any, str]:
    from jinja2 import StrictUndefined, TemplateSyntaxError
    from jinja2.sandbox import SandboxedEnvironment

    path = stamp[0]
    text, digest = _read(path, "prompt_template", "point the prompt_template Param at a readable Jinja2 file")
    environment = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False)
    try:
        return environment.from_string(text), digest
    except TemplateSyntaxError as exc:
        raise ValueError(f"prompt_template {path!r} is not a valid Jinja2 template (line {exc.lineno}: "
                         f"{exc.message}); fix the file") from None


@lru_cache(maxsize=16)
def _schema(stamp: tuple[str, int, int]) -> tuple[str, str]:
    """The schema as canonical JSON text (hashable, so it can be cached) and its digest."""
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    path = stamp[0]
    text, digest = _read(path, "response_schema", "point the response_schema Param at a readable JSON Schema file")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"response_schema {path!r} is not JSON ({exc}); fix the file") from None
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise ValueError(f"response_schema {path!r} must describe one JSON object (\"type\": \"object\" at the top): "
                         "the answer is stored as one compact JSON object")
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"response_schema {path!r} is not a valid JSON Schema ({exc.message}); fix the file") from None
    return json.dumps(schema, sort_keys=True), digest


def check_files(template_path: str, schema_path: str) -> None:
    """Fail at once, naming the file and the fix, when a given file is missing, unreadable or invalid."""
    if template_path:
        _template(_stamp(template_path))
    if schema_path:
        _schema(_stamp(schema_path))


def team_format(base: PromptFormat, template_path: str, schema_path: str) -> PromptFormat:
    """`base` with the team's schema, versioned by both files' contents."""
    version, schema = base.version, base.response_schema
    if template_path:
        version += f"+template-{_template(_stamp(template_path))[1]}"
    if schema_path:
        text, digest = _schema(_stamp(schema_path))
        version, schema = version + f"+schema-{digest}", json.loads(text)
    return dataclasses.replace(base, version=version, response_schema=schema)


def render_user_text(template_path: str, spec: Any, hint_source: str | None, num_frames: int) -> str:
    """The user turn's text for one spec (a specs.PromptSpec). The spec is data in the template's context, never
    template source; a template that fails on a spec (a field it lacks) makes that spec invalid, with the reason."""
    from jinja2 import TemplateError

    template, _ = _template(_stamp(template_path))
    try:
        text = template.render(spec=spec.model_dump(mode="json"), prompt=spec.prompt.strip(),
                               hint_source=hint_source, num_frames=num_frames).strip()
    except TemplateError as exc:
        raise SpecError(f"prompt_template {template_path!r} failed for spec {spec.id!r}: {exc}") from None
    if not text:
        raise SpecError(f"prompt_template {template_path!r} rendered an empty text for spec {spec.id!r}")
    return text
