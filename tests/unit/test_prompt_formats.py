"""Prompt formats as requests: the system turn, the frames' order, cosmos3_structured's instruction and schema, and a
team's own template and schema (Params prompt_template, response_schema)."""

from __future__ import annotations

import json

import pytest
from jsonschema import Draft202012Validator

from include.cosmos_upsample import quality
from include.cosmos_upsample.answer_schema import compact, json_object, schema_problem_of
from include.cosmos_upsample.errors import SettingsError
from include.cosmos_upsample.jobformat import Job, JobItem
from include.cosmos_upsample.prompt_formats import (
    COSMOS3_VIDEO_SCHEMA,
    FRAMES_SHOWN,
    PROMPT_FORMATS,
    schema_outline,
)
from include.cosmos_upsample.settings import resolve_settings
from include.cosmos_upsample.specs import PromptSpec, SpecError
from include.cosmos_upsample.tokens import PixtralCounter

COSMOS3 = PROMPT_FORMATS["cosmos3_structured"]


def strings(schema: dict) -> list[dict]:
    """Every string field of a schema, however deep."""
    if schema.get("type") == "string":
        return [schema]
    found = [field for child in schema.get("properties", {}).values() for field in strings(child)]
    return found + (strings(schema["items"]) if "items" in schema else [])


class TestCosmos3Structured:
    def test_the_schema_is_valid_and_every_field_is_required_and_bounded(self):
        Draft202012Validator.check_schema(COSMOS3_VIDEO_SCHEMA)

        def check(schema: dict) -> None:
            if schema.get("type") == "object":
                assert set(schema["required"]) == set(schema["properties"]) and not schema["additionalProperties"]
                for child in schema["properties"].values():
                    check(child)
            if schema.get("type") == "array":
                assert "maxItems" in schema
                check(schema["items"])

        check(COSMOS3_VIDEO_SCHEMA)
        # A length bound on every string: the grammar closes each field, so an answer is never cut mid-string.
        assert all("maxLength" in field for field in strings(COSMOS3_VIDEO_SCHEMA))

    def test_it_follows_the_fields_of_cosmos_3s_video_prompt(self):
        # Upstream's t2v_i2v_video_json_schema.json top-level keys, less the generation parameters and audio.
        assert list(COSMOS3_VIDEO_SCHEMA["properties"]) == [
            "subjects", "background_setting", "lighting", "aesthetics", "cinematography", "style_medium",
            "artistic_style", "context", "text_and_signage_elements", "actions", "segments", "transitions",
            "temporal_caption"]

    def test_the_model_reads_the_schemas_own_outline_and_the_control_video_it_sees(self):
        text = COSMOS3.user_text("  A robot arm picks up a red cup. ", "edge")
        outline = json.loads(text[text.index("{"):text.rindex("}") + 1])
        assert outline == schema_outline(COSMOS3_VIDEO_SCHEMA)
        assert FRAMES_SHOWN["edge"] in text and "Canny-edge" in text
        assert text.endswith("Prompt: A robot arm picks up a red cup.")
        assert FRAMES_SHOWN["depth"] in COSMOS3.user_text("x", "depth")
        assert FRAMES_SHOWN["input_video"] in COSMOS3.user_text("x", None)

    def test_the_request_is_upstreams_shape_system_turn_then_the_images_then_the_text(self):
        images = [{"type": "image_url", "image_url": {"url": url}} for url in ("data:a", "data:b")]
        system, user = COSMOS3.chat_messages("the text", images)
        assert system == {"role": "system", "content": "You are a helpful assistant."}
        assert user == {"role": "user", "content": [*images, {"type": "text", "text": "the text"}]}
        assert COSMOS3.sampling == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.0,
                                    "seed": None}

    def test_the_other_formats_have_no_system_turn(self):
        assert PROMPT_FORMATS["cosmos_upsampler"].chat_messages("t") == [{"role": "user", "content": "t"}]
        assert PROMPT_FORMATS["instruction"].response_schema is None

    def test_the_planner_counts_the_system_turn_it_sends(self):
        with_system = PixtralCounter(images_first=True, system=COSMOS3.system)
        without = PixtralCounter(images_first=True)
        assert with_system.count("text", 320, 180, 2) > without.count("text", 320, 180, 2)


