"""`lddpm serve` as a user meets it: the command in its own process, the page in a real headless browser
(Debian's chromium and chromedriver, driven by Selenium), raw requests and a bounded loopback load test.

All traffic goes to 127.0.0.1 only, and every loop is bounded in count and time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_train import tiny_config, write_idx

pytest.importorskip("starlette", reason="the serve extra (pip install 'lddpm[serve]'; make setup installs it)")

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`lddpm serve RUN --port 0` in its own process over a tiny class-conditional run; yields (url, process)."""
    from lddpm.train import train

    base = tmp_path_factory.mktemp("serve-browser")
    dirs = (write_idx(base / "idx"), base / "cache")
    train(tiny_config(dirs, "run.steps=2"), base / "run", progress=False)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    log = base / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "lddpm", "serve", str(base / "run"), "--port", "0",
                                    "--device", "cpu"], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    try:
        line = process.stdout.readline()  # "lddpm serve: http://127.0.0.1:PORT/  (runs ...)"
        assert line.startswith("lddpm serve: http://127.0.0.1:"), line + log.read_text()
        yield line.split()[2], process
        process.send_signal(signal.SIGINT)  # Ctrl-C: Uvicorn's graceful shutdown
        assert process.wait(timeout=20) == 0, log.read_text()
        assert process.stdout.read().strip() == "lddpm serve: stopped"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def fetch(url: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, bytes]:
    """GET (or POST a JSON body) -> (status, body bytes)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def raw_get(url: str, target: str) -> tuple[int, bytes]:
    """A GET whose request target is sent exactly as written (no client-side normalization of `..`)."""
    host, port = url.split("//")[1].rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def wait_done(url: str, job_id: int, timeout: float = 120.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = json.loads(fetch(f"{url}api/jobs/{job_id}")[1])
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} unfinished after {timeout} s")


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="chromium and chromedriver are not installed (Debian packages chromium and chromium-driver; "
                           "`make system-deps` installs them as root)")
def test_the_page_in_a_headless_browser_generates_a_grid(server, tmp_path):
    pytest.importorskip("selenium", reason="the test extra's selenium (make setup installs it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, _ = server
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        Select(driver.find_element(By.ID, "class")).select_by_visible_text("2: Pullover")
        for field, value in (("steps", "3"), ("num", "5"), ("seed", "11"), ("guidance", "2")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-job"))
        image = driver.find_element(By.ID, "result-image")
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
        size = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
        src = image.get_attribute("src")
        command = driver.find_element(By.ID, "command").text
        facts = driver.find_element(By.ID, "facts").text
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery figure"))
        if os.environ.get("LDDPM_SCREENSHOT"):  # docs/serve.png is taken this way (docs/serving.md)
            driver.save_screenshot(os.environ["LDDPM_SCREENSHOT"])
        assert not driver.find_element(By.ID, "error").text
    finally:
        driver.quit()
    status, data = fetch(src)
    grid = Image.open(BytesIO(data))
    assert status == 200 and grid.format == "PNG" and grid.size == (56, 38)  # 5 images of 16 px, 3 a row
    assert list(size) == [56, 38]  # the browser decoded the same PNG
    job = json.loads(fetch(f"{url}api/jobs/{src.rstrip('/').split('/')[-2]}")[1])
    assert job["request"] == {**job["request"], "class": 2, "steps": 3, "num_images": 5, "seed": 11,
                              "guidance_scale": 2.0}
    assert command == job["command"] and command.startswith("lddpm sample ") and "--class 2" in command
    assert "s per image" in facts and "Pullover" in facts


def test_raw_traversal_requests_and_a_bounded_load_on_loopback(server):
    url, process = server
    for target in ("/../../../../etc/passwd", "/..%2f..%2f..%2fetc%2fpasswd", "/%2e%2e/%2e%2e/etc/passwd",
                   "/api/jobs/1/../../../../../etc/passwd", "/static/../../etc/passwd", "//etc/passwd",
                   "/api/..%5c..%5cetc%5cpasswd", "http://127.0.0.1/../etc/passwd"):
        status, body = raw_get(url, target)
        assert status in (400, 404), (target, status)
        assert b"root:" not in body
    # 50 concurrent requests: 25 generations and 25 reads; every one is answered, then every job finishes.
    body = {"run": 0, "steps": 1, "num_images": 1}
    calls = [("post", dict(body, seed=i)) for i in range(25)] + [("get", None)] * 25
    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(lambda c: fetch(f"{url}api/jobs", c[1]) if c[0] == "post" else fetch(f"{url}api/runs"),
                                calls))
    assert [status for status, _ in answers] == [202] * 25 + [200] * 25
    ids = [json.loads(data)["id"] for _, data in answers[:25]]
    assert len(set(ids)) == 25
    jobs = [wait_done(url, i) for i in ids]
    assert all(j["status"] == "done" for j in jobs)
    grids = {fetch(f"{url}api/jobs/{i}/grid.png")[1] for i in ids}
    assert len(grids) == 25  # 25 seeds, 25 different images
    assert process.poll() is None and fetch(f"{url}api/runs")[0] == 200  # the server is still up
    gallery = json.loads(fetch(f"{url}api/jobs")[1])["jobs"]
    assert {j["id"] for j in gallery} >= set(ids)
    grid = np.asarray(Image.open(BytesIO(fetch(f"{url}api/jobs/{ids[0]}/grid.png")[1])))
    assert grid.shape == (20, 20)  # one 16 px image with its 2 px border
