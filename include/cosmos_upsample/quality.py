"""Answer quality: every model answer is cleaned and checked before it may reach `specs/` (DESIGN "Answer quality").

Standard library only: the worker judges each answer the moment it arrives (locally or inside the GPU image, which
copies this file), so a flagged answer is asked again with a new seed without loading the model twice; the endpoint
runner and `python -m include.cosmos_upsample.quality` use the very same `judge`.

Checks (their names are the interface): `empty`, `truncated`, `too_short`, `too_long`, `repetition`, `meta`,
`refusal`, `language`, `echo`, `blocklist`, and `schema` for structured answers (answer_schema.py, through the
hook below). Which ones apply is chosen per prompt format (`FORMAT_CHECKS`), and a
caller may add its own (`judge(..., extra_checks={"schema": ...})`), so a structured format adds a check without
touching these.

    python -m include.cosmos_upsample.quality < answers.jsonl
    # in:  {"prompt": ..., "answer": ..., "finish_reason": "stop", "prompt_format": "instruction"} (format: optional)
    # out: {"verdict": "pass"|"flagged", "failed_checks": [...], "text": the cleaned answer}
"""

from __future__ import annotations

import difflib
import functools
import json
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TextIO

PASS, FLAGGED = "pass", "flagged"
CHECK_NAMES = ("empty", "truncated", "too_short", "too_long", "repetition", "meta", "refusal", "language", "echo",
               "blocklist", "schema")
# The word list shipped with the package; the deployment setting `blocklist_path` replaces it.
DEFAULT_BLOCKLIST = Path(__file__).with_name("blocklist.txt")
DEFAULT_FORMAT = "cosmos_upsampler"


@dataclass(frozen=True)
class Thresholds:
    """The checks' bounds. The `quality` Param overrides single fields; `skip` turns named checks off."""

    min_words: int = 40
    max_words: int = 250
    repetition_ngram: int = 4  # word n-grams counted by `repetition`
    repetition_max: int = 3  # an n-gram seen more often than this is a loop
    max_non_latin_share: float = 0.2  # `language`: share of letters outside the Latin script
    min_common_share: float = 0.1  # `language`: share of words that are common English words
    echo_similarity: float = 0.9  # `echo`: difflib ratio to the prompt at which the answer is the prompt again
    # `blocklist`, as NVIDIA's guardrail: fuzzy matching for entries this long, allowing this many letters off.
    blocklist_min_chars: int = 6
    blocklist_letter_count: float = 0.4
    skip: tuple[str, ...] = ()

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> Thresholds:
        """These thresholds with the fields of `overrides` replaced; ValueError names a field or value that is not
        one (a setting only a person can fix, so the run stops at once)."""
        if not overrides:
            return self
        known = {item.name: item for item in fields(self)}
        changes: dict[str, Any] = {}
        for name, value in overrides.items():
            if name not in known:
                raise ValueError(f"quality: unknown threshold {name!r}; known: {', '.join(known)}")
            changes[name] = _checked_value(name, value, type(getattr(self, name)))
        chosen = replace(self, **changes)
        if chosen.min_words > chosen.max_words:
            raise ValueError(f"quality: min_words {chosen.min_words} is above max_words {chosen.max_words}")
        return chosen

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skip": list(self.skip)}


def _checked_value(name: str, value: Any, kind: type) -> Any:
    if kind is tuple:
        if not isinstance(value, list | tuple) or any(check not in CHECK_NAMES for check in value):
            raise ValueError(f"quality: skip must be a list of check names ({', '.join(CHECK_NAMES)}), not {value!r}")
        return tuple(value)
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if not numeric or (kind is int and value != int(value)) or value < 0:
        raise ValueError(f"quality: {name} must be a non-negative {kind.__name__}, not {value!r}")
    return kind(value)


