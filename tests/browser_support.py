"""What the headless-Chromium tests share: a free port, a demo server started and stopped, a Chrome driver, the
screenshot copy into docs. Needs the Debian packages chromium + chromium-driver (.ci/run installs them) and selenium."""

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

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

needs_browser = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                   reason="headless browser test: chromium and chromedriver not installed "
                                          "(apt-get install -y chromium chromium-driver; .ci/run does this)")


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


def start_server(args: list[str], port: int, timeout: float = 300) -> subprocess.Popen:
    """``python *args`` from the repository root, once http://127.0.0.1:port/ answers (a loaded box: minutes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/", server, timeout)
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


def chrome(webdriver, height: int = 1250):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size=1280,{height}",
                "--disable-gpu"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=opts)


def publish_screenshot(shot: Path, name: str) -> None:
    """With HISS_SCREENSHOT_DIR set (docs/img), copy the screenshot there atomically: how the docs' images are made."""
    if os.environ.get("HISS_SCREENSHOT_DIR"):
        out = Path(os.environ["HISS_SCREENSHOT_DIR"]) / name
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".png.tmp")
        shutil.copyfile(shot, tmp)
        os.replace(tmp, out)
