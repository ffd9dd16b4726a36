from __future__ import annotations

import pytest
from pydantic import ValidationError

from include.cosmos_upsample.settings import DEFAULT_OUTPUT_DIR, SAMPLE_INPUT_DIR, parse_resolution, resolve_settings


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
        with pytest.raises(ValidationError, match="hint_resolution"):
            resolve_settings({"hint_resolution": "huge"})
        with pytest.raises(ValidationError):
            resolve_settings({"runner": "ssh"})
        with pytest.raises(ValidationError, match="needs gpu_conn_ids"):
            resolve_settings({"runner": "docker"})

    def test_fingerprint_follows_what_changes_the_answer(self):
        base = resolve_settings({})
        assert base.fingerprint() == resolve_settings({"force": True, "dry_run": True}).fingerprint()
        assert base.fingerprint() != resolve_settings({"num_frames": 3}).fingerprint()


def test_parse_resolution():
    assert parse_resolution("640x360") == (640, 360)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_resolution("640")
