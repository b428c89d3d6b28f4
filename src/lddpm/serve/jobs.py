"""The served runs, the checks of every request, and the one worker that generates (`lddpm serve`).

A request names a run by its index in the list the server was started with, never by a path, and
every parameter is checked here before it is queued: one clear message per mistake. Jobs run one
at a time in one worker thread (`JobQueue`), through `Pipeline.generate`; the grid is the one
`lddpm sample` writes for the same arguments, and each job carries that command.
"""

from __future__ import annotations

import io
import math
import queue
import shlex
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lddpm.errors import LddpmError
from lddpm.grid import make_grid, prompt_grid
from lddpm.pipeline import Pipeline, load_pipeline, to_uint8
from lddpm.sampling import SAMPLERS

MAX_IMAGES = 64  # per request: one batch of `lddpm sample`'s default --batch-size, so the command repeats its pixels
BATCH_SIZE = 64  # the batch size of `lddpm sample` (its default)
MAX_GUIDANCE = 50.0  # guidance scales used in practice are 1..15; beyond 50 is a typo
MAX_SEED = 2**31 - 1
MAX_PROMPT_CHARS = 500
MAX_PENDING = 200  # queued jobs; one more is refused with a clear message (the queue is full, try later)
MAX_KEPT_RESULTS = 100  # grids kept in memory for the gallery; older ones are dropped
PREVIEW_SECONDS = 0.3  # at most one preview image per this many seconds
FIELDS = ("run", "sampler", "steps", "guidance_scale", "seed", "num_images", "class", "prompt", "negative_prompt")


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 image (H, W[, C]) as PNG bytes, encoded as lddpm.io.write_png encodes it."""
    from PIL import Image

    image = np.ascontiguousarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class ServedRun:
    """One run given to `lddpm serve`: its pipeline and what the page shows of it."""

    def __init__(self, index: int, path: str | Path, pipeline: Pipeline, *, device_flag: str | None = None,
                 bf16_flag: str | None = None):
        self.index, self.path, self.pipeline = index, Path(path).resolve(), pipeline
        self.given = str(path)  # as the user wrote it: the reproducing command runs from the same folder
        self.device_flag, self.bf16_flag = device_flag, bf16_flag  # repeated in the command when not the default

    @property
    def kind(self) -> str:
        """"text" (prompts), "class" (class labels) or "unconditional"."""
        if self.pipeline.context_dim:
            return "text"
        return "class" if self.pipeline.num_classes else "unconditional"

    @property
    def num_timesteps(self) -> int:
        return int(self.pipeline.diffusion.num_timesteps)

    def describe(self) -> dict[str, Any]:
        """The page's view of the run (its path is shown, never used to address it)."""
        p = self.pipeline
        classes = list(p.class_names) or [str(i) for i in range(p.num_classes)]
        return {"id": self.index, "name": self.path.name, "path": str(self.path), "kind": self.kind,
                "classes": classes if self.kind == "class" else [], "dataset": p.dataset, "resolution": p.resolution,
                "channels": p.channels, "step": p.step, "num_timesteps": self.num_timesteps,
                "latent": p.vae is not None, "default_sampler": (p.config.run.sampler if p.config else "ddim"),
                "default_guidance_scale": (p.config.run.guidance_scale if p.config else 1.0)}


def load_runs(paths: list[str], device: str = "cpu", bf16: bool | str = False, *, device_flag: str | None = None,
              bf16_flag: str | None = None) -> list[ServedRun]:
    """Load every run once, before the server starts: a run that cannot be loaded is refused at once."""
    if not paths:
        raise LddpmError("give at least one RUN (a diffusion run folder or checkpoint)")
    runs = []
    for i, path in enumerate(paths):
        pipeline = load_pipeline(path, device=device, bf16=bf16)
        runs.append(ServedRun(i, path, pipeline, device_flag=device_flag, bf16_flag=bf16_flag))
    return runs