class TestStructuredAnswers:
    """The gate's check `schema` (answer_schema.py through quality's per-format hook, run by Job.judge as every
    runner judges): one JSON object valid against the schema passes and is stored compact; anything else fails."""

    schema = {"type": "object", "properties": {"scene": {"type": "string", "maxLength": 20}}, "required": ["scene"],
              "additionalProperties": False}

    def judge(self, text, finish_reason="stop", schema=None):
        job = Job("k", "vllm", "m", 4096, 300, prompt_format="instruction", response_schema=schema or self.schema)
        return job.judge(JobItem("k0", "s0", "a cafe at night"), text, finish_reason)

    def test_a_valid_object_is_stored_compact_and_ascii_as_nvidia_writes_it(self):
        verdict = self.judge('{\n  "scene": "caf\u00e9 at night"\n}')
        assert verdict.passed and verdict.text == '{"scene": "caf\\u00e9 at night"}', verdict
        assert compact(json_object(verdict.text)) == verdict.text

    def test_a_fenced_block_is_read_as_upstream_reads_it(self):
        assert self.judge('```json\n{"scene": "a cafe"}\n```').text == '{"scene": "a cafe"}'

    def test_a_raw_tab_inside_a_string_is_kept_escaped(self):
        assert self.judge('{"scene": "a\tcafe"}').text == '{"scene": "a\\tcafe"}'

    @pytest.mark.parametrize(("text", "words"), [
        ('Here you go: {"scene": "a"} {"scene": "b"}', "not one JSON object"),
        ('["scene"]', "a JSON list, not one JSON object"),
        ('{"scene": "a", "extra": 1}', "breaks the schema at the top level: Additional properties"),
        ('{"scene": "' + "x" * 30 + '"}', "breaks the schema at scene"),
        ('{"scene": "a', "not one JSON object"),  # cut off at the token limit
    ])
    def test_anything_else_fails_check_schema_and_says_why(self, text, words):
        verdict = self.judge(text)
        assert not verdict.passed and verdict.failed_checks == ("schema",), verdict
        assert words in schema_problem_of(text, self.schema)

    def test_the_prose_checks_do_not_judge_json(self):
        """A short JSON answer is no `too_short` paragraph without a sentence end: only `blocklist` and `schema`."""
        assert quality.checks_for(quality.STRUCTURED_ANSWERS) == ("blocklist",)
        assert self.judge('{"scene": "a naked mannequin"}').failed_checks == ("blocklist",)

    def test_prose_formats_are_judged_as_prose(self):
        job = Job("k", "vllm", "m", 4096, 300, prompt_format="instruction")
        assert "schema" not in job.judge(JobItem("k0", "s0", "p"), '{"scene": "a"}', "stop").failed_checks


@pytest.fixture
def team_files(tmp_path):
    template = tmp_path / "prompt.j2"
    template.write_text("Scene for {{ spec.id }} ({{ hint_source }}, {{ num_frames }} frames): {{ prompt }}\n"
                        "{% if spec.metadata.style %}Style: {{ spec.metadata.style }}{% endif %}")
    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps(TestStructuredAnswers.schema))
    return template, schema


class TestTeamFormat:
    def test_the_template_renders_the_user_text_from_the_spec(self, team_files):
        template, schema = team_files
        settings = resolve_settings({"backend": "vllm", "prompt_template": str(template),
                                     "response_schema": str(schema)})
        spec = PromptSpec(id="s1", prompt="  A cup.  ", metadata={"style": "noir"})
        assert settings.user_text(spec, "edge") == "Scene for s1 (edge, 2 frames): A cup.\nStyle: noir"
        fmt = settings.format
        assert fmt.name == "cosmos_upsampler" and fmt.images_first  # the base format's layout and sampling
        assert fmt.response_schema == TestStructuredAnswers.schema
        assert "+template-" in fmt.version and "+schema-" in fmt.version

    def test_editing_a_file_changes_the_fingerprint_so_outputs_are_redone(self, team_files):
        template, schema = team_files
        params = {"backend": "vllm", "prompt_template": str(template)}
        before = resolve_settings(params).fingerprint()
        template.write_text("Another text: {{ prompt }}")
        assert resolve_settings(params).fingerprint() != before

    def test_a_spec_the_template_cannot_render_is_that_specs_fault(self, tmp_path):
        template = tmp_path / "prompt.j2"
        template.write_text("{{ spec.metadata.camera }}: {{ prompt }}")
        settings = resolve_settings({"prompt_template": str(template)})
        with pytest.raises(SpecError, match="failed for spec 's2'.*camera"):
            settings.user_text(PromptSpec(id="s2", prompt="p"), None)

    @pytest.mark.parametrize(("name", "content", "words"), [
        ("prompt_template", None, "cannot be read"),
        ("prompt_template", "{% if %}", "not a valid Jinja2 template"),
        ("response_schema", "{not json", "is not JSON"),
        ("response_schema", '{"type": "array"}', "must describe one JSON object"),
        ("response_schema", '{"type": "object", "properties": 3}', "not a valid JSON Schema"),
    ])
    def test_a_bad_file_fails_the_settings_at_once_naming_it(self, tmp_path, name, content, words):
        path = tmp_path / "file"
        if content is not None:
            path.write_text(content)
        with pytest.raises(SettingsError, match=words):
            resolve_settings({name: str(path)})
