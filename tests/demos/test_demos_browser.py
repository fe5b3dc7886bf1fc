"""End to end: serve the text demo (python -m demos text) on a free port, drive one generation in headless
Chromium, check the continuation appears, save a screenshot.

Needs the Debian packages chromium + chromium-driver (.ci/run installs them) and selenium (dev extra).
HISS_SCREENSHOT_DIR=docs/img writes text_demo.png there (how docs/img/text_demo.png is made, with the
newest trained checkpoint when there is one: ``HISS_TEXT_CKPT=DIR``).
"""

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
import torch

from ssm_core import MambaConfig, MambaLMHeadModel

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                 reason="headless browser test: chromium and chromedriver not installed "
                                        "(apt-get install -y chromium chromium-driver; .ci/run does this)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, timeout: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"demo server exited with code {proc.returncode}:\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def test_text_demo_in_headless_chromium(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[dev]')")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ckpt = os.environ.get("HISS_TEXT_CKPT")
    if not ckpt:
        torch.manual_seed(0)
        ckpt = str(tmp_path / "ckpt")
        config = MambaConfig(d_model=32, n_layer=2, vocab_size=256, ssm_cfg={"d_state": 8})
        MambaLMHeadModel(config).save_pretrained(ckpt)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, "-m", "demos", "text", "--port", str(port), "--ckpt", ckpt,
                               "--threads", "1"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    driver = None
    try:
        wait_for(f"http://127.0.0.1:{port}/", server, timeout=120)
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1250",
                    "--disable-gpu"):
            opts.add_argument(arg)
        driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=opts)
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 60)
        prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#text-prompt textarea"))
        prompt.clear()
        prompt.send_keys("To read a file in Python, ")
        driver.find_element(By.CSS_SELECTOR, "#text-generate").click()
        wait.until(lambda d: "bits/byte" in d.find_element(By.CSS_SELECTOR, "#text-status").text)
        output = driver.find_element(By.CSS_SELECTOR, "#text-output textarea").get_attribute("value")
        status = driver.find_element(By.CSS_SELECTOR, "#text-status").text
        assert output.strip(), "no continuation appeared"
        assert "200 bytes in" in status or "bytes in" in status
        # the surprisal view shows prompt + continuation
        shown = driver.find_element(By.CSS_SELECTOR, "#text-surprisal").text
        assert "ToreadafileinPython," in "".join(shown.split())  # spans are laid out with extra whitespace
        shot = tmp_path / "text_demo.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("HISS_SCREENSHOT_DIR"):
            out = Path(os.environ["HISS_SCREENSHOT_DIR"]) / "text_demo.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".png.tmp")
            shutil.copyfile(shot, tmp)
            os.replace(tmp, out)  # atomic: never a half-written image in docs/
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
