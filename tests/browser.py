"""Debian chromium (headless, through chromium-driver) for the browser tests: never a downloaded browser."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tests.plugin.upsample_fixtures import chromium_paths


@contextmanager
def chromium(window: str = "1440,2000") -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium_paths()  # type: ignore[misc]
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={window}"):
        options.add_argument(argument)
    # An explicit driver path keeps Selenium Manager from trying to download one.
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # elements come and go while React renders
            last_error = exc
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}: {last_error}")


def sign_in(driver: Any, url: str, username: str, password: str) -> Any:
    """Through SimpleAuthManager's login page, as a person does; the UI's `_token` cookie then signs every request."""
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/")
    field = wait_for(lambda: driver.find_element(By.CSS_SELECTOR, "input[name=username]"), what="login form")
    field.send_keys(username)
    driver.find_element(By.CSS_SELECTOR, "input[name=password]").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for(lambda: driver.get_cookie("_token"), what="the _token cookie after signing in")
    return driver
