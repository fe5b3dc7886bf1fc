"""The vision demo in headless Chromium: upload an image, classify, read the top-5 and see the saliency map;
a screenshot is saved (HISS_SCREENSHOT_DIR=docs/img writes docs/img/vision_demo.png). Uses the checkpoint shipped
in apps/vision/assets (what a fresh clone serves). Needs chromium + chromium-driver and selenium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
EXAMPLE = REPO / "apps" / "vision" / "assets" / "examples" / "fashion_ankle_boot.png"

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="headless browser test: chromium and chromedriver not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vision_demo_classifies_an_upload(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, "-m", "apps.vision.demo", "--port", str(port)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    driver = None
    try:
        t0 = time.time()
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"demo exited: {server.stdout.read()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
                    break
            except OSError:
                if time.time() - t0 > 180:
                    raise
                time.sleep(0.5)
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                    "--disable-gpu"):
            opts.add_argument(arg)
        driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=opts)
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
        if os.environ.get("HISS_SCREENSHOT_DIR"):
            out = Path(os.environ["HISS_SCREENSHOT_DIR"]) / "vision_demo.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, out.with_suffix(".png.tmp"))
            os.replace(out.with_suffix(".png.tmp"), out)
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
