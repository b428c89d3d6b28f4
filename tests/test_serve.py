"""`lddpm serve`, in-process (Starlette's TestClient): the API, its checks, its refusals, the queue, and the
`lddpm sample` command each grid carries, run for real and compared byte for byte."""

from __future__ import annotations

import builtins
import shlex
import threading
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lddpm.errors import LddpmError
from lddpm.sampling import SAMPLERS
from test_train import tiny_config, write_idx

pytest.importorskip("starlette", reason="the serve extra (pip install 'lddpm[serve]'; make setup installs it)")
pytest.importorskip("httpx", reason="the test extra's httpx (make setup installs it)")
from starlette.testclient import TestClient  # noqa: E402

from lddpm.serve import app as serve_app  # noqa: E402
from lddpm.serve import jobs as serve_jobs  # noqa: E402
from lddpm.serve import create_app, load_runs  # noqa: E402

LOOPBACK = ["127.0.0.1", "localhost"]


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """A class-conditional (2 steps) and an unconditional (1 step) tiny run."""
    from lddpm.train import train

    base = tmp_path_factory.mktemp("serve")
    dirs = (write_idx(base / "idx"), base / "cache")
    train(tiny_config(dirs, "run.steps=2"), base / "cond", progress=False)
    train(tiny_config(dirs, "run.steps=1", "run.class_conditional=false"), base / "uncond", progress=False)
    return base / "cond", base / "uncond"


@pytest.fixture(scope="module")
def runs(run_dirs):
    return load_runs([str(p) for p in run_dirs], device="cpu")


@pytest.fixture
def client(runs):
    app = create_app(runs, allowed_hosts=LOOPBACK)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        c.jobs = app.state.jobs
        yield c
    app.state.jobs.stop()


