"""The study file's schema: settings, runs, cells, their parsing and validation, and the row fields.

The study: a grid of training runs and evaluation cells -> one folder with table, plots, grids.

A study file (TOML) has three parts:

    [study]            shared settings: dataset, resolution, N for FID, reference split, seed, ...
    [runs.<name>]      training runs: a trainer config (file or preset) + `set` overrides + steps
    [[cells]]          evaluation cells: run, sampler, steps, eta, guidance scale, labels (class runs) or
                       prompts + negative_prompt (text runs); autoguidance (guide + guide_scale) and the
                       guidance interval (guidance_interval = [sigma_lo, sigma_hi])

A cell's `run`, `sampler`, `steps`, `guidance_scale`, `guide_scale`, `eta`, `at_step` and sampler options (`grid`,
`sigma_min`, `eps_scaling`, `s_churn`, ...: `lddpm.solvers.SamplerOptions`, docs/samplers.md) may be lists (and
`guidance_interval` a list of pairs); the cell is then expanded into one cell per combination and its `name` is a
template (`"ddim-{steps}"`, `"cfg-s{guidance_scale:g}"`).

`run_study` is resumable: each finished cell is stored atomically in `cells/<name>.json` and
skipped on the next run; a training run is reused when its final checkpoint exists (and resumed
from its last checkpoint otherwise). A cell that raises is recorded as `failed: <message>` and the
rest of the grid goes on. How a run is trained and a cell is scored is injectable (`train_fn`,
`cell_fn`), so the runner and the report are testable with toy functions.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lddpm import checks
from lddpm.config import read_toml
from lddpm.distributed import check_bf16
from lddpm.errors import LddpmError
from lddpm.metrics.onnx_backend import FEATURE_BACKENDS
from lddpm.sampling import SAMPLERS, check_sampler_options
from lddpm.solvers import SamplerOptions

CELL_KINDS = ("sample", "vae")
RUN_KINDS = ("diffusion", "vae")
LABEL_MODES = ("balanced", "none")
REAL_FLOOR_FILE = "real_floor.json"
TIMING_FILE = "timing.json"  # each session of a study (a resumed study has several): start, end, seconds
PLOT_GROUPS = ("samplers", "guidance", "schedules", "vae", "architecture", "training", "other")
PROMPTS_FOLDER = "prompts"  # built-in prompt sets are written here, in the study's output folder
PROMPT_SET_SEED = 0  # a built-in spec names its file completely: the same prompts in every study

# One row of the results table: these keys, in this order, in results.json/csv.
ROW_FIELDS = (
    "name", "status", "run", "model", "data", "sampler", "steps", "eta", "guidance_scale",
    "schedule", "fid", "fid_n", "kid", "kid_std", "classifier_score", "class_accuracy", "precision", "recall",
    "seconds_per_image", "model_evals", "train_images", "train_seconds", "group",
)
# Row fields of text cells: their prompt set, and when its records describe benchmark scenes the checker's
# scores (lddpm.metrics.faithfulness). Rows of other cells do not carry them, so their results.csv/json and
# tables are unchanged; results.csv lists them after ROW_FIELDS when some row has them.
# Row fields of autoguided cells and cells with a guidance interval (absent from other rows, as the text fields).
GUIDANCE_ROW_FIELDS = ("guide", "guide_scale", "guidance_interval")
TEXT_ROW_FIELDS = (
    "prompts", "negative_prompt", "faithfulness_metric", "faithfulness", "faithfulness_ceiling",
    "faithfulness_of_ceiling", "faithfulness_seen", "faithfulness_heldout", "slot_accuracy", "swap_rate",
)
# The headline faithfulness metric of each scene set (GenEval's rule: an image counts only if every clause holds).
FAITHFULNESS_METRIC = {"fashion-pairs": "pair_accuracy", "fashion-text": "all_accuracy"}


@dataclass
class StudySettings:
    """Settings shared by every run and cell of a study."""

    name: str = "study"
    dataset: str = "fashion-mnist"
    resolution: int = 32
    fid_n: int = 500  # images per cell for FID / KID / classifier score / precision-recall: one N for every cell
    reference_split: str = "test"  # FID reference statistics come from this split
    reference_n: int = 0  # images of that split in the reference statistics (0 = all)
    seed: int = 0
    fid_batch_size: int = 50
    sample_batch_size: int = 64
    grid_per_class: int = 8  # grid columns when the samples have labels (one row per class)
    grid_size: int = 64  # images in the grid of an unlabelled cell
    grid_prompts: int = 16  # rows of a text cell's grid: its first K distinct prompts (grid_per_class images each)
    classifier: str = ""  # classifier folder (class accuracy, classifier score); empty: the shared default (trained when missing)
    classifier_epochs: float = 2.0  # training length of that classifier when it is trained here
    device: str = "auto"  # "auto" (cuda when available), "cpu" or "cuda"
    train_nproc: int = 1  # processes per training run (> 1: `lddpm train --nproc N`, torchrun + DDP)
    data_root: str | None = None
    cache_dir: str | None = None
    feature_backend: str = "auto"  # Inception features through "torch", "onnx" (ONNX Runtime) or "auto"
    bf16: bool | str = False  # sampling: the network under bf16 autocast (true, false, "auto": native bf16 only)


@dataclass
class RunSpec:
    """One training run: a trainer config plus overrides."""

    name: str
    config: str  # trainer config: a TOML file (relative to the study file) or a preset name
    kind: str = "diffusion"  # "diffusion" or "vae"
    steps: int | None = None  # total training steps (overrides the config's)
    set: list[str] = field(default_factory=list)  # `--set key=value` overrides
    vae: str | None = None  # name of the VAE run whose latents a latent-diffusion run trains on


@dataclass
class CellSpec:
    """One evaluation cell: a run scored with one sampler setting."""

    name: str
    run: str
    kind: str = "sample"  # "sample": generate and score; "vae": reconstruct the reference split
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 1.0
    labels: str = "balanced"  # "balanced": equal images per class (conditional runs); "none"
    group: str = ""  # which plot the cell belongs to; inferred when empty
    fid_n: int | None = None  # must equal the study's N when given (FIDs are comparable only at equal N)
    at_step: int | None = None  # score the run's checkpoint at this training step (default: its final one)
    # Text runs: the prompt set sampled (cycled to N), a JSONL file relative to the study file, or a built-in
    # scene set "fashion-pairs:N" / "fashion-text:N[:both|seen|only]" (held-out prompts: half, none, only them)
    prompts: str = ""
    negative_prompt: str | None = None  # replaces the null prompt "" of guidance
    # Autoguidance (Karras et al. 2024): the guide network, a run of this study (its [runs] name) or a run folder /
    # checkpoint file (relative to the study file), trained with the cell's run's diffusion, data and conditioning
    guide: str = ""
    guide_scale: float = 1.0  # w in D_guide + w (D_main - D_guide); 1 = none
    guidance_interval: list[float] | None = None  # [sigma_lo, sigma_hi]: guidance only there (Kynkaanniemi et al. 2024)
    # Sampler options set in the cell's table under SamplerOptions' names (grid, sigma_min, eps_scaling, s_churn, order,
    # ...; lddpm.solvers, docs/samplers.md); unset: the sampler's own defaults
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def guided(self) -> bool:
        """Whether the cell uses autoguidance or a guidance interval (its row carries GUIDANCE_ROW_FIELDS)."""
        return bool(self.guide) or self.guide_scale != 1.0 or self.guidance_interval is not None

    def sampler_options(self) -> dict[str, Any]:
        """The sampler options this cell sets (SamplerOptions' names), as `sampler_options` for lddpm.evaluate."""
        return {k: v for k, v in self.options.items() if v is not None}


@dataclass(frozen=True)
class PromptSpec:
    """A cell's `prompts`: a built-in scene prompt set (`scene_set`, `num`, `heldout`) or a file (`path`)."""

    text: str  # as the study file says
    scene_set: str | None = None
    num: int = 0
    heldout: str = "both"
    path: Path | None = None

    @property
    def file_name(self) -> str:
        """The built-in set's file in the study folder's prompts/."""
        return f"{self.scene_set}-{self.num}-{self.heldout}.jsonl"


@dataclass
class Study:
    """A parsed study file."""

    settings: StudySettings
    runs: dict[str, RunSpec]
    cells: list[CellSpec]
    base_dir: Path = Path(".")  # folder of the study file; trainer config paths are relative to it

    def fid_n(self, cell: CellSpec) -> int:
        """N for this cell's FID."""
        return cell.fid_n or self.settings.fid_n

    def prompt_spec(self, cell: CellSpec) -> PromptSpec | None:
        """The cell's prompt set, parsed (None for a cell without prompts)."""
        return parse_prompts(cell.prompts, self.base_dir, f"cell {cell.name!r}") if cell.prompts else None


# ----------------------------------------------------------------------------- loading


def _from_dict(cls, data: dict, where: str, **extra):
    """Build dataclass `cls` from a TOML table, naming unknown keys in the error (a cell's sampler options, under
    SamplerOptions' names, go to its `options`)."""
    allowed = {f.name for f in fields(cls)}
    if cls is CellSpec:
        names = SamplerOptions.names()
        allowed = (allowed - {"options"}) | set(names)
        extra = {**extra, "options": {k: data[k] for k in names if k in data}}
        data = {k: v for k, v in data.items() if k not in names}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise LddpmError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed - set(extra))}")
    return cls(**data, **extra)


