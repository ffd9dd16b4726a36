from __future__ import annotations

from include.cosmos_upsample.items import Hint, Item, Tokens
from include.cosmos_upsample.report import build_report, count_items, failure_exceeded, render_html
from include.cosmos_upsample.settings import resolve_settings


def item(status: str, prompt: str = "a cup", reason: str | None = None) -> Item:
    return Item(spec_id=f"s-{status}", source_path=f"/in/{status}.json", status=status, reason=reason,
                tokens=Tokens(prompt=500, budget=3796), hint=Hint(width=320, height=180, frames=2),
                original_prompt=prompt, key="internal", text="internal text")


class TestReport:
    def test_counts_and_keys(self):
        items = [item("upsampled"), item("cached"), item("invalid", reason="bad"), item("failed", reason="x")]
        report = build_report(run_id="r1", dag_id="d", started_at="t0", finished_at="t1",
                              settings=resolve_settings({}), items=items, stages={"validate": 1.23456}).to_json()
        assert report["counts"] == {"discovered": 4, "upsampled": 1, "cached": 1, "invalid": 1, "failed": 1,
                                    "flagged": 0}
        assert set(report) >= {"run_id", "dag_id", "started_at", "finished_at", "params", "counts", "items", "stages"}
        assert set(report["items"][0]) >= {"spec_id", "source_path", "status", "reason", "tokens", "hint",
                                           "output_path"}
        assert "key" not in report["items"][0] and "text" not in report["items"][0]
        assert report["stages"] == {"validate": 1.235}

    def test_quality_over_the_judged_items_and_every_attempts_checks(self):
        from include.cosmos_upsample.report_model import ItemQuality

        passed = item("upsampled").model_copy(update={
            "quality": ItemQuality(verdict="pass", attempts=2), "attempt_checks": ["truncated"]})
        flagged = item("flagged").model_copy(update={
            "quality": ItemQuality(verdict="flagged", failed_checks=["meta"], attempts=3),
            "attempt_checks": ["meta", "meta", "truncated"]})
        cached = item("cached").model_copy(update={"quality": ItemQuality(verdict="pass")})
        report = build_report(run_id="r1", dag_id="d", started_at="t0", finished_at="t1",
                              settings=resolve_settings({}), items=[passed, flagged, cached, item("invalid")],
                              stages={}).to_json()
        assert report["quality"] == {"passed": 1, "flagged": 1, "retried": 2,
                                     "by_check": {"meta": 2, "truncated": 2}}
        assert report["counts"]["flagged"] == 1 and report["state"] == "success"  # flagged never fails by default
        assert report["items"][1]["quality"]["failed_checks"] == ["meta"]
        assert "flagged" in render_html(build_report(
            run_id="r1", dag_id="d", started_at="t0", finished_at="t1", settings=resolve_settings({}),
            items=[flagged], stages={}))

    def test_flagged_ratio_fails_the_run_only_when_set(self):
        from include.cosmos_upsample.report import quota_exceeded

        counts = {"discovered": 10, "failed": 0, "flagged": 3}
        assert quota_exceeded(counts, resolve_settings({})) is None
        assert "3 of 10 specs ended flagged" in quota_exceeded(counts, resolve_settings({"max_flagged_ratio": 0.2}))
        assert quota_exceeded(counts, resolve_settings({"max_flagged_ratio": 0.3})) is None

    def test_failure_ratio(self):
        assert failure_exceeded({"discovered": 20, "failed": 2}, 0.05)
        assert not failure_exceeded({"discovered": 20, "failed": 1}, 0.05)
        assert not failure_exceeded({"discovered": 0, "failed": 0}, 0.05)

    def test_html_escapes_prompts(self):
        hostile = item("upsampled", prompt="<script>alert(1)</script>")
        report = build_report(run_id="<b>r</b>", dag_id="d", started_at="t0", finished_at="t1",
                              settings=resolve_settings({}), items=[hostile], stages={})
        html = render_html(report)
        assert "<script>alert(1)</script>" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "<b>r</b>" not in html

    def test_dry_run_counts_planned(self):
        assert count_items([item("planned")])["planned"] == 1
