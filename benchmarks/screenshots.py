"""The two screenshots of docs/serving.md (not a benchmark): `lddpm serve` and TensorBoard, in headless Chromium.

    python benchmarks/screenshots.py --serve TEXT_RUN CLASS_RUN --tensorboard RUN [--out docs]

Starts `lddpm serve TEXT_RUN CLASS_RUN --port 0` on 127.0.0.1, drives the page with Selenium through
Debian's chromium and chromedriver (`make system-deps`) as the browser test does: two grids of the
text run from two prompts (the class run is in the run list), and saves the page as serve.png; then
starts `tensorboard --logdir RUN` on 127.0.0.1 and saves its scalars page as tensorboard.png.
Everything stays on this machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def browser(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--hide-scrollbars",
                 f"--window-size={width},{height}", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)


def generate(driver, run: int, settings: dict[str, str], select: dict[str, str]) -> None:
    """Fill the form (run index, select boxes by visible text, text fields), press Generate, wait for the grid."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(driver, 600)
    Select(driver.find_element(By.ID, "run")).select_by_value(str(run))
    for field, text in select.items():
        Select(driver.find_element(By.ID, field)).select_by_visible_text(text)
    for field, value in settings.items():
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    before = driver.find_element(By.ID, "status").get_attribute("data-job")
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-job") not in (None, before))
    image = driver.find_element(By.ID, "result-image")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image))


def serve_screenshot(runs: list[str], out: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    server = subprocess.Popen([sys.executable, "-m", "lddpm", "serve", *runs, "--port", "0", "--device", "cpu"],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        url = server.stdout.readline().split()[2]
        driver = browser(1200, 1180)
        try:
            driver.get(url)
            WebDriverWait(driver, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
            generate(driver, 0, {"prompt": "a shirt on the left and a trouser on the right", "steps": "20",
                                 "guidance": "3", "num": "8", "seed": "1"}, {"sampler": "dpm++2m"})
            generate(driver, 0, {"prompt": "a bag on the left and a sneaker on the right", "steps": "20",
                                 "guidance": "3", "num": "8", "seed": "0"}, {"sampler": "dpm++2m"})
            WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery figure")) >= 2)
            time.sleep(1.0)  # the gallery's thumbnails
            driver.save_screenshot(str(out))
        finally:
            driver.quit()
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)


def tensorboard_screenshot(run: str, out: Path, port: int = 6123) -> None:
    tensorboard = shutil.which("tensorboard") or str(Path(sys.executable).parent / "tensorboard")
    server = subprocess.Popen([tensorboard, "--logdir", run, "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(120):  # bounded: up to a minute for TensorBoard to load the event files
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        driver = browser(1400, 1000)
        try:
            driver.get(url + "#scalars")
            time.sleep(15)  # the dashboard fetches and draws the curves
            driver.save_screenshot(str(out))
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", nargs="+", metavar="RUN", help="runs to serve: a text run first (run 0)")
    parser.add_argument("--tensorboard", metavar="RUN", help="a run trained with run.trackers including tensorboard")
    parser.add_argument("--out", default=str(REPO / "docs"))
    args = parser.parse_args()
    if args.serve:
        serve_screenshot(args.serve, Path(args.out) / "serve.png")
    if args.tensorboard:
        tensorboard_screenshot(args.tensorboard, Path(args.out) / "tensorboard.png")


if __name__ == "__main__":
    main()