def _expand_cell(raw: dict, index: int) -> list[CellSpec]:
    """Expand list-valued run/sampler/steps/guidance_scale/eta/at_step into one cell per combination."""
    if "name" not in raw or "run" not in raw:
        raise LddpmError(f"cells[{index}]: every cell needs `name` and `run` (got keys {sorted(raw)})")
    axes = {k: raw[k] for k in ("run", "sampler", "steps", "guidance_scale", "guide_scale", "eta", "at_step",
                                *SamplerOptions.names())
            if isinstance(raw.get(k), list)}
    interval = raw.get("guidance_interval")
    if isinstance(interval, list) and interval and all(isinstance(v, list) for v in interval):
        axes["guidance_interval"] = interval  # a list of [sigma_lo, sigma_hi] pairs
    if not axes:
        return [_from_dict(CellSpec, raw, f"cells[{index}]")]
    cells = []
    for combo in itertools.product(*axes.values()):
        item = dict(raw, **dict(zip(axes, combo)))
        try:
            item["name"] = raw["name"].format(**item)
        except (KeyError, ValueError) as exc:
            raise LddpmError(f"cells[{index}]: bad name template {raw['name']!r}: {exc}") from None
        cells.append(_from_dict(CellSpec, item, f"cells[{index}]"))
    if len({c.name for c in cells}) < len(cells):
        raise LddpmError(f"cells[{index}]: name template {raw['name']!r} must mention every list-valued key {list(axes)}")
    return cells


