"""The vision demo in headless Chromium: upload an image, classify, read the top-5 and see the saliency map;
a screenshot is saved (HISS_SCREENSHOT_DIR=docs/img writes docs/img/vision_demo.png). Uses the checkpoint shipped
in apps/vision/assets (what a fresh clone serves). Needs chromium + chromium-driver and selenium."""

from __future__ import annotations

import pytest
from browser_support import REPO, chrome, free_port, needs_browser, publish_screenshot, start_server, stop

EXAMPLE = REPO / "apps" / "vision" / "assets" / "examples" / "fashion_ankle_boot.png"

pytestmark = needs_browser


def test_vision_demo_classifies_an_upload(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    server = start_server(["-m", "apps.vision.demo", "--port", str(port)], port)
    driver = None
    try:
        driver = chrome(webdriver, height=900)
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 240)  # a loaded shared CPU: the first answer can take minutes
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#vision-image input[type=file]"))
        upload.send_keys(str(EXAMPLE))
        wait.until(lambda d: "gradient" in d.find_element(By.CSS_SELECTOR, "#vision-note").text)
        top5 = driver.find_element(By.CSS_SELECTOR, "#vision-top5").text
        assert "ankle boot" in top5.lower(), top5
        assert driver.find_elements(By.CSS_SELECTOR, "#vision-saliency img"), "no saliency image shown"
        shot = tmp_path / "vision_demo.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        publish_screenshot(shot, "vision_demo.png")
    finally:
        if driver is not None:
            driver.quit()
        stop(server)