def wait(client, job_id: int, timeout: float = 60.0) -> dict:
    """Poll a job until it is done or failed (bounded)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def png(data: bytes) -> np.ndarray:
    image = Image.open(BytesIO(data))
    assert image.format == "PNG"
    return np.asarray(image)


def test_the_page_and_the_runs(client, run_dirs):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for outside in ("http://", "https://", "//cdn", "@import"):  # nothing is loaded from elsewhere
        assert outside not in page.text.replace("http://www.w3.org", "")
    data = client.get("/api/runs").json()
    cond, uncond = data["runs"]
    assert (cond["id"], cond["kind"], cond["classes"][1], cond["resolution"]) == (0, "class", "Trouser", 16)
    assert (uncond["id"], uncond["kind"], uncond["classes"]) == (1, "unconditional", [])
    assert cond["path"] == str(run_dirs[0].resolve()) and cond["step"] == 2
    assert list(data["samplers"]) == list(SAMPLERS)
    assert data["limits"]["max_images"] == serve_jobs.MAX_IMAGES


def test_a_job_shows_its_progress_and_its_command_writes_the_same_pixels(client, monkeypatch, tmp_path, capsys):
    from lddpm.cli import main

    seen = []
    original = serve_jobs.JobQueue._progress

    def record(self, job, run, state):
        original(self, job, run, state)
        seen.append((job.step, job.steps, job.status, png(job.preview).shape))

    monkeypatch.setattr(serve_jobs, "PREVIEW_SECONDS", 0.0)
    monkeypatch.setattr(serve_jobs.JobQueue, "_progress", record)
    response = client.post("/api/jobs", json={"run": 0, "sampler": "ddim", "steps": 3, "guidance_scale": 2.5,
                                              "seed": 7, "num_images": 5, "class": "pullover"})
    assert response.status_code == 202, response.text
    job = wait(client, response.json()["id"])
    assert job["status"] == "done", job
    # every sampler step reported, each with a preview grid of the current x0 predictions (5 images, 3 a row)
    assert seen == [(i, 3, "running", (38, 56)) for i in (1, 2, 3)]
    assert job["request"]["class"] == 2 and job["request"]["class_name"] == "Pullover"
    grid = client.get(job["grid"])
    assert grid.headers["content-type"] == "image/png"
    pixels = png(grid.content)
    assert pixels.shape == (38, 56) == (job["height"], job["width"])  # 16px images, 2 px padding, ceil(sqrt(5)) a row
    assert job["seconds_per_image"] == pytest.approx(job["seconds"] / 5)
    # the command, run as printed (with another --out), writes the very same PNG bytes
    argv = shlex.split(job["command"])
    assert argv[:3] == ["lddpm", "sample", str(Path(client.jobs.runs[0].path))]
    assert argv[argv.index("--class") + 1] == "2" and argv[argv.index("--guidance-scale") + 1] == "2.5"
    argv[argv.index("--out") + 1] = str(tmp_path / "again.png")
    assert main(argv[1:] + ["--quiet"]) == 0
    assert (tmp_path / "again.png").read_bytes() == grid.content
    # and another seed gives other pixels (the check above could fail)
    other = wait(client, client.post("/api/jobs", json={"run": 0, "steps": 3, "guidance_scale": 2.5, "seed": 8,
                                                        "num_images": 5, "class": 2}).json()["id"])
    assert not np.array_equal(png(client.get(other["grid"]).content), pixels)


def test_the_unconditional_run_and_all_classes_in_turn(client, tmp_path):
    from lddpm.cli import main

    for body in ({"run": 1, "sampler": "dpm++2m", "steps": 2, "num_images": 4},
                 {"run": 0, "sampler": "ddpm", "steps": 2, "num_images": 10, "class": None}):
        job = wait(client, client.post("/api/jobs", json=body).json()["id"])
        assert job["status"] == "done", job
        argv = shlex.split(job["command"])
        assert "--class" not in argv
        argv[argv.index("--out") + 1] = str(tmp_path / "g.png")
        assert main(argv[1:] + ["--quiet"]) == 0
        assert (tmp_path / "g.png").read_bytes() == client.get(job["grid"]).content


BAD = [
    ({"run": 0, "steps": 0}, r"steps = 0 is out of range: expected a whole number between 1 and 1000"),
    ({"run": 0, "steps": 10**9}, r"steps = 1000000000 is out of range"),
    ({"run": 0, "steps": 2.5}, r"steps = 2.5: expected a whole number"),
    ({"run": 0, "steps": "20"}, r"steps = '20': expected a whole number"),
    ({"run": 0, "guidance_scale": -1}, r"guidance_scale = -1 is out of range: expected 0..50"),
    ({"run": 0, "guidance_scale": "strong"}, r"guidance_scale = 'strong': expected a number"),
    ({"run": 0, "guidance_scale": True}, r"guidance_scale = True: expected a number"),
    ({"run": 1, "guidance_scale": 3}, r"run 1 is unconditional, so only 1 \(no guidance\) applies"),
    ({"run": 0, "class": 10}, r"class = 10 is out of range: expected a whole number between 0 and 9"),
    ({"run": 0, "class": -1}, r"class = -1 is out of range"),
    ({"run": 0, "class": "dragon"}, r"class = 'dragon' is not a class of run 0; classes: T-shirt/top, Trouser"),
    ({"run": 1, "class": 0}, r"run 1 is unconditional, it takes no class"),
    ({"run": 0, "num_images": 0}, r"num_images = 0 is out of range: expected a whole number between 1 and 64"),
    ({"run": 0, "num_images": 10**12}, r"num_images = 1000000000000 is out of range"),
    ({"run": 0, "seed": -1}, r"seed = -1 is out of range"),
    ({"run": 0, "seed": 2**70}, r"seed = 1180591620717411303424 is out of range"),
    ({"run": 0, "sampler": "lms"}, r"sampler = 'lms' is not a sampler; choose one of: ddpm, ddim"),
    ({"run": 0, "sampler": ["ddim"]}, r"sampler = \['ddim'\] is not a sampler"),
    ({"run": 0, "class": {"name": 1}}, r"class = \{'name': 1\}: expected a whole number"),
    ({"run": 0, "prompt": ["a"]}, r"prompt = \['a'\]: expected text"),
    ({"run": 0, "prompt": "a cat"}, r"run 0 was not trained on prompts"),
    ({"run": 0, "eta": 1}, r"unknown field 'eta'; the fields are: run, sampler"),
    ({"run": 2}, r"run = 2 is out of range: expected a whole number between 0 and 1 \(the served runs\)"),
    ({"run": -1}, r"run = -1 is out of range"),
    ({"sampler": "ddim"}, r"run is missing: give the index of a served run \(0..1\)"),
    ({"run": "0"}, r"run = '0': a run is named by its index among the served runs \(0..1\), never by a path"),
    ([1, 2], r"the request must be a JSON object"),
]


@pytest.mark.parametrize("body,message", BAD, ids=[m.split(" ")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_each_bad_parameter_is_one_clear_message(client, body, message):
    import re

    response = client.post("/api/jobs", json=body)
    assert response.status_code == 400, response.text
    assert re.search(message, response.json()["error"]), response.json()["error"]
    assert not client.jobs.jobs  # nothing was queued


@pytest.mark.parametrize("raw,message", [
    (b'{"run": 0, "guidance_scale": NaN}', r"guidance_scale = nan: expected a finite number \(not NaN or infinity\)"),
    (b'{"run": 0, "guidance_scale": Infinity}', r"guidance_scale = inf: expected a finite number"),
    (b'{"run": 0, "guidance_scale": -Infinity}', r"guidance_scale = -inf: expected a finite number"),
    (b'{"run": 0, ', r"the request body is not valid JSON"),
    (b'\xff\xfe', r"the request body is not valid JSON"),
])
def test_nan_infinity_and_broken_json_are_refused(client, raw, message):
    import re

    response = client.post("/api/jobs", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and re.search(message, response.json()["error"]), response.text


TRAVERSALS = [
    "/../../../../etc/passwd", "/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/%252e%252e/%252e%252e/etc/passwd",
    "/..%2f..%2f..%2fetc%2fpasswd", "/%2fetc%2fpasswd", "//etc/passwd", "/etc/passwd", "/index.html",
    "/static/index.html", "/static/../../../../etc/passwd", "/api/jobs/1/../../../../etc/passwd",
    "/api/jobs/..%2f..%2f..%2fetc%2fpasswd", "/api/jobs/%2e%2e/grid.png", "/api/jobs/1%2f..%2f..%2fx/grid.png",
    "/api/jobs/-1", "/api/jobs/1.png", "/api/runs/0/../../config.json", "/api/runs/0", "/api/runs/..%2f..",
    "/api/jobs/99999/grid.png", "/api/jobs/0/preview.png", "/serve.py", "/app.py", "/__init__.py",
]


def test_no_request_reads_a_file_or_another_path(client, run_dirs, monkeypatch):
    real_open = builtins.open
    opened = []

    def watching_open(file, *args, **kwargs):  # the server reads no file once it is running
        if threading.current_thread() is not threading.main_thread():
            opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", watching_open)
    for path in TRAVERSALS + [str(run_dirs[0] / "config.json"), str(run_dirs[0] / "checkpoints")]:
        response = client.get(path)
        assert response.status_code == 404, (path, response.status_code)
        assert "root:" not in response.text and "[model]" not in response.text and "safetensors" not in response.text
        assert response.json()["error"].startswith(("not found", "no job"))
    for run in (str(run_dirs[0]), str(run_dirs[0] / "checkpoints" / "step_0000002.safetensors"), "../cond",
                "/etc/passwd", "%2e%2e%2fcond", "file:///etc/passwd"):
        response = client.post("/api/jobs", json={"run": run})
        assert response.status_code == 400 and "never by a path" in response.json()["error"]
    for method in ("put", "delete", "patch"):
        assert getattr(client, method)("/api/jobs").status_code == 405
    assert opened == []


def test_the_page_is_read_only_from_the_package_folder_never_through_a_symlink(tmp_path, runs):
    (tmp_path / "real.html").write_text("<p>elsewhere</p>")
    (tmp_path / "index.html").symlink_to(tmp_path / "real.html")
    with pytest.raises(LddpmError, match=r"index.html is not a plain file inside"):
        create_app(runs, static_dir=tmp_path, jobs=object())
    with pytest.raises(LddpmError, match=r"'../index.html' is not one of the page's files"):
        serve_app.read_static("../index.html")
    with pytest.raises(LddpmError, match=r"'/etc/passwd' is not one of the page's files"):
        serve_app.read_static("/etc/passwd")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "index.html").write_text("<p>page</p>")
    (linked / "passwd").symlink_to("/etc/passwd")  # a link planted beside the page is never served
    app = create_app(runs, static_dir=linked, allowed_hosts=LOOPBACK)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        assert c.get("/").text == "<p>page</p>"
        assert c.get("/passwd").status_code == 404 and c.get("/static/passwd").status_code == 404
    app.state.jobs.stop()


def test_host_header_content_type_and_body_size_are_checked(client):
    assert client.get("/api/runs", headers={"host": "evil.example"}).status_code == 400  # DNS rebinding
    assert client.get("/api/runs", headers={"host": "localhost:8000"}).status_code == 200
    response = client.post("/api/jobs", content=b'{"run": 0}', headers={"content-type": "text/plain"})
    assert response.status_code == 415 and "Content-Type: application/json" in response.json()["error"]
    response = client.post("/api/jobs", content=b" " * 20000 + b'{"run": 0}', headers={"content-type": "application/json"})
    assert response.status_code == 413 and "at most 16384" in response.json()["error"]


def test_requests_queue_one_worker_answers_all_and_a_full_queue_says_so(client, monkeypatch):
    from lddpm.pipeline import Pipeline

    gate, lock = threading.Event(), threading.Lock()
    original = Pipeline.generate
    order, active, most = [], [0], [0]

    def held(self, *args, **kwargs):  # the first job waits for the gate; count how many generate at once
        with lock:
            order.append(kwargs["seed"])
            active[0] += 1
            most[0] = max(most[0], active[0])
        gate.wait(30)
        try:
            return original(self, *args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(Pipeline, "generate", held)
    monkeypatch.setattr(serve_jobs, "MAX_PENDING", 3)
    body = {"run": 0, "steps": 1, "num_images": 1}
    first = client.post("/api/jobs", json=dict(body, seed=100)).json()
    deadline = time.monotonic() + 10
    while client.get(f"/api/jobs/{first['id']}").json()["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.01)
    queued = [client.post("/api/jobs", json=dict(body, seed=i)).json() for i in range(3)]
    assert [client.get(f"/api/jobs/{q['id']}").json()["position"] for q in queued] == [1, 2, 3]
    full = client.post("/api/jobs", json=body)
    assert full.status_code == 503 and "3 requests are already waiting; try again" in full.json()["error"]
    gate.set()
    finished = [wait(client, j["id"]) for j in [first, *queued]]
    assert [j["status"] for j in finished] == ["done"] * 4
    assert order == [100, 0, 1, 2] and most[0] == 1  # in arrival order, one at a time
    assert [j["id"] for j in client.get("/api/jobs").json()["jobs"]] == [j["id"] for j in reversed(finished)]


def test_the_gallery_keeps_the_newest_grids(client, monkeypatch):
    monkeypatch.setattr(serve_jobs, "MAX_KEPT_RESULTS", 2)
    ids = [wait(client, client.post("/api/jobs", json={"run": 1, "steps": 1, "num_images": 1, "seed": s}).json()["id"])["id"]
           for s in range(3)]
    assert [j["id"] for j in client.get("/api/jobs").json()["jobs"]] == ids[:0:-1]
    dropped = client.get(f"/api/jobs/{ids[0]}/grid.png")
    assert dropped.status_code == 404 and "dropped from the gallery" in dropped.json()["error"]


def test_a_failing_job_is_reported_and_the_worker_goes_on(client, monkeypatch):
    from lddpm.pipeline import Pipeline

    original = Pipeline.generate

    def broken(self, *args, **kwargs):
        if kwargs.get("seed") == 13:
            raise RuntimeError("a bug in a sampler")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "generate", broken)
    bad = wait(client, client.post("/api/jobs", json={"run": 1, "steps": 1, "num_images": 1, "seed": 13}).json()["id"])
    assert bad["status"] == "failed" and bad["error"] == "generation failed: a bug in a sampler"
    good = wait(client, client.post("/api/jobs", json={"run": 1, "steps": 1, "num_images": 1, "seed": 1}).json()["id"])
    assert good["status"] == "done"


def test_the_command_prints_its_address_and_warns_off_loopback(run_dirs, monkeypatch, capsys):
    from lddpm.cli import main

    served = []

    def serve_forever(app, sock):  # instead of serving until Ctrl-C: note the socket, close it
        served.append(sock.getsockname()[:2])
        app.state.jobs.stop()
        sock.close()

    monkeypatch.setattr("lddpm.serve.serve_forever", serve_forever)
    assert main(["serve", str(run_dirs[0]), str(run_dirs[1]), "--port", "0", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    host, port = served[0]
    assert host == "127.0.0.1" and out.startswith(f"lddpm serve: http://127.0.0.1:{port}/") and not err
    assert "0: cond (class), 1: uncond (unconditional)" in out
    assert main(["serve", str(run_dirs[0]), "--port", "0", "--host", "0.0.0.0"]) == 0
    out, err = capsys.readouterr()
    assert served[1][0] == "0.0.0.0" and err.startswith("warning: listening on 0.0.0.0: anyone who can reach")


def test_without_the_serve_extra_the_command_says_how_to_install_it(run_dirs, monkeypatch, capsys):
    import sys

    from lddpm.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` now raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(run_dirs[0]), "--port", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == ("lddpm serve: error: lddpm serve needs the serve extra (starlette and "
                                               "uvicorn): pip install 'lddpm[serve]' (make setup installs it)")


@pytest.mark.slow
def test_a_text_run_takes_a_prompt_and_a_negative_prompt(tmp_path):
    """A tiny text run (frozen MiniLM): the page's prompt fields, and the command with --prompt repeats the grid."""
    pytest.importorskip("transformers")
    from helpers import tiny_text_config, write_captioned_squares
    from lddpm.cli import main
    from lddpm.train import train

    captioned = write_captioned_squares(tmp_path, 8, jitter=False)
    train(tiny_text_config(captioned, "minilm", 8, 1), tmp_path / "run", progress=False)
    app = create_app(load_runs([str(tmp_path / "run")]), allowed_hosts=LOOPBACK)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        run = c.get("/api/runs").json()["runs"][0]
        assert run["kind"] == "text" and run["classes"] == []
        assert "write one" in c.post("/api/jobs", json={"run": 0}).json()["error"]
        assert "takes no class" in c.post("/api/jobs", json={"run": 0, "prompt": "a", "class": 0}).json()["error"]
        body = {"run": 0, "steps": 2, "num_images": 3, "prompt": "a bright square", "negative_prompt": "a dark square",
                "guidance_scale": 3}
        job = wait(c, c.post("/api/jobs", json=body).json()["id"])
        assert job["status"] == "done" and "--negative-prompt 'a dark square'" in job["command"]
        argv = shlex.split(job["command"])
        argv[argv.index("--out") + 1] = str(tmp_path / "again.png")
        assert main(argv[1:] + ["--quiet"]) == 0
        assert (tmp_path / "again.png").read_bytes() == c.get(job["grid"]).content
        long = wait(c, c.post("/api/jobs", json={"run": 0, "prompt": "a very long prompt " * 10}).json()["id"])
        assert long["status"] == "failed" and "more than the text encoder's max_length 8" in long["error"]
    app.state.jobs.stop()
