"""Shared helpers for the console's browser test.

`scripts/test` starts `tollgate serve --demo` and passes its address, demo key and admin token in
TOLLGATE_URL, TOLLGATE_KEY and TOLLGATE_ADMIN_TOKEN (as for tests/sdk). The browser is Debian's
headless Chromium driven through Debian's chromedriver, both named by path, so that Selenium
Manager never tries to download a browser or a driver (the test machines are offline).

What the page shows is compared with what the API answers, as exact strings: money is the API's
decimal string, and the browser must show it unchanged.
"""

import json
import os
import pathlib
import urllib.error
import urllib.request

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

URL = os.environ["TOLLGATE_URL"]
KEY = os.environ["TOLLGATE_KEY"]
ADMIN_TOKEN = os.environ["TOLLGATE_ADMIN_TOKEN"]

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
# Set (e.g. CONSOLE_SCREENSHOTS=docs/console) to save the pages' screenshots there.
SCREENSHOTS = os.environ.get("CONSOLE_SCREENSHOTS")

WAIT_SECONDS = 15
WINDOW = (1280, 900)


# --- the API, straight (urllib) ---------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, body: dict):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


def call(method: str, path: str, token: str, body: dict | None = None, raw: bool = False):
    """One request to the gateway; the parsed JSON (or the text when raw), or ApiError."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {token}"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(URL + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            text = response.read().decode()
            return text if raw else json.loads(text)
    except urllib.error.HTTPError as error:
        text = error.read().decode()
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = {"raw": text}
        raise ApiError(error.code, parsed) from None


def admin_get(path: str):
    return call("GET", path, ADMIN_TOKEN)


def chat(key: str, model: str) -> str:
    """One non-streaming chat completion; returns its request id."""
    request = urllib.request.Request(
        URL + "/v1/chat/completions",
        data=json.dumps(
            {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}
        ).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=15) as response:
        assert response.status == 200
        return response.headers["X-Request-ID"]


def message(key: str, model: str) -> str:
    """One non-streaming Anthropic Messages call; returns its request id."""
    request = urllib.request.Request(
        URL + "/v1/messages",
        data=json.dumps(
            {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}
        ).encode(),
        headers={"x-api-key": key, "anthropic-version": "2023-06-01", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=15) as response:
        assert response.status == 200
        return response.headers["X-Request-ID"]


# --- the browser ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def download_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="session")
def driver(download_dir):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--disable-dev-shm-usage",
        "--lang=en-US",
    ):
        options.add_argument(argument)
    options.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(download_dir),
            "download.prompt_for_download": False,
            "safebrowsing.enabled": False,
        },
    )
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    # Headless Chromium saves downloads only where it is told to, through DevTools.
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
    yield browser
    browser.quit()


@pytest.fixture(autouse=True)
def logged_out(driver):
    """Each test starts logged out, whatever the one before left (the tab's sessionStorage)."""
    driver.get(URL + "/healthz")
    driver.execute_script("sessionStorage.clear()")


@pytest.fixture(autouse=True)
def no_script_errors(driver, logged_out):
    """Every test ends with no JavaScript error and no Content-Security-Policy violation in the
    browser's console (failed API calls a test provokes on purpose are network entries, allowed)."""
    driver.get_log("browser")
    yield
    errors = [
        entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE" and entry["source"] != "network"
    ]
    assert errors == [], errors


def wait(driver, condition, message: str, seconds: float = WAIT_SECONDS):
    """Polls the condition; an element replaced while it was read (the page re-renders a section
    when it reloads) is read again at the next poll."""
    try:
        return WebDriverWait(driver, seconds, ignored_exceptions=(StaleElementReferenceException,)).until(condition)
    except TimeoutException:
        pytest.fail(f"timed out after {seconds} s waiting for: {message}")


def find(driver, css: str):
    """The element, once it is on the page and shown."""

    def present(browser):
        for element in browser.find_elements(By.CSS_SELECTOR, css):
            if element.is_displayed():
                return element
        return False

    return wait(driver, present, css)


def ready(driver, test: str):
    """The section `[data-test=test]` once it has loaded (data-state=ready)."""
    section = f'[data-test="{test}"]'
    wait(
        driver,
        lambda browser: (
            browser.find_elements(By.CSS_SELECTOR, f'{section}[data-state="ready"]')
            or browser.find_elements(By.CSS_SELECTOR, f'{section}[data-state="error"]')
        ),
        f"{section} loaded",
    )
    element = driver.find_element(By.CSS_SELECTOR, section)
    assert element.get_attribute("data-state") == "ready", banner(driver)
    return element


def banner(driver) -> str:
    """The error banner's text, if it is shown."""
    element = driver.find_element(By.ID, "banner")
    return element.text if element.is_displayed() else ""


def text_becomes(driver, css: str, expected: str) -> None:
    """Waits until the element's text is exactly `expected`; fails showing what it is instead."""
    find(driver, css)
    try:
        WebDriverWait(driver, WAIT_SECONDS, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda browser: browser.find_element(By.CSS_SELECTOR, css).text == expected
        )
    except TimeoutException:
        assert driver.find_element(By.CSS_SELECTOR, css).text == expected, f"{css}: banner {banner(driver)!r}"


def screenshot(driver, name: str, full_page: bool = False) -> None:
    """Saves docs/console/<name>.png when CONSOLE_SCREENSHOTS names the directory."""
    if not SCREENSHOTS:
        return
    directory = pathlib.Path(SCREENSHOTS)
    directory.mkdir(parents=True, exist_ok=True)
    driver.execute_script("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0);")
    if full_page:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(WINDOW[0], height + 100)
    driver.save_screenshot(str(directory / f"{name}.png"))
    driver.set_window_size(*WINDOW)
