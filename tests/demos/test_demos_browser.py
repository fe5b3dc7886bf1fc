"""End to end in headless Chromium: the text demo alone (python -m demos text: one generation, a screenshot),
and the launcher itself (demos.build_all, every app as a tab): each tab opens, shows one copy of its app, and
the apps we know how to drive (text, genomics) answer the input typed into that copy.

Needs the Debian packages chromium + chromium-driver (.ci/run installs them) and selenium (dev extra).
HISS_SCREENSHOT_DIR=docs/img writes text_demo.png there (how docs/img/text_demo.png is made, with the
newest trained checkpoint when there is one: ``HISS_TEXT_CKPT=DIR``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from browser_support import chrome, free_port, needs_browser, publish_screenshot, start_server, stop

from ssm_core import MambaConfig, MambaLMHeadModel

pytestmark = [pytest.mark.usefixtures("one_thread"), needs_browser]


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
        publish_screenshot(shot, "text_demo.png")
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