# Word bounds per prompt format. cosmos_upsampler: NVIDIA's example of the Transfer upsampler's answer
# (cosmos-transfer1 examples/inference_cosmos_transfer1_7b.md, "Upsampled prompt: The video opens with a close-up of a
# robotic arm ...") is 111 words, and the upsampled-style prompts its examples feed the Transfer model
# (assets/inference_cosmos_transfer1_*.json) run from 47 (multi_control) to 223 words (single_control_*); the model
# answers under max_tokens=300 (auxiliary/upsampler/model/upsampler.py), about 225 English words. So: under 40 words is
# not an upsampled prompt, over 250 cannot come from that cap. instruction: our INSTRUCTION asks for "no more than 150
# words"; 180 leaves the small models some slack, and 20 words is the least that is more than a caption.
FORMAT_THRESHOLDS: dict[str, Thresholds] = {
    "cosmos_upsampler": Thresholds(min_words=40, max_words=250),
    "instruction": Thresholds(min_words=20, max_words=180),
}


def thresholds_for(prompt_format: str, overrides: Mapping[str, Any] | None = None) -> Thresholds:
    """The format's defaults with the run's `quality` overrides (a format without its own: the base defaults)."""
    return FORMAT_THRESHOLDS.get(prompt_format, Thresholds()).with_overrides(overrides)


# ---- cleaning ------------------------------------------------------------------------------------------------------

# Reasoning blocks, as NVIDIA's Cosmos 3 upsampler strips them (cosmos-framework
# cosmos_framework/model/generator/upsampler/prompts.py, clean_response).
_THINKING = re.compile(r"<(think|thought|thinking|reasoning|scratch|reflection)>.*?</\1>", re.S | re.I)
_COURTESY = re.compile(r"^(?:sure|certainly|of course|okay|ok|absolutely)\b[,.!]?\s*", re.I)
_PREAMBLES = (
    # "Here is the upsampled prompt:", "Here's a refined description of the video:"
    re.compile(r"^here(?:'s|’s| is| are)\b[^:\n]{0,80}:\s*", re.I),
    # "Upsampled prompt:", "**Refined video description:**", "Caption:"
    re.compile(r"^[*_]{0,2}(?:(?:upsampled|refined|enhanced|improved|detailed|expanded|rewritten|final|new)\s+)?"
               r"(?:video\s+)?(?:prompt|description|caption)[*_]{0,2}\s*:[*_]{0,2}\s*", re.I),
)
_EMPHASIS = (re.compile(r"\*\*(.+?)\*\*", re.S), re.compile(r"__(.+?)__", re.S),
             re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", re.S),
             re.compile(r"(?<![\w_])_(?!\s)(.+?)(?<!\s)_(?![\w_])", re.S))
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+", re.M)
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "«": "»", "`": "`"}


def _unquote(text: str) -> str:
    """Quotes that wrap the whole answer (not two quoted phrases that happen to start and end it)."""
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1] and text[-1] not in text[1:-1]:
        return text[1:-1].strip()
    return text


def clean(answer: str) -> str:
    """The answer as it would go into the spec: reasoning blocks, known preambles, wrapping quotes, markdown
    emphasis and headings removed, runs of whitespace as one space. Repeated until nothing changes, so
    '"Upsampled prompt: **...**"' comes out plain."""
    text = _THINKING.sub(" ", answer or "")
    for _ in range(4):
        before = text
        text = _HEADING.sub("", text.strip())
        text = _COURTESY.sub("", text)
        for preamble in _PREAMBLES:
            text = preamble.sub("", text)
        for emphasis in _EMPHASIS:
            text = emphasis.sub(r"\1", text)
        text = _unquote(re.sub(r"\s+", " ", text).strip())
        if text == before:
            break
    return text


_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")


def words_of(text: str) -> list[str]:
    return _WORD.findall(text)


# ---- the checks ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One answer as the checks see it."""

    prompt: str
    raw: str
    text: str  # cleaned
    words: tuple[str, ...]
    finish_reason: str | None
    thresholds: Thresholds
    blocklist: tuple[str, ...]


# A check returns True when the answer FAILS it.
Check = Callable[[Candidate], bool]

_SENTENCE_END = re.compile(r"[.!?…。！？][\"'”’)\]]*$")


def _truncated(answer: Candidate) -> bool:
    """The engine stopped at max_tokens (cosmos-curate's and NVIDIA's Cosmos 3 upsampler's test), or the text stops
    mid-sentence (an engine that reports no finish reason, or a model that stopped early)."""
    return answer.finish_reason == "length" or not _SENTENCE_END.search(answer.text)


def _too_short(answer: Candidate) -> bool:
    return len(answer.words) < answer.thresholds.min_words


