"""The audio demo end to end in headless Chromium (python -m demos audio): one generation of a chosen digit,
the player and plot appear, a screenshot. HISS_SCREENSHOT_DIR=docs/img writes audio_demo.png there (with the
shipped checkpoint, or HISS_AUDIO_CKPT=DIR). Needs chromium + chromium-driver (Debian) and selenium (dev extra)."""

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

from apps.audio.generate import DEFAULT_CKPT

REPO = Path(__file__).resolve().parents[3]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="headless browser test: chromium and chromedriver not installed "
                                       "(apt-get install -y chromium chromium-driver)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_audio_demo_in_headless_chromium(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[dev]')")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ckpt = os.environ.get("HISS_AUDIO_CKPT") or str(DEFAULT_CKPT)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, "-m", "demos", "audio", "--port", str(port), "--ckpt", ckpt,
                               "--threads", "1"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    driver = None
    try:
        t0 = time.time()
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"demo server exited:\n{server.stdout.read()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.time() - t0 > 300:
                    raise TimeoutError("the audio demo did not start within 300 s") from None
                time.sleep(0.5)
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                    "--disable-gpu"):
            opts.add_argument(arg)
        driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=opts)
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
        if os.environ.get("HISS_SCREENSHOT_DIR"):
            out = Path(os.environ["HISS_SCREENSHOT_DIR"]) / "audio_demo.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".png.tmp")
            shutil.copyfile(shot, tmp)
            os.replace(tmp, out)
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
