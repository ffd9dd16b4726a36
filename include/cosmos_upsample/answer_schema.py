"""Structured answers (cosmos3_structured, a team's `response_schema`): the answer must be ONE JSON object valid
against the format's JSON Schema (the quality gate's check `schema`, added through its per-format hook
`quality.judge(..., extra_checks=...)` by `jobformat.Job.judge`), and is stored as compact JSON.

As NVIDIA's Cosmos 3 client reads an answer (NVIDIA/cosmos-framework, `cosmos_framework/inference/
prompt_upsampling.py`, `extract_json_object`: a bare object or one ```json fenced block, nothing else) and writes it
(`_compact_json_object`: `json.dumps` with `ensure_ascii`, because Cosmos 3 was trained on such strings). The schema
is checked with `jsonschema` (in Airflow's environment and in vLLM's), imported only when a structured answer is
checked, so the worker still runs without it for prose formats.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from typing import Any

_FENCED = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.DOTALL)


def json_object(text: str) -> dict[str, Any]:
    """The answer's one JSON object; ValueError saying what is wrong otherwise."""
    cleaned = text.strip()
    fenced = _FENCED.search(cleaned)
    if fenced:
        cleaned = fenced.group(1)
    try:
        # strict=False: a raw tab or newline inside a string is taken as that character (grammar-constrained
        # decoders let models write them, e.g. vLLM 0.32 with xgrammar 0.2.8); the stored form escapes it.
        data = json.loads(cleaned, strict=False)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the answer is not one JSON object ({exc.msg} at character {exc.pos})") from None
    if not isinstance(data, dict):
        raise ValueError(f"the answer is a JSON {type(data).__name__}, not one JSON object")
    return data


def schema_problem(data: dict[str, Any], schema: dict[str, Any]) -> str | None:
    """The most relevant way `data` breaks `schema` (jsonschema's best match), or None when it is valid."""
    from jsonschema import validators
    from jsonschema.exceptions import best_match

    validator = validators.validator_for(schema)(schema)
    error = best_match(validator.iter_errors(data))
    if error is None:
        return None
    where = "/".join(str(part) for part in error.absolute_path) or "the top level"
    return f"the answer breaks the schema at {where}: {error.message}"


def compact(data: dict[str, Any]) -> str:
    """The stored form of a structured answer, as NVIDIA's client writes it."""
    return json.dumps(data, ensure_ascii=True)


def schema_problem_of(text: str, schema: dict[str, Any]) -> str | None:
    """Why `text` is not one JSON object valid against `schema`, or None when it is."""
    try:
        return schema_problem(json_object(text), schema)
    except ValueError as exc:
        return str(exc)


def schema_check(schema: dict[str, Any]) -> Callable[[Any], bool]:
    """The gate's check `schema` for answers to `schema`: fails (True) on a quality.Candidate whose raw answer is
    not one JSON object valid against it."""
    return functools.partial(_breaks_schema, schema=schema)


def _breaks_schema(answer: Any, schema: dict[str, Any]) -> bool:
    return schema_problem_of(answer.raw, schema) is not None


def compact_answer(text: str) -> str:
    """The stored form of an answer that passed `schema`."""
    return compact(json_object(text))
