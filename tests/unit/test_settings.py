from __future__ import annotations

import pytest

from include.cosmos_upsample.errors import NotRetryable, SettingsError
from include.cosmos_upsample.settings import (
    DEFAULT_OUTPUT_DIR,
    SAMPLE_INPUT_DIR,
    Settings,
    param_schemas,
    parse_resolution,
    resolve_settings,
)


class TestResolveSettings:
    def test_built_in_defaults(self):
        settings = resolve_settings({})
        assert settings.input_dir == str(SAMPLE_INPUT_DIR)
        assert settings.output_dir == str(DEFAULT_OUTPUT_DIR)
        assert (settings.runner, settings.backend, settings.max_model_len, settings.max_output_tokens) == (
            "local", "llama_cpp", 4096, 300)
        assert settings.token_budget == 3796

    def test_param_beats_variable_beats_environment(self):
        variables = {"cosmos_upsample_output_dir": "/from/variable", "cosmos_upsample_num_frames": "3"}
        # runner docker from the environment needs hosts, which come from the environment too
        environ = {"COSMOS_UPSAMPLE_OUTPUT_DIR": "/from/env", "COSMOS_UPSAMPLE_RUNNER": "docker",
                   "COSMOS_UPSAMPLE_GPU_CONN_IDS": "gpu_a, gpu_b", "COSMOS_UPSAMPLE_FORCE": "true"}
        settings = resolve_settings({"num_frames": None, "model": ""}, variables.get, environ)
        assert settings.output_dir == "/from/variable"
        assert settings.num_frames == 3
        assert settings.runner == "docker"
        assert settings.gpu_conn_ids == ["gpu_a", "gpu_b"]
        assert settings.force is True
        assert resolve_settings({"output_dir": "/from/param"}, variables.get, environ).output_dir == "/from/param"

    def test_bad_values_are_refused(self):
        with pytest.raises(SettingsError, match="hint_resolution"):
            resolve_settings({"hint_resolution": "huge"})
        with pytest.raises(SettingsError):
            resolve_settings({"runner": "ssh"})
        with pytest.raises(SettingsError, match="needs gpu_conn_ids"):
            resolve_settings({"runner": "docker"})

    def test_runner_endpoint_plans_for_a_served_vlm(self):
        settings = resolve_settings({"runner": "endpoint"})
        assert (settings.backend, settings.format.name, settings.endpoint_conn_id, settings.endpoint_concurrency) == (
            "vllm", "cosmos_upsampler", "cosmos_upsample_endpoint", 16)
        with pytest.raises(SettingsError, match="runner 'endpoint' sends frames to a vision-language model"):
            resolve_settings({"runner": "endpoint", "backend": "llama_cpp"})

    def test_a_bad_value_is_a_configuration_error_naming_where_it_came_from(self):
        variables = {"cosmos_upsample_max_model_len": "lots"}
        with pytest.raises(SettingsError) as caught:
            resolve_settings({"num_frames": 0}, variables.get, {"COSMOS_UPSAMPLE_FORCE": "maybe"})
        message = str(caught.value)
        assert "max_model_len (from the Variable cosmos_upsample_max_model_len)" in message
        assert "num_frames (from the num_frames Param)" in message
        assert "force (from env COSMOS_UPSAMPLE_FORCE)" in message
        assert isinstance(caught.value, NotRetryable)  # fails its task at once: a retry reads the same value

    def test_fingerprint_follows_what_changes_the_answer(self):
        base = resolve_settings({})
        assert base.fingerprint() == resolve_settings({"force": True, "dry_run": True}).fingerprint()
        assert base.fingerprint() != resolve_settings({"num_frames": 3}).fingerprint()


def test_parse_resolution():
    assert parse_resolution("640x360") == (640, 360)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_resolution("640")


class TestParamsFromSettings:
    def test_every_run_setting_is_a_nullable_param_saying_what_empty_means(self):
        schemas = param_schemas()
        deployment_only = {"worker_image", "host_model_dir", "host_work_dir", "worker_python", "ledger_sync_seconds",
                           "video_cache_gb", "retention_days", "stall_timeout_seconds", "ffmpeg_timeout_seconds",
                           "endpoint_timeout_seconds", "endpoint_attempts", "blocklist_path",
                           "review_timeout_seconds"}
        assert set(schemas) == set(Settings.model_fields) - deployment_only
        for name, schema in schemas.items():
            assert "null" in schema["type"] and schema["section"] and schema["title"], name
            assert f"Empty: Variable cosmos_upsample_{name}, else env COSMOS_UPSAMPLE_{name.upper()}" in \
                schema["description"], name
        assert schemas["runner"]["enum"] == ["local", "docker", "endpoint", None]
        assert schemas["num_frames"]["minimum"] == 1 and schemas["num_frames"]["maximum"] == 16
        assert schemas["max_model_len"]["description"].endswith("else 4096.")
        assert set(schemas["sampling"]["properties"]) == {"temperature", "top_p", "repetition_penalty", "seed", "top_k"}

    def test_a_value_the_form_accepts_is_accepted_by_the_settings(self):
        import jsonschema

        schemas = param_schemas()
        chosen = {"num_frames": 3, "runner": None, "sampling": {"temperature": 0.4}, "hint_resolution": "320x180"}
        for name, value in chosen.items():
            jsonschema.validate(value, schemas[name])
        assert resolve_settings(chosen).num_frames == 3
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(0, schemas["num_frames"])


class TestPromptFormatDefaults:
    def test_vllm_talks_to_the_cosmos_upsampler_as_nvidia_does(self):
        settings = resolve_settings({"backend": "vllm"})
        assert settings.format.name == "cosmos_upsampler" and settings.frames_from == "first"
        assert settings.effective_sampling == {"temperature": 0.6, "top_p": 1.0, "repetition_penalty": 1.0,
                                               "seed": None}

    def test_the_small_local_model_keeps_its_instruction_and_repeat_penalty(self):
        settings = resolve_settings({})
        assert settings.format.name == "instruction" and settings.frames_from == "spread"
        assert settings.effective_sampling["repetition_penalty"] == 1.3

    def test_params_override_the_formats_defaults(self):
        settings = resolve_settings({"backend": "vllm", "sampling": {"temperature": 0.1, "seed": 7},
                                     "frame_sampling": "spread", "prompt_format": "instruction"})
        assert settings.effective_sampling == {"temperature": 0.1, "top_p": 0.9, "repetition_penalty": 1.0,
                                               "seed": 7}
        assert settings.frames_from == "spread"
        assert settings.fingerprint() != resolve_settings({"backend": "vllm"}).fingerprint()

    def test_spec_pattern_may_not_leave_the_input_folder(self):
        with pytest.raises(SettingsError, match="may not contain"):
            resolve_settings({"spec_pattern": "../*.json"})