def parse_prompts(text: str, base_dir: Path, where: str) -> PromptSpec:
    """A cell's `prompts` value: "fashion-pairs:N", "fashion-text:N[:both|seen|only]" or a file path."""
    from lddpm.data.scenes import HELDOUT_CHOICES, SCENE_SETS

    usage = (f'a JSONL prompt file (relative to the study file) or a built-in set "{SCENE_SETS[1]}:N" / '
             f'"{SCENE_SETS[0]}:N[:{"|".join(HELDOUT_CHOICES)}]"')
    if not isinstance(text, str) or not text.strip():
        raise LddpmError(f"{where}: prompts must be {usage}; got {text!r}")
    head, *rest = text.split(":")
    if head in SCENE_SETS:
        if not rest or len(rest) > 2:
            raise LddpmError(f"{where}: prompts = {text!r} needs a number of prompts, e.g. \"{head}:200\"; "
                             f"it must be {usage}")
        try:
            num = int(rest[0])
        except ValueError:
            num = 0
        if num < 1:
            raise LddpmError(f"{where}: prompts = {text!r}: the number of prompts must be an integer >= 1")
        heldout = rest[1] if len(rest) == 2 else "both"
        if heldout not in HELDOUT_CHOICES:
            raise LddpmError(f"{where}: prompts = {text!r}: the held-out part {heldout!r} is not one of "
                             f"{HELDOUT_CHOICES} (half held-out prompts, none, only held-out ones)")
        return PromptSpec(text, scene_set=head, num=num, heldout=heldout)
    path = Path(text) if Path(text).is_absolute() else base_dir / text
    if not path.is_file():
        raise LddpmError(f"{where}: prompts file {text!r} not found (looked for {path}); it must be {usage}")
    return PromptSpec(text, path=path)


def _check_prompt_keys(cell: CellSpec, study: Study) -> None:
    """The text keys of one cell: a valid prompt set, a string negative prompt, only on sample cells."""
    where = f"cell {cell.name!r}"
    if cell.negative_prompt is not None:
        if not isinstance(cell.negative_prompt, str):
            raise LddpmError(f"{where}: negative_prompt must be a string, got {cell.negative_prompt!r}")
        if not cell.prompts:
            raise LddpmError(f"{where}: negative_prompt needs a prompt set; give the cell `prompts` (text runs only)")
    if not cell.prompts:
        return
    if cell.kind != "sample":
        raise LddpmError(f'{where}: prompts apply to sample cells only, not kind = "{cell.kind}"')
    if cell.labels != "balanced":
        raise LddpmError(f"{where}: labels = {cell.labels!r} is for class runs; a cell with prompts samples its "
                         "prompt set (remove `labels`)")
    study.prompt_spec(cell)