# ----------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class JobRequest:
    """A checked request: everything `Pipeline.generate` and the `lddpm sample` command need."""

    run: int
    sampler: str
    steps: int
    guidance_scale: float
    seed: int
    num_images: int
    class_index: int | None = None
    prompt: str | None = None
    negative_prompt: str | None = None

    def to_dict(self, runs: list[ServedRun]) -> dict[str, Any]:
        """The request as the page shows it (the class by name too)."""
        run = runs[self.run]
        names = run.describe()["classes"]
        return {"run": self.run, "run_name": run.path.name, "sampler": self.sampler, "steps": self.steps,
                "guidance_scale": self.guidance_scale, "seed": self.seed, "num_images": self.num_images,
                "class": self.class_index,
                "class_name": names[self.class_index] if self.class_index is not None else None,
                "prompt": self.prompt, "negative_prompt": self.negative_prompt}


def _int(name: str, value: Any, low: int, high: int, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer() and low <= value <= high:
            return int(value)  # 20.0 from a JSON encoder is 20
        raise LddpmError(f"{name} = {value!r}: expected a whole number between {low} and {high}{why}")
    if not low <= value <= high:
        raise LddpmError(f"{name} = {value} is out of range: expected a whole number between {low} and {high}{why}")
    return value


def _text(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise LddpmError(f"{name} = {value!r}: expected text")
    if len(value) > MAX_PROMPT_CHARS:
        raise LddpmError(f"{name} is {len(value)} characters long: at most {MAX_PROMPT_CHARS}")
    if any(ord(c) < 32 and c not in "\t" for c in value):
        raise LddpmError(f"{name} contains control characters (a line break?): write it on one line")
    return value


def check_request(body: Any, runs: list[ServedRun]) -> JobRequest:
    """A request body (JSON object) checked field by field; LddpmError names the first bad field and the fix."""
    if not isinstance(body, dict):
        raise LddpmError("the request must be a JSON object with the fields " + ", ".join(FIELDS))
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise LddpmError(f"unknown field {unknown[0]!r}; the fields are: {', '.join(FIELDS)}")
    if "run" not in body:
        raise LddpmError(f"run is missing: give the index of a served run (0..{len(runs) - 1})")
    raw_run = body["run"]
    if isinstance(raw_run, bool) or not isinstance(raw_run, int):
        raise LddpmError(f"run = {raw_run!r}: a run is named by its index among the served runs (0..{len(runs) - 1}), "
                         "never by a path")
    index = _int("run", raw_run, 0, len(runs) - 1, " (the served runs)")
    run = runs[index]
    sampler = body.get("sampler", "ddim")
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise LddpmError(f"sampler = {sampler!r} is not a sampler; choose one of: {', '.join(SAMPLERS)}")
    T = run.num_timesteps
    default_steps = SAMPLERS[sampler].default_steps or T
    steps = _int("steps", body.get("steps", min(default_steps, T)), 1, T, f" (this run has T = {T} timesteps)")
    guidance = body.get("guidance_scale", 1.0)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise LddpmError(f"guidance_scale = {guidance!r}: expected a number (1 = no guidance)")
    if not math.isfinite(guidance):
        raise LddpmError(f"guidance_scale = {guidance}: expected a finite number (not NaN or infinity)")
    if not 0.0 <= guidance <= MAX_GUIDANCE:
        raise LddpmError(f"guidance_scale = {guidance} is out of range: expected 0..{MAX_GUIDANCE:g} (1 = no guidance)")
    guidance = float(guidance)
    if run.kind == "unconditional" and guidance != 1.0:
        raise LddpmError(f"guidance_scale = {guidance:g}: run {index} is unconditional, so only 1 (no guidance) applies")
    seed = _int("seed", body.get("seed", 0), 0, MAX_SEED)
    num = _int("num_images", body.get("num_images", 16), 1, MAX_IMAGES, " per request")
    class_index = body.get("class")
    if class_index is not None:
        if run.kind != "class":
            raise LddpmError(f"class = {class_index!r}: run {index} is {run.kind}, it takes no class "
                             f"({'give a prompt' if run.kind == 'text' else 'leave class empty'})")
        names = run.describe()["classes"]
        if isinstance(class_index, str):
            lowered = [n.lower() for n in names]
            if class_index.lower() not in lowered:
                raise LddpmError(f"class = {class_index!r} is not a class of run {index}; classes: {', '.join(names)}")
            class_index = lowered.index(class_index.lower())
        class_index = _int("class", class_index, 0, len(names) - 1, f" (run {index} has {len(names)} classes)")
    prompt, negative = _text("prompt", body.get("prompt")), _text("negative_prompt", body.get("negative_prompt"))
    if run.kind == "text":
        if prompt is None or not prompt.strip():
            raise LddpmError(f"run {index} draws from a prompt: write one (prompt = what to draw)")
        negative = negative if negative else None  # "" means none: the null prompt of guidance
    elif prompt or negative:
        raise LddpmError(f"run {index} was not trained on prompts: leave prompt and negative_prompt empty")
    else:
        prompt = negative = None
    return JobRequest(index, sampler, steps, guidance, seed, num, class_index, prompt, negative)


def reproduce_command(request: JobRequest, run: ServedRun, out: str = "grid.png") -> str:
    """The `lddpm sample` command that writes the same grid (same pixels) as the job."""
    args = ["lddpm", "sample", run.given, "--sampler", request.sampler, "--steps", str(request.steps),
            "--guidance-scale", f"{request.guidance_scale:g}", "--seed", str(request.seed),
            "--num", str(request.num_images)]
    if request.class_index is not None:
        args += ["--class", str(request.class_index)]
    if request.prompt is not None:
        args += ["--prompt", request.prompt]
        if request.negative_prompt:
            args += ["--negative-prompt", request.negative_prompt]
    else:
        args += ["--nrow", str(grid_columns(request.num_images))]
    if run.device_flag:
        args += ["--device", run.device_flag]
    if run.bf16_flag:
        args += ["--bf16", run.bf16_flag]
    args += ["--out", out]
    return shlex.join(args)


def grid_columns(num: int) -> int:
    """Images per grid row: the square grid of `lddpm sample` (ceil(sqrt(n)))."""
    return int(math.ceil(math.sqrt(num)))


def grid_image(images: np.ndarray, request: JobRequest) -> np.ndarray:
    """The grid `lddpm sample` writes: rows labelled with the prompt for text runs, else a plain square grid."""
    if request.prompt is not None:
        return prompt_grid(images, [request.prompt] * len(images), per_prompt=request.num_images)
    return make_grid(images, grid_columns(len(images)))


# ----------------------------------------------------------------------------- jobs


@dataclass
class Job:
    """One request and what became of it."""

    id: int
    request: JobRequest
    status: str = "queued"  # queued -> running -> done | failed
    created: float = field(default_factory=time.time)
    step: int = 0
    steps: int = 0
    error: str | None = None
    grid: bytes | None = None
    preview: bytes | None = None
    size: tuple[int, int] | None = None  # the grid's (width, height)
    seconds: float | None = None
    command: str = ""
    last_preview: float = 0.0


class JobQueue:
    """Requests in arrival order, generated one at a time by one worker thread."""

    def __init__(self, runs: list[ServedRun]):
        self.runs = runs
        self.jobs: dict[int, Job] = {}
        self.order: list[int] = []  # every job id, oldest first
        self.pending: queue.Queue[Job | None] = queue.Queue()
        self.lock = threading.Lock()
        self.next_id = 1
        self.worker = threading.Thread(target=self._work, name="lddpm-serve-worker", daemon=True)
        self.worker.start()

    def submit(self, request: JobRequest) -> Job:
        """Queue a checked request; a full queue is refused (LddpmError) rather than held without bound."""
        with self.lock:
            waiting = sum(1 for j in self.jobs.values() if j.status == "queued")
            if waiting >= MAX_PENDING:
                raise LddpmError(f"{waiting} requests are already waiting; try again when some have finished")
            job = Job(self.next_id, request, steps=request.steps,
                      command=reproduce_command(request, self.runs[request.run]))
            self.next_id += 1
            self.jobs[job.id] = job
            self.order.append(job.id)
        self.pending.put(job)
        return job

    def position(self, job: Job) -> int:
        """Jobs ahead of a queued one (0 for the next); 0 once it runs."""
        if job.status != "queued":
            return 0
        with self.lock:
            return sum(1 for i in self.order if i < job.id and self.jobs[i].status in ("queued", "running"))

    def stop(self) -> None:
        """Let the worker end after the job it is running."""
        self.pending.put(None)

    def _work(self) -> None:
        while True:
            job = self.pending.get()
            if job is None:
                return
            self._run(job)

    def _run(self, job: Job) -> None:
        request, run = job.request, self.runs[job.request.run]
        job.status = "running"
        start = time.perf_counter()
        try:
            images, _ = run.pipeline.generate(
                request.num_images, sampler=request.sampler, num_steps=request.steps,
                guidance_scale=request.guidance_scale, labels=request.class_index, seed=request.seed,
                batch_size=BATCH_SIZE, progress=lambda state: self._progress(job, run, state),
                prompts=[request.prompt] * request.num_images if request.prompt is not None else None,
                negative_prompt=request.negative_prompt)
            grid = grid_image(images, request)
            job.seconds = time.perf_counter() - start
            job.grid, job.size, job.preview = png_bytes(grid), (int(grid.shape[1]), int(grid.shape[0])), None
            job.step = job.steps
            job.status = "done"
        except LddpmError as exc:  # e.g. a prompt longer than the text encoder takes
            job.error, job.status = str(exc), "failed"
        except Exception as exc:  # noqa: BLE001  the worker must outlive any one job; the traceback goes to stderr
            traceback.print_exc()
            message = " ".join(str(exc).split())[:300] or type(exc).__name__
            job.error, job.status = f"generation failed: {message}", "failed"
        if job.status == "failed":
            job.preview = None
        self._forget_old_grids()

    def _progress(self, job: Job, run: ServedRun, state: dict[str, Any]) -> None:
        """Each sampler step: the step count, and now and then a preview grid of the current x0 predictions."""
        job.step, job.steps = int(state["i"]) + 1, int(state["total"])
        now = time.perf_counter()
        if now - job.last_preview < PREVIEW_SECONDS and job.step < job.steps:
            return
        job.last_preview = now
        x0 = state["denoised"].detach().float()
        vae = run.pipeline.vae
        if vae is not None:
            x0 = vae.decode(x0 / vae.scaling_factor)
        job.preview = png_bytes(make_grid(to_uint8(x0), grid_columns(len(x0))))

    def _forget_old_grids(self) -> None:
        """Keep the grids of the newest MAX_KEPT_RESULTS finished jobs (the gallery); drop older ones."""
        with self.lock:
            finished = [i for i in self.order if self.jobs[i].grid is not None]
            for i in finished[:-MAX_KEPT_RESULTS]:
                self.jobs[i].grid = None

    def view(self, job: Job) -> dict[str, Any]:
        """A job as the API returns it."""
        data = {"id": job.id, "status": job.status, "position": self.position(job), "step": job.step,
                "steps": job.steps, "request": job.request.to_dict(self.runs), "command": job.command,
                "error": job.error, "preview": f"/api/jobs/{job.id}/preview.png" if job.preview is not None else None}
        if job.status == "done":
            data.update({"grid": f"/api/jobs/{job.id}/grid.png" if job.grid is not None else None,
                         "width": job.size[0], "height": job.size[1], "seconds": job.seconds,
                         "seconds_per_image": job.seconds / job.request.num_images})
        return data

    def gallery(self) -> list[dict[str, Any]]:
        """Finished jobs whose grids are kept, newest first."""
        with self.lock:
            done = [self.jobs[i] for i in reversed(self.order) if self.jobs[i].grid is not None]
        return [self.view(job) for job in done]
