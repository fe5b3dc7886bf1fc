"""End to end in headless Chromium: the text demo alone (python -m demos text: one generation, a screenshot),
and the launcher itself (demos.build_all, every app as a tab): each tab opens, shows one copy of its app, and
the apps we know how to drive (text, genomics) answer the input typed into that copy.

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


def start_server(args: list[str], port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/", server, timeout=180)
    except BaseException:
        stop(server)
        raise
    return server


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()


def chrome(webdriver):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1250",
                "--disable-gpu"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=opts)


def tiny_text_checkpoint(path: Path) -> str:
    torch.manual_seed(0)
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=256, ssm_cfg={"d_state": 8})
    MambaLMHeadModel(config).save_pretrained(path)
    return str(path)


def test_text_demo_in_headless_chromium(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[dev]')")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ckpt = os.environ.get("HISS_TEXT_CKPT") or tiny_text_checkpoint(tmp_path / "ckpt")
    port = free_port()
    server = start_server(["-m", "demos", "text", "--port", str(port), "--ckpt", ckpt, "--threads", "1"], port)
    driver = None
    try:
        driver = chrome(webdriver)
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 240)  # generous: a loaded CI box, first kernel use
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
        stop(server)


# The launcher as `python -m demos` builds it (demos.build_all), with the test's text checkpoint
SERVE_LAUNCHER = """
import sys
import torch
torch.set_num_threads(1)
import demos
from apps.common.demo import launch
launch(demos.build_all({"text": sys.argv[2]}), port=int(sys.argv[1]))
"""


def displayed(driver, by, what):
    return [e for e in driver.find_elements(by, what) if e.is_displayed()]


def drive_text(driver, wait, By):
    """Type into the one prompt shown, generate: the surprisal view must show what was typed."""
    (prompt,) = displayed(driver, By.CSS_SELECTOR, "#text-prompt textarea")
    prompt.clear()
    prompt.send_keys("Launcher tab check: ")
    (button,) = displayed(driver, By.CSS_SELECTOR, "#text-generate")
    button.click()
    wait.until(lambda d: "bits/byte" in d.find_element(By.CSS_SELECTOR, "#text-status").text)
    shown = "".join(driver.find_element(By.CSS_SELECTOR, "#text-surprisal").text.split())
    assert "Launchertabcheck:" in shown, "the generation did not read the prompt typed into the visible copy"


def drive_genomics(driver, wait, By):
    """Paste a FASTA record into the one FASTA box shown, score it: its name must appear in the summary."""
    boxes = displayed(driver, By.XPATH, "//label[.//*[contains(text(), 'FASTA')]]//textarea")
    assert len(boxes) == 1, f"{len(boxes)} FASTA boxes shown"
    boxes[0].clear()
    boxes[0].send_keys(">launcher_probe\n" + "ACGTTGCAAGCT" * 25)
    (score,) = [b for b in displayed(driver, By.TAG_NAME, "button") if b.text.strip() == "Score"]
    score.click()
    wait.until(lambda d: any("launcher_probe" in e.text for e in displayed(d, By.TAG_NAME, "table")))


DRIVERS = {"text": drive_text, "genomics": drive_genomics}


def test_launcher_every_tab_in_headless_chromium(tmp_path):
    """python -m demos used to draw every app twice (the first copy ignored its inputs): each tab must show
    one copy, and the apps with a driver here must answer what is typed into it."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[dev]')")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    import demos

    ckpt = tiny_text_checkpoint(tmp_path / "ckpt")
    port = free_port()
    server = start_server(["-c", SERVE_LAUNCHER, str(port), ckpt], port)
    driver = None
    try:
        driver = chrome(webdriver)
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 120)
        for name, (_, title) in demos.APPS.items():
            tab = wait.until(lambda d, t=title: d.find_element(
                By.XPATH, f"//button[@role='tab' and normalize-space()='{t}']"))
            tab.click()
            wait.until(lambda d, t=tab: t.get_attribute("aria-selected") == "true")
            page = driver.find_element(By.TAG_NAME, "body").text
            assert "could not start" not in page, f"tab {title!r}: {page[:500]}"
            if name in DRIVERS:
                DRIVERS[name](driver, wait, By)
            driver.save_screenshot(str(tmp_path / f"launcher_{name}.png"))
    finally:
        if driver is not None:
            driver.quit()
        stop(server)
