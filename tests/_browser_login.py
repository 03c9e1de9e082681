"""Follow a tailpy login URL in headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by
Selenium; no browser download) and sign in at the test provider's form.

Usage: ``python tests/_browser_login.py URL USER PASSWORD`` (run inside a lab namespace). Prints one JSON
line ``{"title": ..., "heading": ..., "text": ...}`` of the page the sign-in ends on; exit 0 whenever that
page was reached, whatever it says (the test judges it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

CHROMIUM = ("chromium", "chromium-browser")
DRIVER = ("chromedriver",)


def find(names: tuple[str, ...]) -> str | None:
    for n in names:
        p = shutil.which(n) or (f"/usr/bin/{n}" if os.path.exists(f"/usr/bin/{n}") else None)
        if p:
            return p
    return None


def unavailable_reason() -> str | None:
    """Why a browser login cannot run here (None: it can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements-dev.lock)"
    if find(CHROMIUM) is None:
        return "Debian's chromium is not installed (apt-get install chromium chromium-driver)"
    if find(DRIVER) is None:
        return "chromedriver is not installed (apt-get install chromium-driver)"
    return None


@contextlib.contextmanager
def headless_chromium(*extra_args: str) -> Iterator[Any]:
    """A Selenium driver of Debian's headless chromium with a throwaway profile (removed afterwards), no
    sandbox (root in CI containers and lab namespaces), and ``extra_args`` (``--window-size=W,H``...)."""
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not try to download a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="tailpy-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = find(CHROMIUM) or ""
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        *extra_args,
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=find(DRIVER)), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main(url: str, user: str, password: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    with headless_chromium() as driver:
        wait = WebDriverWait(driver, 30)
        driver.get(url)
        wait.until(ec.element_to_be_clickable((By.ID, "continue"))).click()  # tailpy's "Sign in"
        wait.until(ec.presence_of_element_located((By.ID, "login"))).send_keys(user)
        driver.find_element(By.ID, "password").send_keys(password)
        driver.find_element(By.ID, "submit").click()
        wait.until(ec.presence_of_element_located((By.TAG_NAME, "h1")))
        print(
            json.dumps(
                {
                    "title": driver.title,
                    "heading": driver.find_element(By.TAG_NAME, "h1").text,
                    "text": driver.find_element(By.TAG_NAME, "body").text,
                    "url": driver.current_url,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main(*sys.argv[1:4])
