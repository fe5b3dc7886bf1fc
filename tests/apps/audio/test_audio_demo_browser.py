"""The audio demo end to end in headless Chromium (python -m demos audio): one generation of a chosen digit,
the player and plot appear, a screenshot. HISS_SCREENSHOT_DIR=docs/img writes audio_demo.png there (with the
shipped checkpoint, or HISS_AUDIO_CKPT=DIR). Needs chromium + chromium-driver (Debian) and selenium (dev extra)."""

from __future__ import annotations

import os

import pytest
from browser_support import chrome, free_port, needs_browser, publish_screenshot, start_server, stop

from apps.audio.generate import DEFAULT_CKPT

pytestmark = needs_browser


def test_audio_demo_in_headless_chromium(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[dev]')")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ckpt = os.environ.get("HISS_AUDIO_CKPT") or str(DEFAULT_CKPT)
    port = free_port()
    server = start_server(["-m", "demos", "audio", "--port", str(port), "--ckpt", ckpt, "--threads", "1"], port)
    driver = None
    try:
        driver = chrome(webdriver, height=1000)
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 300)  # the first generation may wait for the CPU kernels' build
        button = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#audio-generate"))
        # pick "seven" in the digit dropdown: open it, click the option
        driver.find_element(By.CSS_SELECTOR, "#audio-digit input").click()
        option = wait.until(lambda d: d.find_element(By.XPATH, "//li[@role='option' and @aria-label='seven']"))
        option.click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#audio-digit input").get_attribute("value") == "seven")
        button.click()
        wait.until(lambda d: "samples/s" in d.find_element(By.CSS_SELECTOR, "#audio-status").text)
        status = driver.find_element(By.CSS_SELECTOR, "#audio-status").text
        assert "16,000 new samples" in status
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#audio-plot img, #audio-plot svg, #audio-plot canvas"))
        assert driver.find_elements(By.CSS_SELECTOR, "#audio-output audio, #audio-output button")
        shot = tmp_path / "audio_demo.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        publish_screenshot(shot, "audio_demo.png")
    finally:
        if driver is not None:
            driver.quit()
        stop(server)
