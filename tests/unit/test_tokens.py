from __future__ import annotations

import pytest

from include.cosmos_upsample.prompt_formats import PROMPT_FORMATS
from include.cosmos_upsample.tokens import (
    PixtralCounter,
    PromptTooLong,
    SearchingPixtralCounter,
    fit_hint,
    scaled_size,
)


@pytest.fixture(scope="module")
def pixtral() -> PixtralCounter:
    return PixtralCounter()


class TestPixtralCounts:
    @pytest.mark.parametrize(
        ("width", "height", "tokens"),
        [(320, 180, 252), (1024, 576, 2340), (1280, 720, 2340), (960, 540, 2074), (16, 16, 2), (512, 512, 1056)],
    )
    def test_image_tokens_match_mistral_common(self, pixtral, width, height, tokens):
        assert pixtral.image_tokens(width, height) == tokens

    def test_count_is_text_plus_images(self, pixtral):
        text = PROMPT_FORMATS["instruction"].user_text("A robot arm picks up a red cup")
        assert pixtral.count(text, 320, 180, 2) == pixtral.count(text, 1, 1, 0) + 2 * 252

    def test_two_960x540_frames_overflow_4096(self, pixtral):
        assert pixtral.count("A robot arm picks up a red cup", 960, 540, 2) > 4096


class TestFitHint:
    def test_largest_fitting_size_is_chosen(self, pixtral):
        text = PROMPT_FORMATS["instruction"].user_text("A robot arm picks up a red cup")
        size = fit_hint(SearchingPixtralCounter(pixtral, text), text, 1280, 720, 2, 3796)
        assert pixtral.count(text, size.width, size.height, 2) <= 3796
        bigger = scaled_size(1280, 720, size.width + 16)
        assert pixtral.count(text, bigger.width, bigger.height, 2) > 3796
        assert abs(size.width / size.height - 16 / 9) < 0.05

    def test_never_larger_than_source(self, pixtral):
        text = PROMPT_FORMATS["instruction"].user_text("short")
        size = fit_hint(SearchingPixtralCounter(pixtral, text), text, 320, 180, 2, 3796)
        assert (size.width, size.height) == (320, 180)

    def test_portrait_keeps_its_orientation(self, pixtral):
        text = PROMPT_FORMATS["instruction"].user_text("short")
        size = fit_hint(SearchingPixtralCounter(pixtral, text), text, 720, 1280, 2, 3796)
        assert size.height > size.width

    def test_prompt_too_long_even_for_smallest_hint_names_numbers(self, pixtral):
        text = PROMPT_FORMATS["instruction"].user_text("word " * 5000)
        with pytest.raises(PromptTooLong, match=r"needs \d+ prompt tokens .* budget of 3796"):
            fit_hint(SearchingPixtralCounter(pixtral, text), text, 1280, 720, 2, 3796)


class TestPromptFormatOrder:
    def test_cosmos_format_counts_the_images_before_the_text(self, pixtral):
        images_first = PixtralCounter(images_first=True)
        tokens = images_first.encode("A red cup", 32, 32, 2)
        # [BOS] [INST] then the first image's tokens ([IMG]=10); the text comes after the last [IMG_END]=13.
        assert tokens[2] == 10 and max(i for i, token in enumerate(tokens) if token == 13) < len(tokens) - 3
        assert pixtral.encode("A red cup", 32, 32, 2)[2] != 10


class TestPlannerTokenizer:
    def test_the_model_folders_own_tekken_is_used_unless_a_tokenizer_is_set(self, tmp_path):
        from include.cosmos_upsample.settings import resolve_settings
        from include.cosmos_upsample.tokens import planner_tokenizer, planner_tokenizer_file

        assert planner_tokenizer_file(resolve_settings({"backend": "vllm"})) is None
        assert "bundled" in planner_tokenizer(resolve_settings({"backend": "vllm"}))
        (tmp_path / "tekken.json").write_text("{}")
        assert planner_tokenizer_file(resolve_settings({"backend": "vllm", "model": str(tmp_path)})) == str(
            tmp_path / "tekken.json")
        chosen = resolve_settings({"backend": "vllm", "model": str(tmp_path), "tokenizer": "/x/tekken.json"})
        assert planner_tokenizer_file(chosen) == "/x/tekken.json"