def _infer_group(cell: CellSpec) -> str:
    """The plot a cell belongs to, when the study file does not say (autoguided or interval cells: no plot)."""
    if cell.kind == "vae":
        return "vae"
    if cell.guided:
        return "other"
    return "samplers" if cell.guidance_scale == 1.0 else "guidance"


def _check_guidance_keys(cell: CellSpec, study: Study) -> None:
    """Autoguidance and interval keys of one cell: a known guide with a scale (and a scale with a guide), a valid
    interval, only on sample cells."""
    from lddpm.guidance import check_interval

    where = f"cell {cell.name!r}"
    checks.finite_number(f"{where}: guide_scale", cell.guide_scale)
    if cell.guided and cell.kind != "sample":
        raise LddpmError(f'{where}: guide / guide_scale / guidance_interval apply to sample cells only, not kind = "{cell.kind}"')
    if cell.guide and cell.guide_scale == 1.0:
        raise LddpmError(f"{where}: guide = {cell.guide!r} without guide_scale does nothing; give guide_scale (w != 1)")
    if not cell.guide and cell.guide_scale != 1.0:
        raise LddpmError(f"{where}: guide_scale = {cell.guide_scale:g} needs a guide: a run of this study or a run "
                         "folder / checkpoint file")
    if cell.guide and cell.guide not in study.runs and not (study.base_dir / cell.guide).exists():
        raise LddpmError(f"{where}: guide {cell.guide!r} is neither a run of this study ({', '.join(study.runs)}) nor "
                         f"an existing run folder or checkpoint (looked for {study.base_dir / cell.guide})")
    if cell.guide in study.runs and study.runs[cell.guide].kind != "diffusion":
        raise LddpmError(f"{where}: guide {cell.guide!r} is a {study.runs[cell.guide].kind} run; a guide is a diffusion run")
    if cell.guidance_interval is not None:
        cell.guidance_interval = list(check_interval(cell.guidance_interval, f"{where}: guidance_interval"))


