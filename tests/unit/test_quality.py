"""The answer quality gate (include/cosmos_upsample/quality.py): each cleaning rule, each check, the thresholds, the
blocklist's matching, the CLI, and no false flag on good Cosmos-style paragraphs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from include.cosmos_upsample import quality
from include.cosmos_upsample.answer_schema import schema_check
from include.cosmos_upsample.quality import FLAGGED, PASS, Policy, Thresholds, judge, thresholds_for
from tests.conftest import ROOT
from tests.quality_paragraphs import GOOD_PARAGRAPHS, UPSTREAM_PARAGRAPHS

PROMPT = "A robot arm picks up a red cup from a cluttered table and places it on a shelf."

GOOD = GOOD_PARAGRAPHS["video_shows"]


@pytest.mark.parametrize("paragraph", [*GOOD_PARAGRAPHS.values(), *UPSTREAM_PARAGRAPHS.values()],
                         ids=[*GOOD_PARAGRAPHS, *UPSTREAM_PARAGRAPHS])
def test_good_cosmos_paragraphs_pass(paragraph):
    verdict = judge(PROMPT, paragraph, "stop")
    assert (verdict.verdict, verdict.failed_checks) == (PASS, ())
    assert verdict.text == paragraph


class TestCleaning:
    @pytest.mark.parametrize("raw, cleaned", [
        ("Here is the upsampled prompt: A cup.", "A cup."),
        ("Here's a refined description of the video:\n\nA cup.", "A cup."),
        ("Sure! Here is the enhanced prompt:\nA cup.", "A cup."),
        ("Upsampled prompt: A cup.", "A cup."),
        ("Caption: A cup.", "A cup."),
        ("**Refined video description:** A cup.", "A cup."),
        ('"A cup on a table."', "A cup on a table."),
        ("“A cup on a table.”", "A cup on a table."),
        ('"Upsampled prompt: A cup."', "A cup."),
        ('"A" cup and a "B"', '"A" cup and a "B"'),  # two quoted words, not a wrapping pair
        ("A **red** cup on a *wooden* table with __two__ _blue_ plates.", "A red cup on a wooden table with two blue "
                                                                           "plates."),
        ("snake_case_name stays", "snake_case_name stays"),
        ("# A heading\nA cup.", "A heading A cup."),
        ("A  cup\n\n on\ta   table. ", "A cup on a table."),
        ("<think>the user wants a cup</think> A cup.", "A cup."),
        ("A cup. Here is the prompt: a saucer.", "A cup. Here is the prompt: a saucer."),  # only a leading preamble
    ])
    def test_rule(self, raw, cleaned):
        assert quality.clean(raw) == cleaned

    def test_the_cleaned_text_is_what_passes(self):
        verdict = judge(PROMPT, f'Here is the upsampled prompt:\n\n"{GOOD}"', "stop")
        assert verdict.verdict == PASS and verdict.text == GOOD


class TestChecks:
    """Each check on an answer that breaks it and nothing else (the rest of the answer is a good paragraph)."""

    @pytest.mark.parametrize("check, answer, finish_reason", [
        ("truncated", GOOD, "length"),
        ("truncated", GOOD.rsplit(".", 2)[0] + ", while the", "stop"),
        ("truncated", GOOD.rsplit(".", 2)[0] + ", while the", None),
        ("too_short", "The video shows a robot arm lifting a red cup onto a shelf.", "stop"),
        ("too_long", " ".join(GOOD_PARAGRAPHS.values()), "stop"),
        ("repetition", GOOD + " The arm lifts the cup and the arm lifts the cup and the arm lifts the cup and the "
                              "arm lifts the cup again.", "stop"),
        ("repetition", GOOD + " It moves very very very slowly.", "stop"),
        ("meta", "The image shows" + GOOD.removeprefix("The video shows"), "stop"),
        ("meta", "In the first frame, " + GOOD[0].lower() + GOOD[1:], "stop"),
        ("meta", GOOD + " These two frames depict the same moment.", "stop"),
        ("meta", GOOD + " Across the images the light does not change.", "stop"),
        ("refusal", "I'm sorry, but " + GOOD[0].lower() + GOOD[1:], "stop"),
        ("refusal", GOOD + " As an AI, I cannot see more.", "stop"),
        ("language", "La vidéo montre un bras robotique blanc monté sur un établi en acier dans un laboratoire très "
                     "éclairé. Devant lui, une table en bois encombrée porte des tournevis, un rouleau de ruban "
                     "adhésif, un carnet et une tasse rouge en céramique brillante. Le bras abaisse sa pince, saisit "
                     "la tasse par son anse et la soulève lentement, puis la pose doucement sur une étagère grise.",
         "stop"),
        ("language", "ビデオには、明るく照らされた実験室の鋼製作業台に取り付けられた白い産業用ロボットアームが映って"
                     "います。", "stop"),
        ("echo", PROMPT, "stop"),
        ("blocklist", GOOD + " A naked mannequin stands in the corner.", "stop"),
    ])
    def test_check_fails_on_its_case(self, check, answer, finish_reason):
        thresholds = thresholds_for("cosmos_upsampler",
                                    {"min_words": 1} if check in ("echo", "language") else None)
        verdict = judge(PROMPT, answer, finish_reason, thresholds=thresholds)
        assert verdict.verdict == FLAGGED
        assert check in verdict.failed_checks
        if check not in ("too_short", "echo", "refusal", "language"):
            assert verdict.failed_checks == (check,)

    @pytest.mark.parametrize("answer", ["", "   ", '""', "**  **", "<think>hm</think>"])
    def test_an_empty_answer_fails_empty_only(self, answer):
        assert judge(PROMPT, answer, "stop").failed_checks == ("empty",)

    def test_a_sentence_ending_in_a_closing_quote_is_complete(self):
        assert "truncated" not in judge(PROMPT, GOOD + ' A sign reads "Exit."', "stop").failed_checks

    def test_echo_is_the_prompt_or_nearly_not_an_answer_that_starts_with_it(self):
        nearly = PROMPT.replace("picks up", "picked up")
        assert "echo" in judge(PROMPT, nearly, "stop").failed_checks
        assert "echo" not in judge(PROMPT, PROMPT + " " + GOOD, "stop").failed_checks

    def test_format_without_its_own_list_gets_every_check(self):
        assert quality.checks_for("instruction") == tuple(quality.CHECKS)


class TestSchema:
    """The check `schema` of structured answers (cosmos3_structured, a team's response_schema): answer_schema.py
    through the per-format hook, as jobformat.Job.judge adds it; a structured answer gets only `blocklist` besides."""

    SCHEMA = {"type": "object", "required": ["scene"], "additionalProperties": False,
              "properties": {"scene": {"type": "string", "maxLength": 40}}}

    def structured(self, answer, finish_reason="stop"):
        return judge(PROMPT, answer, finish_reason, prompt_format=quality.STRUCTURED_ANSWERS,
                     extra_checks={"schema": schema_check(self.SCHEMA)})

    @pytest.mark.parametrize("answer, finish_reason", [
        (GOOD, "stop"),  # prose, not JSON
        ('{"scene": "a red cup"} {"scene": "a shelf"}', "stop"),  # two objects
        ('["a red cup"]', "stop"),  # JSON, not an object
        ('{"scene": "a red cup", "camera": "static"}', "stop"),  # a field the schema does not allow
        ('{"scene": "' + "a red cup " * 8 + '"}', "stop"),  # over maxLength
        ('{"scene": "a red cup on', "length"),  # cut off at max_tokens
    ])
    def test_schema_fails_anything_but_one_object_valid_against_the_schema(self, answer, finish_reason):
        assert self.structured(answer, finish_reason).failed_checks == ("schema",)

    def test_one_valid_object_passes_though_it_is_no_paragraph(self):
        assert self.structured('```json\n{"scene": "a red cup"}\n```').verdict == PASS

    def test_blocklist_still_applies_to_json(self):
        assert self.structured('{"scene": "a naked mannequin"}').failed_checks == ("blocklist",)

    def test_schema_is_a_check_name_a_run_may_skip(self):
        assert thresholds_for(quality.STRUCTURED_ANSWERS, {"skip": ["schema"]}).skip == ("schema",)


class TestThresholds:
    def test_word_bounds_differ_per_format(self):
        assert thresholds_for("cosmos_upsampler").min_words == 40
        assert thresholds_for("instruction").max_words == 180
        assert thresholds_for("a_format_of_issue_18") == Thresholds()

    def test_overrides_replace_single_fields(self):
        chosen = thresholds_for("cosmos_upsampler", {"min_words": 10, "skip": ["meta"]})
        assert (chosen.min_words, chosen.max_words, chosen.skip) == (10, 250, ("meta",))
        assert "meta" not in judge(PROMPT, "The image shows" + GOOD.removeprefix("The video shows"), "stop",
                                   thresholds=chosen).failed_checks

    @pytest.mark.parametrize("overrides, message", [
        ({"min_word": 3}, "unknown threshold 'min_word'"),
        ({"min_words": "ten"}, "min_words must be a non-negative int"),
        ({"min_words": 2.5}, "min_words must be a non-negative int"),
        ({"echo_similarity": True}, "echo_similarity must be a non-negative float"),
        ({"skip": ["nonsense"]}, "skip must be a list of check names"),
        ({"min_words": 300}, "min_words 300 is above max_words 250"),
    ])
    def test_a_bad_override_names_the_fix(self, overrides, message):
        with pytest.raises(ValueError, match=message):
            thresholds_for("cosmos_upsampler", overrides)

    def test_extra_checks_hook_adds_a_named_check(self):
        verdict = judge(PROMPT, GOOD, "stop", extra_checks={"schema": lambda answer: not answer.text.startswith("{")})
        assert verdict.failed_checks == ("schema",)


class TestBlocklist:
    @pytest.mark.parametrize("text, entry", [
        ("A NAKED wall.", "naked"),
        ("Two  massacres.", "massacre"),
        ("A masacre in the valley.", None),  # upstream's 0.4 letters: in effect no misspelling passes as a match
        ("an act of child   abuse", "child abuse"),
        ("naïve nudé", None),  # non-ASCII letters are spaces, as upstream: 'nud' is not 'nude'
        ("a red cup", None),
        ("nudes", "nude"),
        ("a nudge", None),  # short entries match whole words only
    ])
    def test_matching_as_the_guardrail(self, text, entry):
        assert quality.blocklist_match(text, ["nude", "naked", "massacre", "child abuse"]) == entry

    def test_a_wider_letter_count_catches_misspellings_of_long_entries(self):
        tolerant = Thresholds(blocklist_letter_count=1.5)
        assert quality.blocklist_match("A masacre in the valley.", ["massacre"], tolerant) == "massacre"
        assert quality.blocklist_match("a nudes", ["nudge"], tolerant) is None  # under blocklist_min_chars

    def test_a_file_or_a_folder_of_files_with_comments(self, tmp_path):
        (tmp_path / "a.txt").write_text("# comment\n\nfoo\n  bar baz  \n", encoding="utf-8")
        (tmp_path / "b.txt").write_text("qux\n", encoding="utf-8")
        assert quality.read_blocklist(tmp_path / "a.txt") == ("foo", "bar baz")
        assert quality.read_blocklist(tmp_path) == ("foo", "bar baz", "qux")

    def test_the_shipped_list_is_used_by_default_and_can_be_replaced(self):
        text = GOOD + " A naked mannequin stands in the corner."
        assert "blocklist" in judge(PROMPT, text, "stop").failed_checks
        assert "blocklist" not in judge(PROMPT, text, "stop", blocklist=["forklift"]).failed_checks


class TestPolicy:
    def test_manifest_round_trip_carries_thresholds_retries_and_words(self):
        policy = Policy("instruction", thresholds_for("instruction", {"min_words": 5}), 2, ("foo",))
        again = Policy.from_manifest(json.loads(json.dumps(policy.to_manifest())), "instruction")
        assert again == policy and again.max_attempts == 3

    def test_a_manifest_from_before_the_gate_judges_with_defaults_and_no_re_asks(self):
        policy = Policy.from_manifest(None, "cosmos_upsampler")
        assert policy.retries == 0 and policy.thresholds == thresholds_for("cosmos_upsampler")
        assert policy.blocklist == quality.default_blocklist()


class TestCli:
    def test_json_lines_in_and_out_with_default_thresholds(self):
        lines = [
            {"prompt": PROMPT, "answer": f"Here is the upsampled prompt: {GOOD}", "finish_reason": "stop"},
            {"prompt": PROMPT, "answer": "The image shows a cup", "finish_reason": "length"},
            "not json",
            {"prompt": "A cup.", "answer": "A red cup on a wooden table, in soft light.", "finish_reason": "stop",
             "prompt_format": "instruction"},
        ]
        stdin = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
        done = subprocess.run([sys.executable, "-m", "include.cosmos_upsample.quality"], input=stdin, text=True,
                              capture_output=True, cwd=ROOT, timeout=60)
        out = [json.loads(line) for line in done.stdout.splitlines()]
        assert out[0] == {"verdict": "pass", "failed_checks": [], "text": GOOD}
        assert out[1] == {"verdict": "flagged", "failed_checks": ["truncated", "too_short", "meta"],
                          "text": "The image shows a cup"}
        assert out[2] == {"error": "line 3: not JSON (Expecting value at column 1)"}
        assert out[3]["failed_checks"] == ["too_short"]
        assert done.returncode == 1


class TestPolicyOfARun:
    """What a run's settings make of the gate (stages.quality_policy): the manifest's thresholds, re-asks, words."""

    def test_the_run_settings_become_the_jobs_policy(self, tmp_path):
        from include.cosmos_upsample.settings import resolve_settings
        from include.cosmos_upsample.stages import quality_policy

        words = tmp_path / "words.txt"
        words.write_text("forklift\n", encoding="utf-8")
        settings = resolve_settings({"quality": {"min_words": 5}, "quality_retries": 4, "backend": "vllm"},
                                    environ={"COSMOS_UPSAMPLE_BLOCKLIST_PATH": str(words)})
        policy = quality_policy(settings)
        assert (policy.prompt_format, policy.thresholds.min_words, policy.retries, policy.blocklist) == (
            "cosmos_upsampler", 5, 4, ("forklift",))
        assert quality_policy(resolve_settings({})).blocklist == quality.default_blocklist()

    def test_an_unreadable_blocklist_names_the_setting_as_a_configuration_error(self, tmp_path):
        from include.cosmos_upsample.errors import NotRetryable
        from include.cosmos_upsample.settings import resolve_settings
        from include.cosmos_upsample.stages import quality_policy

        settings = resolve_settings({}, environ={"COSMOS_UPSAMPLE_BLOCKLIST_PATH": str(tmp_path / "missing.txt")})
        with pytest.raises(NotRetryable, match="cosmos_upsample_blocklist_path"):
            quality_policy(settings)