def _too_long(answer: Candidate) -> bool:
    return len(answer.words) > answer.thresholds.max_words


# A unit of 1-3 words said this many times in a row is a loop ("the the the", "a cup a cup a cup").
STUTTER_TIMES = 3


def _stutters(words: Sequence[str]) -> bool:
    for size in (1, 2, 3):
        span = size * STUTTER_TIMES
        for start in range(len(words) - span + 1):
            unit = words[start:start + size]
            if all(words[start + turn * size:start + (turn + 1) * size] == unit for turn in range(1, STUTTER_TIMES)):
                return True
    return False


def _repetition(answer: Candidate) -> bool:
    words = [word.lower() for word in answer.words]
    size = max(answer.thresholds.repetition_ngram, 1)
    grams = Counter(tuple(words[start:start + size]) for start in range(len(words) - size + 1))
    return bool(grams) and max(grams.values()) > answer.thresholds.repetition_max or _stutters(words)


_PICTURE = r"(?:images?|pictures?|photos?|photographs?|stills?|screenshots?|snapshots?|frames?)"
_SEVERAL = r"(?:(?:two|three|four|both|first|second|third|last|final|given|provided|following|above|input|other)\s+)*"
_META = (
    # "The image shows", "These two frames depict", "The pictures are"
    re.compile(rf"(?:^|[.!?]\s+)(?:in\s+)?(?:the|this|these|those|both|each|all)\s+{_SEVERAL}{_PICTURE}\s*(?:,|"
               r"\b(?:shows?|showing|depicts?|depicting|captures?|capturing|displays?|displaying|presents?|"
               r"illustrates?|reveals?|features?|contains?|appears?|is|are|was|were|seems?)\b)", re.I),
    # "In the first frame", "across these images", "between the two pictures", "in the image" (mid-sentence)
    re.compile(rf"\b(?:in|from|across|between|throughout|comparing)\s+(?:the|this|these|those|both|each|all|either)\s+"
               rf"{_SEVERAL}(?:images?|pictures?|photos?|photographs?|stills?|screenshots?|snapshots?|frames)\b", re.I),
    # "the first frame", "the second image" anywhere: only a picture has a first frame ("enters the frame" passes)
    re.compile(r"\b(?:first|second|third|last|final|next|previous|1st|2nd|3rd)\s+(?:image|picture|photo|still|"
               r"screenshot|frame)s?\b", re.I),
)


def _meta(answer: Candidate) -> bool:
    """Speaks of the pictures the model was shown instead of the scene. "The video shows/captures ..." is how Cosmos
    upsampled prompts begin (cosmos-transfer1's examples) and passes; so does a frame in the scene ("enters the
    frame", "a sequence of images")."""
    return any(pattern.search(answer.text) for pattern in _META)


_REFUSAL = re.compile(
    r"\b(?:i['’]?m sorry|i am sorry|i apologi[sz]e|as an ai\b|as a (?:large )?language model|"
    r"i (?:cannot|can['’]?t|can not|won['’]?t|am unable|am not able)\b|i['’]m (?:unable|not able)\b|"
    r"i do(?: not|n['’]t) have the ability)", re.I)


def _refusal(answer: Candidate) -> bool:
    return bool(_REFUSAL.search(answer.text))


# The most frequent English function words: an English paragraph is about 40% of them, other languages and
# token soup almost none.
COMMON_ENGLISH = frozenset(
    "the a an and or but of in on at to from with by for as is are was were be been being it its this that these "
    "those there their his her they he she we while into onto over under through across near behind above below "
    "which who where when then than up down out off has have had not no".split())


def _non_latin_share(text: str) -> float:
    letters = [char for char in text if char.isalpha()]
    if not letters:
        return 0.0
    return sum(not unicodedata.name(char, "").startswith("LATIN") for char in letters) / len(letters)


def _language(answer: Candidate) -> bool:
    """Not English: mostly letters outside the Latin script, or too few common English words."""
    if _non_latin_share(answer.text) > answer.thresholds.max_non_latin_share:
        return True
    common = sum(word.lower() in COMMON_ENGLISH for word in answer.words)
    return common / len(answer.words) < answer.thresholds.min_common_share


def _normalized(text: str) -> str:
    return " ".join(word.lower() for word in words_of(text))