def study_from_dict(data: dict, base_dir: str | Path = ".") -> Study:
    """Parse and validate a study description (the TOML file's contents)."""
    unknown = sorted(set(data) - {"study", "runs", "cells"})
    if unknown:
        raise LddpmError(f"study file: unknown top-level table(s) {unknown}; allowed: study, runs, cells")
    settings = _from_dict(StudySettings, dict(data.get("study", {})), "[study]")
    checks.check_choice("[study] feature_backend", settings.feature_backend, FEATURE_BACKENDS)
    check_bf16("[study] bf16", settings.bf16)
    checks.int_in_range("[study] grid_prompts", settings.grid_prompts, 1)
    runs = {}
    for name, raw in data.get("runs", {}).items():
        if "config" not in raw:
            raise LddpmError(f"[runs.{name}]: missing `config` (a trainer TOML file or preset name)")
        run = _from_dict(RunSpec, dict(raw), f"[runs.{name}]", name=name)
        if run.kind not in RUN_KINDS:
            raise LddpmError(f"[runs.{name}]: kind {run.kind!r} is not one of {RUN_KINDS}")
        runs[name] = run
    for run in runs.values():
        if run.vae is not None and (run.vae not in runs or runs[run.vae].kind != "vae"):
            raise LddpmError(f"[runs.{run.name}]: vae = {run.vae!r} must name a run with kind = \"vae\"")
    cells: list[CellSpec] = []
    for i, raw in enumerate(data.get("cells", [])):
        cells.extend(_expand_cell(dict(raw), i))
    if not cells:
        raise LddpmError("study file: no [[cells]] given; add at least one evaluation cell")
    study = Study(settings, runs, cells, Path(base_dir))
    seen = set()
    for cell in cells:
        if cell.name in seen:
            raise LddpmError(f"cells: duplicate cell name {cell.name!r}; cell names must be unique")
        seen.add(cell.name)
        if cell.run not in runs:
            raise LddpmError(f"cell {cell.name!r}: run {cell.run!r} is not defined; defined runs: {sorted(runs)}")
        if cell.kind not in CELL_KINDS:
            raise LddpmError(f"cell {cell.name!r}: kind {cell.kind!r} is not one of {CELL_KINDS}")
        if cell.labels not in LABEL_MODES:
            raise LddpmError(f"cell {cell.name!r}: labels {cell.labels!r} is not one of {LABEL_MODES}")
        checks.finite_number(f"cell {cell.name!r}: guidance_scale", cell.guidance_scale)
        checks.finite_number(f"cell {cell.name!r}: eta", cell.eta)
        checks.int_in_range(f"cell {cell.name!r}: steps", cell.steps, 1)
        if cell.kind == "sample" and cell.sampler in SAMPLERS:  # an unknown sampler fails when the cell is scored
            try:
                check_sampler_options(cell.sampler, cell.sampler_options())
            except LddpmError as exc:
                raise LddpmError(f"cell {cell.name!r}: {exc}") from None
        if cell.at_step is not None:
            checks.int_in_range(f"cell {cell.name!r}: at_step", cell.at_step, 1)
            run_steps = runs[cell.run].steps
            if run_steps is not None and cell.at_step > run_steps:
                raise LddpmError(f"cell {cell.name!r}: at_step = {cell.at_step} is past the end of run "
                                 f"{cell.run!r} ({run_steps} steps)")
        if cell.kind == "vae" and runs[cell.run].kind != "vae":
            raise LddpmError(f"cell {cell.name!r}: kind \"vae\" needs a run with kind = \"vae\"")
        _check_prompt_keys(cell, study)
        _check_guidance_keys(cell, study)
        if cell.group == "":
            cell.group = _infer_group(cell)
        if cell.group not in PLOT_GROUPS:
            raise LddpmError(f"cell {cell.name!r}: group {cell.group!r} is not one of {PLOT_GROUPS}")
        if cell.fid_n is not None and cell.fid_n != settings.fid_n:
            raise LddpmError(
                f"cell {cell.name!r}: fid_n = {cell.fid_n} differs from the study's fid_n = {settings.fid_n}; every cell "
                "is scored at the study's one N (FIDs at different N are not comparable): remove the cell's fid_n, "
                "or change [study] fid_n for all cells (or drop the cell that cannot afford it)"
            )
    return study


def find_study_file(name: str | Path) -> Path:
    """A study file path, or a preset name (`study-quick`, `demo`) looked up in the configs folder."""
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name if path.suffix == ".toml" else f"{path.name}.toml"
    candidates = [
        Path(__file__).resolve().parent.parent / "configs" / stem,  # shipped with the package
        Path.cwd() / "configs" / stem,
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise LddpmError(f"study file {str(name)!r} not found (also looked for configs/{stem}); give a TOML file path")


def load_study(path: str | Path) -> Study:
    """Read a study TOML file (or preset name); trainer config paths resolve relative to it."""
    path = find_study_file(path)
    data = read_toml(path, what="study file")
    return study_from_dict(data, base_dir=path.parent)


def base_row(cell: CellSpec, study: Study, status: str) -> dict:
    """A table row with the cell's settings filled in and no metrics yet."""
    row: dict[str, Any] = {k: None for k in ROW_FIELDS}
    row.update(
        name=cell.name, status=status, run=cell.run, data=f"{study.settings.dataset} {study.settings.resolution}px",
        sampler=cell.sampler if cell.kind == "sample" else "reconstruction",
        steps=cell.steps if cell.kind == "sample" else None,
        eta=cell.eta if cell.kind == "sample" else None,
        guidance_scale=cell.guidance_scale if cell.kind == "sample" else None,
        fid_n=study.fid_n(cell), group=cell.group, kind=cell.kind,
    )
    if cell.prompts:  # text cells only: the rows of class cells keep their fields
        row.update(prompts=cell.prompts, negative_prompt=cell.negative_prompt)
    if cell.guided:  # autoguided / interval cells only
        from lddpm.guidance import interval_json

        row.update(guide=cell.guide or None, guide_scale=cell.guide_scale,
                   guidance_interval=interval_json(cell.guidance_interval))
    if cell.kind == "sample" and cell.sampler_options():  # only cells that set sampler options carry the field
        row["sampler_options"] = ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                                           for k, v in cell.sampler_options().items())
    return row


def log(progress: bool, message: str) -> None:
    """Print a progress line (flushed, so it shows up in logs at once)."""
    if progress:
        print(message, flush=True)
