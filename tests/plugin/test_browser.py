"""The plugin in a real browser: Debian chromium (headless, via chromium-driver) against a real `airflow api-server`.

Signs in through SimpleAuthManager's login page, then opens the run list, a run's page and the run's tab inside
the Airflow UI; checks the table and the SVG charts render and that the `<script>` prompt never runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from upsample_fixtures import HOSTILE_PROMPT, chromium_paths

from tests.browser import chromium, sign_in, wait_for

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(chromium_paths() is None, reason="needs Debian packages chromium and chromium-driver"),
]

# The README's screenshots come from a real run of the DAG (tests/deploy/test_review_browser.py), not from the
# stand-in reports of this tier.
PREFIX = "/upsample-reports"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver


@pytest.fixture(scope="module")
def signed_in(browser: Any, api_server: Any) -> Any:
    return sign_in(browser, api_server.url, api_server.username, api_server.password)


def pwned(browser: Any) -> Any:
    return browser.execute_script("return window.__pwned === undefined ? null : window.__pwned;")


def test_run_list(signed_in: Any, api_server: Any, airflow_site: Any) -> None:
    from selenium.webdriver.common.by import By

    signed_in.get(f"{api_server.url}{PREFIX}/")
    rows = wait_for(lambda: signed_in.find_elements(By.CSS_SELECTOR, "table.runs tbody tr"), what="run rows")
    text = " ".join(row.text for row in rows)
    for run_id in (airflow_site.finished_run_id, airflow_site.running_run_id, airflow_site.fallback_run_id):
        assert run_id in text
    assert "in progress: 7 / 20 items done" in text


def test_run_detail_renders_charts_table_and_never_runs_the_prompt(
    signed_in: Any, api_server: Any, airflow_site: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    signed_in.get(f"{api_server.url}{PREFIX}/runs/{quote(airflow_site.finished_run_id, safe='')}")
    rows = wait_for(lambda: signed_in.find_elements(By.CSS_SELECTOR, "table#items tbody tr[data-status]"), what="items")
    assert len(rows) == 24
    bars = signed_in.find_elements(By.CSS_SELECTOR, "svg.chart.tokens rect.bar")
    assert len(bars) == 24 and all(bar.size["height"] > 0 for bar in bars)
    assert len(signed_in.find_elements(By.CSS_SELECTOR, "svg.chart.hbars")) == 2
    # The stylesheet loaded through the authenticated route: bars are coloured, not the default black.
    fill = signed_in.execute_script(
        "return getComputedStyle(document.querySelector('svg.chart.tokens rect.bar.status-invalid')).fill;"
    )
    assert fill == "rgb(224, 49, 49)"
    first_prompt = rows[0].find_elements(By.CSS_SELECTOR, ".prompt")[0].text
    assert first_prompt == HOSTILE_PROMPT
    assert pwned(signed_in) is None

    # The inline filter (progressive enhancement over ?status=) hides rows that do not match.
    box = signed_in.find_element(By.ID, "item-filter")
    box.send_keys("out of memory")
    wait_for(lambda: len([r for r in rows if r.is_displayed()]) == 1, what="filtered rows")

    signed_in.refresh()
    wait_for(lambda: signed_in.find_elements(By.CSS_SELECTOR, "svg.chart.tokens rect.bar"), what="reloaded page")
    screenshot = tmp_path / "run.png"
    signed_in.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000


def test_running_run_shows_progress(signed_in: Any, api_server: Any, airflow_site: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    signed_in.get(f"{api_server.url}{PREFIX}/runs/{quote(airflow_site.running_run_id, safe='')}")
    section = wait_for(lambda: signed_in.find_element(By.CSS_SELECTOR, "section.progress"), what="progress")
    assert "7 of 20 items done in 2 model jobs, 1 failed" in section.text and "ETA" in section.text
    fill = signed_in.find_element(By.CSS_SELECTOR, "svg.progressbar rect.fill")
    assert 0 < fill.size["width"] < signed_in.find_element(By.CSS_SELECTOR, "svg.progressbar rect.track").size["width"]
    signed_in.save_screenshot(str(tmp_path / "running.png"))


def test_status_filter_without_js(signed_in: Any, api_server: Any, airflow_site: Any) -> None:
    from selenium.webdriver.common.by import By

    signed_in.get(f"{api_server.url}{PREFIX}/runs/{quote(airflow_site.finished_run_id, safe='')}?status=failed")
    rows = signed_in.find_elements(By.CSS_SELECTOR, "table#items tbody tr[data-status]")
    assert {row.get_attribute("data-status") for row in rows} == {"failed"} and len(rows) == 4


def test_dag_run_tab_inside_the_airflow_ui(signed_in: Any, api_server: Any, airflow_site: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    run_id = airflow_site.finished_run_id
    signed_in.get(f"{api_server.url}/dags/cosmos_prompt_upsample/runs/{quote(run_id, safe='')}")
    tab = wait_for(
        lambda: signed_in.find_element(By.XPATH, "//*[self::a or self::button][contains(., 'Upsample report')]"),
        timeout=60,
        what="the 'Upsample report' tab on the DAG run",
    )
    tab.click()
    frame = wait_for(
        lambda: signed_in.find_element(By.CSS_SELECTOR, "iframe[title='Upsample report']"), what="the tab's iframe"
    )
    assert quote(run_id, safe="") in frame.get_attribute("src")
    signed_in.switch_to.frame(frame)
    try:
        wait_for(lambda: signed_in.find_elements(By.CSS_SELECTOR, "svg.chart.tokens rect.bar"), what="charts in tab")
        assert len(signed_in.find_elements(By.CSS_SELECTOR, "table#items tbody tr[data-status]")) == 24
        assert pwned(signed_in) is None
    finally:
        signed_in.switch_to.default_content()
    assert pwned(signed_in) is None
    signed_in.save_screenshot(str(tmp_path / "dag-run-tab.png"))


def test_nav_entry_opens_the_run_list(signed_in: Any, api_server: Any, airflow_site: Any) -> None:
    from selenium.webdriver.common.by import By

    signed_in.get(f"{api_server.url}/plugin/upsample-reports")
    frame = wait_for(
        lambda: signed_in.find_element(By.CSS_SELECTOR, "iframe[title='Upsample reports']"), timeout=60,
        what="the nav view's iframe",
    )
    signed_in.switch_to.frame(frame)
    try:
        rows = wait_for(lambda: signed_in.find_elements(By.CSS_SELECTOR, "table.runs tbody tr"), what="runs in nav")
        assert any(airflow_site.finished_run_id in row.text for row in rows)
        signed_in.find_element(By.LINK_TEXT, airflow_site.finished_run_id).click()
        wait_for(lambda: signed_in.find_elements(By.CSS_SELECTOR, "svg.chart.tokens rect.bar"), what="run page in nav")
    finally:
        signed_in.switch_to.default_content()


def test_signed_out_browser_is_refused(browser: Any, api_server: Any) -> None:
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    browser.get(f"{api_server.url}{PREFIX}/")
    assert "Not authenticated" in browser.find_element(By.TAG_NAME, "body").text