def _echo(answer: Candidate) -> bool:
    prompt, text = _normalized(answer.prompt), _normalized(answer.text)
    if not prompt:
        return False
    matcher = difflib.SequenceMatcher(None, prompt, text, autojunk=False)
    return matcher.real_quick_ratio() >= answer.thresholds.echo_similarity and \
        matcher.ratio() >= answer.thresholds.echo_similarity


def _blocklist(answer: Candidate) -> bool:
    return blocklist_match(answer.text, answer.blocklist, answer.thresholds) is not None


CHECKS: dict[str, Check] = {
    "truncated": _truncated, "too_short": _too_short, "too_long": _too_long, "repetition": _repetition,
    "meta": _meta, "refusal": _refusal, "language": _language, "echo": _echo, "blocklist": _blocklist,
}
# The policy name of answers that are one JSON object (cosmos3_structured, a team's response_schema): the caller adds
# the check `schema` (answer_schema.schema_check, through `extra_checks`), which also fails a cut-off or non-JSON
# answer; of the prose checks only `blocklist` means anything for JSON (its words, lengths, sentence ends and
# repeated keys are not prose).
STRUCTURED_ANSWERS = "structured"
# The checks of a prompt format whose answers are not one English paragraph (e.g. a structured JSON answer); every
# format not named here gets all of them. `empty` always applies.
FORMAT_CHECKS: dict[str, tuple[str, ...]] = {STRUCTURED_ANSWERS: ("blocklist",)}


def checks_for(prompt_format: str) -> tuple[str, ...]:
    return FORMAT_CHECKS.get(prompt_format, tuple(CHECKS))


# ---- blocklist -----------------------------------------------------------------------------------------------------


def to_ascii(text: str) -> str:
    """As NVIDIA's guardrail (cosmos-transfer1 auxiliary/guardrail/blocklist/utils.py, to_ascii)."""
    return re.sub(r"[^\x00-\x7F]+", " ", text)


def _partial_match(prompt_words: list[str], entry: str, letter_count: float) -> bool:
    """cosmos-transfer1 auxiliary/guardrail/blocklist/blocklist.py, Blocklist.check_partial_match: any window of as
    many words as the entry whose difflib ratio is within `letter_count` letters of a full match. The quick upper
    bounds of difflib skip windows that cannot reach it (same result, much less work)."""
    size = len(entry.split())
    needed = (len(entry) - letter_count) / len(entry)
    matcher = difflib.SequenceMatcher(None, "", entry)
    for start in range(len(prompt_words) - size + 1):
        matcher.set_seq1(" ".join(prompt_words[start:start + size]))
        if matcher.real_quick_ratio() >= needed and matcher.quick_ratio() >= needed and matcher.ratio() >= needed:
            return True
    return False


def blocklist_match(text: str, blocklist: Iterable[str], thresholds: Thresholds = Thresholds()) -> str | None:
    """The first entry of `blocklist` found in `text`, as NVIDIA's guardrail finds it
    (cosmos-transfer1 Blocklist.check_against_whole_word_blocklist): case and runs of spaces ignored, a whole-word
    match, or, for entries of `blocklist_min_chars` letters or more, a fuzzy match. Their guardrail also runs the
    better-profanity censor on the text and on its NLTK lemmas; without those packages (the worker image has only the
    standard library) a plural 's'/'es' is matched here instead of lemmatising."""
    normalized = re.sub(r"\s+", " ", to_ascii(text)).strip().lower()
    prompt_words = normalized.split()
    for entry in blocklist:
        word = re.sub(r"\s+", " ", entry).strip().lower()
        if not word:
            continue
        if re.search(r"\b" + re.escape(word) + r"(?:s|es)?\b", normalized):
            return entry
        if len(word) >= thresholds.blocklist_min_chars and \
                _partial_match(prompt_words, word, thresholds.blocklist_letter_count):
            return entry
    return None


def read_blocklist(path: str | Path) -> tuple[str, ...]:
    """One word or phrase per line; blank lines and '#' comments are skipped. A folder: every file in it, as the
    guardrail's read_keyword_list_from_dir. Raises OSError naming the path when it cannot be read."""
    path = Path(path)
    files = sorted(child for child in path.iterdir() if child.is_file()) if path.is_dir() else [path]
    entries: list[str] = []
    for file in files:
        for line in file.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append(line)
    return tuple(entries)


