"""A real run of the DAG on the bundled samples (LocalExecutor, the quality gate's real thresholds, `review: flagged`)
seen in a real browser (Debian chromium): a flagged answer's review in the Airflow UI's Required Actions, and the
finished run's page in the plugin with its flagged items, failed checks and hint-frame thumbnails.

The README's screenshots come from here (docs/run-detail.png, docs/review.png), refreshed only with
COSMOS_UPSAMPLE_SCREENSHOT=1: tests never rewrite tracked files otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

import pytest

from include.cosmos_upsample.settings import DAG_ID, SAMPLE_INPUT_DIR
from tests.browser import chromium, sign_in, wait_for
from tests.deploy.test_local_executor import local_deployment
from tests.deploy.test_review import answer_once_parked, hitl_details
from tests.helpers import STRICT_QUALITY
from tests.plugin.upsample_fixtures import ROOT, chromium_paths
from tests.processes import simple_auth_password

pytestmark = [
    pytest.mark.deploy,
    pytest.mark.browser,
    pytest.mark.skipif(chromium_paths() is None, reason="needs Debian packages chromium and chromium-driver"),
]

SCREENSHOTS = os.environ.get("COSMOS_UPSAMPLE_SCREENSHOT") == "1"
EDITED = ("The video shows a white robot arm on a cluttered table. It grips a red cup by its handle, lifts it and "
          "places it on a grey shelf, then returns to its resting pose under soft overhead light.")


def screenshot(driver, name: str, tmp_path: Path) -> Path:
    path = ROOT / "docs" / name if SCREENSHOTS else tmp_path / name
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    return path


def test_review_in_the_ui_and_the_run_page_of_a_real_run(tmp_path, migrated_db):
    from selenium.webdriver.common.by import By

    output_dir = tmp_path / "outputs"
    conf = {"output_dir": str(output_dir), "review": "flagged", "quality": STRICT_QUALITY, "quality_retries": 1}
    with local_deployment(tmp_path, SAMPLE_INPUT_DIR, migrated_db, COSMOS_UPSAMPLE_REVIEW_TIMEOUT_SECONDS="900") \
            as site, chromium() as driver:
        run_id = site.trigger(site.form_conf(**conf))
        site.unpause()

        def all_requests():
            tis = {ti["task_id"]: ti for ti in site.task_instances(run_id) if ti["map_index"] < 0}
            if tis.get("review_requests", {}).get("state") != "success":
                return None
            asked = [ti for ti in site.task_instances(run_id) if ti["task_id"] == "review"]
            details = hitl_details(site, run_id)
            return details if details and len(details) == len(asked) else None

        details = site.wait(all_requests, 1200, "the review requests of the flagged answers")
        sign_in(driver, site.url, "admin", simple_auth_password(site.home))
        first = details[0]
        map_index = first["task_instance"]["map_index"]
        # The UI's own link to a mapped task's Required Actions (zG in airflow/ui: .../tasks/<id>/mapped/<index>).
        driver.get(f"{site.url}/dags/{DAG_ID}/runs/{quote(run_id, safe='')}/tasks/review/mapped/{map_index}"
                   "/required_actions")
        try:
            page = wait_for(lambda: (text := driver.find_element(By.TAG_NAME, "body").text) and
                            "Review the flagged answer" in text and "Approve" in text and text, 90,
                            "the review form in Required Actions")
        finally:
            driver.save_screenshot(str(tmp_path / "review-page.png"))
            print(driver.find_element(By.TAG_NAME, "body").text[:3000])
        assert "Hint frames the model saw" in page
        screenshot(driver, "review.png", tmp_path)

        # As the reviewer would after reading the form: the first approved with an edit, the others rejected.
        answer_once_parked(site, run_id, {map_index: ("Approve", EDITED)} | {
            detail["task_instance"]["map_index"]: ("Reject", detail["params"]["answer"]["value"])
            for detail in details[1:]})
        run = site.wait_run(run_id, 900)
        assert run["state"] == "success", (run, site.services.tails())

        driver.get(f"{site.url}/upsample-reports/runs/{quote(run_id, safe='')}")
        rows = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "table#items tbody tr[data-status]"), 60,
                        "the run's items")
        statuses = [row.get_attribute("data-status") for row in rows]
        assert statuses.count("flagged") == len(details) - 1 and "upsampled" in statuses
        assert "Answer quality" in driver.find_element(By.CSS_SELECTOR, "section.quality").text
        flagged = next(row for row in rows if row.get_attribute("data-status") == "flagged")
        assert flagged.find_elements(By.CSS_SELECTOR, ".check")  # its failed checks
        thumbs = driver.find_elements(By.CSS_SELECTOR, "img.thumb")
        assert len(thumbs) == 2 * len(rows)
        wait_for(lambda: all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
                             for img in thumbs), 30, "the thumbnails to load through the signed-in route")
        screenshot(driver, "run-detail.png", tmp_path)
        driver.get(f"{site.url}/upsample-reports/runs/{quote(run_id, safe='')}?status=flagged")
        shown = driver.find_elements(By.CSS_SELECTOR, "table#items tbody tr[data-status]")
        assert {row.get_attribute("data-status") for row in shown} == {"flagged"}
