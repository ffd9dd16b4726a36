"""Exact prompt token counts with each model's own tokenizer, and the `auto` hint size that fits the budget.

Pixtral family (backend `vllm`): mistral-common's Pixtral-12B tokenizer, the same code vLLM runs with
`tokenizer_mode="mistral"`. The count of a user turn with N images of one size is the count of the text alone plus
N times the count of one image, so the search below tokenizes each size once; the final figure of every item is
still a full encode of the real request (`PixtralCounter.count`).

SmolLM2 (backend `llama_cpp`): text only, counted with the GGUF's own vocabulary and chat template.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from include.cosmos_upsample.prompt_formats import PromptFormat
    from include.cosmos_upsample.settings import Settings

# mistral-common scales any image whose longer side exceeds this; larger hints only cost pixels.
PIXTRAL_MAX_IMAGE_SIDE = 1024
# The smallest hint still worth showing: one 16-pixel patch tall.
MIN_HINT_SIDE = 16


class PromptTooLong(ValueError):
    """Even the smallest hint leaves no room; the message carries the numbers."""


class TokenCounter(Protocol):
    def count(self, text: str, width: int, height: int, frames: int) -> int: ...


@dataclass(frozen=True)
class HintSize:
    width: int
    height: int


def _even(value: float) -> int:
    # Even sides keep every encoder (and chroma subsampling) happy; never below 2.
    return max(2, int(round(value / 2)) * 2)


def scaled_size(src_width: int, src_height: int, width: int) -> HintSize:
    """The aspect-preserving size of the given width."""
    return HintSize(_even(width), _even(width * src_height / src_width))


def largest_allowed_width(src_width: int, src_height: int) -> int:
    """Never larger than the source, nor than what the model would see after its own downscaling."""
    scale = min(1.0, PIXTRAL_MAX_IMAGE_SIDE / max(src_width, src_height))
    return max(2, int(src_width * scale))


def smallest_width(src_width: int, src_height: int) -> int:
    shorter = min(src_width, src_height)
    return max(2, math.ceil(src_width * min(1.0, MIN_HINT_SIDE / shorter)))


def fit_hint(counter: TokenCounter, text: str, src_width: int, src_height: int, frames: int, budget: int) -> HintSize:
    """The largest aspect-preserving hint whose exact prompt count fits the budget (binary search on width).

    The count never falls as the width grows, so the largest fitting width is found in O(log width) counts.
    """
    low, high = smallest_width(src_width, src_height), largest_allowed_width(src_width, src_height)
    low = min(low, high)

    def fits(width: int) -> bool:
        size = scaled_size(src_width, src_height, width)
        return counter.count(text, size.width, size.height, frames) <= budget

    if not fits(low):
        smallest = scaled_size(src_width, src_height, low)
        needed = counter.count(text, smallest.width, smallest.height, frames)
        raise PromptTooLong(
            f"needs {needed} prompt tokens even with {frames} frame(s) at the smallest hint "
            f"{smallest.width}x{smallest.height}, over the budget of {budget} (max_model_len - max_output_tokens); "
            "shorten the prompt or raise max_model_len"
        )
    if fits(high):
        return scaled_size(src_width, src_height, high)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return scaled_size(src_width, src_height, low)


class PixtralCounter:
    """Counts a Pixtral chat request exactly as mistral-common encodes it (what vLLM runs with
    tokenizer_mode="mistral"): the format's system turn, then the text and the images in the format's order."""

    def __init__(self, tokenizer_file: str | None = None, images_first: bool = False,
                 system: str | None = None) -> None:
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        self._tokenizer = (MistralTokenizer.from_file(tokenizer_file) if tokenizer_file
                           else MistralTokenizer.v3(is_tekken=True, is_mm=True))
        self.images_first = images_first
        self.system = system

    def encode(self, text: str, width: int, height: int, frames: int) -> list[int]:
        from mistral_common.protocol.instruct.messages import ImageChunk, SystemMessage, TextChunk, UserMessage
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        images = [ImageChunk(image=_blank_image(width, height))] * frames
        chunks = [*images, TextChunk(text=text)] if self.images_first else [TextChunk(text=text), *images]
        system = [SystemMessage(content=self.system)] if self.system else []
        request = ChatCompletionRequest(messages=[*system, UserMessage(content=chunks)])
        return self._tokenizer.encode_chat_completion(request).tokens

    def count(self, text: str, width: int, height: int, frames: int) -> int:
        return len(self.encode(text, width, height, frames))

    def image_tokens(self, width: int, height: int) -> int:
        return _pixtral_image_tokens(self, width, height)


def planner_tokenizer_file(settings: Settings) -> str | None:
    """The `tokenizer` setting, else the model folder's own tekken.json, else None (mistral-common's bundled
    Pixtral-12B-2409 tokenizer, which nvidia/Cosmos-UpsamplePrompt1-12B-Transfer was fine-tuned from)."""
    if settings.tokenizer:
        return settings.tokenizer
    own = Path(settings.model_id).expanduser() / "tekken.json"
    return str(own) if own.is_file() else None


def planner_tokenizer(settings: Settings) -> str:
    """A name for the planner's tokenizer, for the worker's error when the engine counts differently."""
    return planner_tokenizer_file(settings) or "mistral-common's bundled Pixtral-12B-2409 tekken tokenizer"


@lru_cache(maxsize=8)
def pixtral_counter(tokenizer_file: str | None, images_first: bool, system: str | None = None) -> PixtralCounter:
    """One tokenizer per process and format: building one takes about a second."""
    return PixtralCounter(tokenizer_file, images_first, system)


class SearchingPixtralCounter:
    """For the hint search only: text counted once, each image size counted once (see module docstring)."""

    def __init__(self, exact: PixtralCounter, text: str) -> None:
        self._exact = exact
        self._text = text
        self._text_tokens = exact.count(text, 1, 1, 0)

    def count(self, text: str, width: int, height: int, frames: int) -> int:
        assert text == self._text, "a SearchingPixtralCounter serves one text"
        return self._text_tokens + frames * self._exact.image_tokens(width, height)


@lru_cache(maxsize=4096)
def _pixtral_image_tokens(counter: PixtralCounter, width: int, height: int) -> int:
    return counter.count("x", width, height, 1) - counter.count("x", width, height, 0)


@lru_cache(maxsize=64)
def _blank_image(width: int, height: int):
    from PIL import Image

    return Image.new("RGB", (width, height))


class LlamaCppCounter:
    """Counts what llama.cpp's chat completion feeds SmolLM2 (text only; the frames are not sent)."""

    def __init__(self, model_path: str, prompt_format: PromptFormat | None = None) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._llm = Llama(model_path=model_path, vocab_only=True, verbose=False)
        template = self._llm.metadata["tokenizer.chat_template"]
        eos = self._llm.detokenize([self._llm.token_eos()]).decode("utf-8", "replace")
        bos = self._llm.detokenize([self._llm.token_bos()]).decode("utf-8", "replace")
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        self._format = prompt_format

    def count(self, text: str, width: int, height: int, frames: int) -> int:
        # The messages the worker sends (text only), system turn included.
        messages = self._format.chat_messages(text) if self._format else [{"role": "user", "content": text}]
        formatted = self._formatter(messages=messages).prompt
        return len(self._llm.tokenize(formatted.encode("utf-8"), add_bos=False, special=True))