@functools.cache
def default_blocklist() -> tuple[str, ...]:
    return read_blocklist(DEFAULT_BLOCKLIST)


# ---- the verdict ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    verdict: str  # pass | flagged
    failed_checks: tuple[str, ...]
    text: str  # the cleaned answer
    words: int

    @property
    def passed(self) -> bool:
        return self.verdict == PASS


def judge(prompt: str, answer: str, finish_reason: str | None = None, *, prompt_format: str = DEFAULT_FORMAT,
          thresholds: Thresholds | None = None, blocklist: Sequence[str] | None = None,
          extra_checks: Mapping[str, Check] | None = None) -> Verdict:
    """Clean `answer` and run the format's checks (and `extra_checks`) on it. `prompt` is the user's own prompt
    (for `echo`); `blocklist` None: the shipped list. An empty answer fails `empty` only: nothing else is said of it."""
    thresholds = thresholds or thresholds_for(prompt_format)
    text = clean(answer)
    words = tuple(words_of(text))
    if not words:
        return Verdict(FLAGGED, ("empty",), text, 0)
    candidate = Candidate(prompt or "", answer, text, words, finish_reason, thresholds,
                          tuple(default_blocklist() if blocklist is None else blocklist))
    checks = {**{name: CHECKS[name] for name in checks_for(prompt_format)}, **(extra_checks or {})}
    failed = tuple(name for name, check in checks.items() if name not in thresholds.skip and check(candidate))
    return Verdict(FLAGGED if failed else PASS, failed, text, len(words))


@dataclass(frozen=True)
class Policy:
    """How one job judges its answers: what the job manifest carries (`Job.quality`), so a container, which cannot
    read the Airflow worker's settings or blocklist file, judges exactly as the run asked."""

    prompt_format: str = DEFAULT_FORMAT
    thresholds: Thresholds = Thresholds()
    retries: int = 0  # a flagged answer is asked again this many times with a new seed
    blocklist: tuple[str, ...] = ()

    @property
    def max_attempts(self) -> int:
        return 1 + self.retries

    def judge(self, prompt: str, answer: str, finish_reason: str | None,
              extra_checks: Mapping[str, Check] | None = None) -> Verdict:
        return judge(prompt, answer, finish_reason, prompt_format=self.prompt_format, thresholds=self.thresholds,
                     blocklist=self.blocklist, extra_checks=extra_checks)

    def to_manifest(self) -> dict[str, Any]:
        return {"thresholds": self.thresholds.as_dict(), "retries": self.retries, "blocklist": list(self.blocklist)}

    @classmethod
    def from_manifest(cls, data: Mapping[str, Any] | None, prompt_format: str) -> Policy:
        """A manifest written before the gate existed has no `quality`: the format's defaults, no re-asks."""
        data = data or {}
        return cls(prompt_format, thresholds_for(prompt_format, data.get("thresholds")), int(data.get("retries", 0)),
                   tuple(data.get("blocklist", default_blocklist())))


# ---- the command line ----------------------------------------------------------------------------------------------


def _request(line: str) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(request, dict) or not isinstance(request.get("answer"), str):
        raise ValueError('expected an object with an "answer" string (and "prompt", "finish_reason")')
    for name in ("prompt", "finish_reason", "prompt_format"):
        if request.get(name) is not None and not isinstance(request[name], str):
            raise ValueError(f'"{name}" must be a string')
    return request


def main(stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """JSON lines in, one JSON line out each, with the default thresholds of the line's prompt format. A line that
    cannot be judged gets {"error": ...} and the others go on; the exit status is then 1."""
    errors = 0
    for number, line in enumerate(stdin, start=1):
        if not line.strip():
            continue
        try:
            request = _request(line)
        except ValueError as exc:
            errors += 1
            stdout.write(json.dumps({"error": f"line {number}: {exc}"}) + "\n")
            continue
        verdict = judge(request.get("prompt") or "", request["answer"], request.get("finish_reason"),
                        prompt_format=request.get("prompt_format") or DEFAULT_FORMAT)
        stdout.write(json.dumps({"verdict": verdict.verdict, "failed_checks": list(verdict.failed_checks),
                                 "text": verdict.text}, ensure_ascii=False) + "\n")
        stdout.flush()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
