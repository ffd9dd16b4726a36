from __future__ import annotations

import pytest

from include.cosmos_upsample.prompting import build_user_text
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
        text = build_user_text("A robot arm picks up a red cup")
        assert pixtral.count(text, 320, 180, 2) == pixtral.count(text, 1, 1, 0) + 2 * 252

    def test_two_960x540_frames_overflow_4096(self, pixtral):
        assert pixtral.count("A robot arm picks up a red cup", 960, 540, 2) > 4096


class TestFitHint:
    def test_largest_fitting_size_is_chosen(self, pixtral):
        text = build_user_text("A robot arm picks up a red cup")
        size = fit_hint(SearchingPixtralCounter(pixtral, text), text, 1280, 720, 2, 3796)
        assert pixtral.count(text, size.width, size.height, 2) <= 3796
        bigger = scaled_size(1280, 720, size.width + 16)
        assert pixtral.count(text, bigger.width, bigger.height, 2) > 3796
        assert abs(size.width / size.height - 16 / 9) < 0.05

    def test_never_larger_than_source(self, pixtral):
        text = build_user_text("short")
        size = fit_hint(SearchingPixtralCounter(pixtral, text), text, 320, 180, 2, 3796)
        assert (size.width, size.height) == (320, 180)

    def test_portrait_keeps_its_orientation(self, pixtral):
        text = build_user_text("short")
        size = fit_hint(SearchingPixtralCounter(pixtral, text), text, 720, 1280, 2, 3796)
        assert size.height > size.width

    def test_prompt_too_long_even_for_smallest_hint_names_numbers(self, pixtral):
        text = build_user_text("word " * 5000)
        with pytest.raises(PromptTooLong, match=r"needs \d+ prompt tokens .* budget of 3796"):
            fit_hint(SearchingPixtralCounter(pixtral, text), text, 1280, 720, 2, 3796)
