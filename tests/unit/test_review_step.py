"""The review step's pure parts: the request a reviewer sees (nothing from a spec or the model read as Markdown or
Jinja) and the reading of a HITLOperator result as a decision."""

from __future__ import annotations

import datetime as dt

from include.cosmos_upsample import review

HOSTILE = "A cup {{ 7 * 7 }} ```\n![x](http://evil.example/p.png) <script>alert(1)</script> ````"


def test_spec_and_model_strings_sit_in_fences_longer_than_any_backtick_run():
    data = {"spec_id": "s1", "failed_checks": ["meta"], "attempts": [{}, {}, {}], "prompt": HOSTILE,
            "answer": "The image shows ``` a cup", "hint": {"paths": ["/w/hints/a/frame-00.jpg"]}}
    request = review.request(data, "manual__1", "http://airflow.example", 60)
    body = request["body"]
    assert f"`````text\n{HOSTILE}\n`````" in body  # the prompt's longest backtick run is 4
    assert "````text\nThe image shows ``` a cup\n````" in body
    assert "[frame 1](http://airflow.example/upsample-reports/runs/manual__1/items/s1/frames/0)" in body
    assert request["subject"] == "Review the flagged answer for s1 (meta)"
    assert request["params"] == {"answer": "The image shows ``` a cup"}
    assert request["response_timeout"] == dt.timedelta(seconds=60)


def test_long_lines_are_wrapped_for_reading_and_the_form_keeps_the_exact_answer():
    answer = " ".join(["word"] * 60)
    request = review.request({"spec_id": "s", "failed_checks": [], "answer": answer, "prompt": "p"}, "r", "", 1)
    shown = request["body"].split("```text\n")[2].split("\n```")[0]
    assert max(len(line) for line in shown.splitlines()) <= review.DISPLAY_WIDTH and shown.split() == answer.split()
    assert request["params"] == {"answer": answer}


def test_a_result_becomes_a_decision_and_no_responder_means_no_decision():
    at = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
    user = {"id": "1", "name": "ana"}

    def result(option, text=None, by=user):
        return {"chosen_options": [option], "params_input": {"answer": text}, "responded_at": at,
                "responded_by_user": by}

    assert review.decision(result("Approve", "same"), "same")[0].action == "approved"
    assert review.decision(result("Approve", ""), "same") == (review.decision(result("Approve"), "same"))
    decided, text = review.decision(result("Approve", " new text "), "same")
    assert (decided.action, decided.by, decided.at, text) == ("edited", "ana", "2026-01-02T00:00:00+00:00",
                                                             "new text")
    assert review.decision(result("Reject", "new text"), "same")[0].action == "rejected"
    assert review.decision(result("Reject", by=None), "same") is None  # the timeout's default: nobody decided
    assert review.decision(None, "same") is None
