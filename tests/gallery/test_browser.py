"""The gallery in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium): the jobs page lists the jobs, a job page shows the loss curve and every
checkpoint's sample grid (the images load), the slider and the arrow keys step through the
checkpoints, and a running job's progress advances on the page without a reload.
Screenshots go to test-artifacts/gallery/ (docs/gallery.md shows them)."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.gallery.conftest import EVERY, NAMESPACE, STEPS

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="no chromium/chromedriver: scripts/install-system-tools.sh installs them with apt "
    "(sudo apt-get install --no-install-recommends chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--window-size=1280,1400",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_until(predicate, timeout: float = 20, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def read(browser, selector: str, what: str = "textContent") -> str | None:
    """An element's text (or attribute), read in the page: the polling script replaces the
    live parts, so a WebDriver element found before may be gone by the time it is read."""
    return browser.execute_script(
        "const e = document.querySelector(arguments[0]); return e && (arguments[1] === 'textContent' "
        "? e.textContent : e.getAttribute(arguments[1]))",
        selector,
        what,
    )


def console_errors(browser) -> list[str]:
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_the_jobs_page_lists_the_jobs(world, browser, artifacts):
    browser.get(world.url)
    by_job = browser.execute_script(  # read in the page: the rows are replaced every 2 s
        "return Object.fromEntries(Array.from(document.querySelectorAll('#rows tr[data-job]'))"
        ".map(r => [r.dataset.job, r.textContent]))"
    )
    assert set(by_job) == {f"{NAMESPACE}/toy-cat", f"{NAMESPACE}/toy-cat-live"}
    assert "Succeeded" in by_job[f"{NAMESPACE}/toy-cat"] and f"{STEPS}/{STEPS}" in by_job[f"{NAMESPACE}/toy-cat"]
    browser.save_screenshot(str(artifacts / "jobs.png"))
    browser.get(world.url + "?phase=Succeeded")
    assert browser.execute_script(
        "return Array.from(document.querySelectorAll('#rows tr[data-job]')).map(r => r.dataset.job)"
    ) == [f"{NAMESPACE}/toy-cat"]
    assert not console_errors(browser)  # CSP violations would show here


def test_the_job_page_shows_the_curve_and_every_checkpoints_grid_and_steps_through_them(world, browser, artifacts):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(world.job_url("toy-cat"))
    lines = browser.find_elements(By.CSS_SELECTOR, "#curve svg polyline.series")
    assert {line.get_attribute("class") for line in lines} == {"series loss", "series lr"}
    assert len(lines[0].get_attribute("points").split()) == STEPS
    steps = list(range(EVERY, STEPS + 1, EVERY))
    figures = browser.find_elements(By.CSS_SELECTOR, "#checkpoints figure.grid")
    assert [int(f.get_attribute("data-step")) for f in figures] == steps
    widths = wait_until(
        lambda: (
            (
                w := browser.execute_script(
                    "return Array.from(document.querySelectorAll('figure.grid img')).map(i => i.complete ? i.naturalWidth : 0)"
                )
            )
            and all(w)
            and w
        ),
        what="every grid to load",
    )
    assert len(widths) == len(steps) and all(w > 0 for w in widths)
    assert (
        browser.execute_script(
            "const i = document.querySelector('img.progression'); return i.complete && i.naturalWidth"
        )
        > 0
    )

    def shown() -> tuple[str, list[str]]:
        visible = [f.get_attribute("data-step") for f in figures if f.is_displayed()]
        return browser.find_element(By.ID, "shown").text, visible

    assert shown() == (f"step {steps[-1]}", [str(steps[-1])])
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.ARROW_LEFT)
    assert shown() == (f"step {steps[-2]}", [str(steps[-2])])
    body.send_keys(Keys.ARROW_LEFT)
    assert shown() == (f"step {steps[0]}", [str(steps[0])])
    browser.find_element(By.CSS_SELECTOR, ".stepper .next").click()
    assert shown() == (f"step {steps[1]}", [str(steps[1])])
    slider = browser.find_element(By.ID, "slider")
    browser.execute_script("arguments[0].value = 2; arguments[0].dispatchEvent(new Event('input'))", slider)
    assert shown() == (f"step {steps[2]}", [str(steps[2])])
    assert "Succeeded" in browser.find_element(By.ID, "status").text
    assert "The job is finished successfully" in browser.find_element(By.ID, "status").text
    browser.save_screenshot(str(artifacts / "job.png"))
    assert not console_errors(browser)


def test_a_running_jobs_progress_advances_without_a_reload(world, browser, artifacts):
    world.set_progress(world.running, 3)
    browser.get(world.job_url(world.running))
    assert read(browser, "#summary") == "3/100"
    browser.execute_script("window.notReloaded = true")
    world.set_progress(world.running, 42)
    wait_until(lambda: read(browser, "#summary") == "42/100", what="step 42 on the job page")
    assert browser.execute_script("return window.notReloaded") is True
    assert read(browser, "#progress", "value") == "42"

    browser.get(world.url)
    browser.execute_script("window.notReloaded = true")
    world.set_progress(world.running, 77)
    row = f'#rows tr[data-job="{NAMESPACE}/{world.running}"]'
    wait_until(lambda: "77/100" in (read(browser, row) or ""), what="step 77 on the jobs page")
    assert browser.execute_script("return window.notReloaded") is True
    browser.save_screenshot(str(artifacts / "jobs-live.png"))
