"""The real study backend: trains runs with `lddpm.train` and scores cells with `lddpm.evaluate`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lddpm.checkpoint import (checkpoint_name, checkpoint_step, final_checkpoint, list_checkpoints, load_checkpoint,
                              resolve_checkpoint)
from lddpm.config import load_config, save_config
from lddpm.data import open_cache, prepare, test_split
from lddpm.distributed import resolve_device
from lddpm.errors import LddpmError
from lddpm.data.scenes import write_prompt_set
from lddpm.evaluate import (Scorer, evaluate_checkpoint, evaluate_vae, load_extractor, read_prompt_records,
                            real_data_floor, reference_stats, vae_reconstructions)
from lddpm.metrics.classifier import META_FILE, default_classifier_dir, train_dataset_classifier
from lddpm.pipeline import load_vae
from lddpm.sampling import SamplingSpec
from lddpm.study.schema import (FAITHFULNESS_METRIC, PROMPT_SET_SEED, PROMPTS_FOLDER, CellSpec, PromptSpec, RunSpec,
                                Study, log)
from lddpm.train import check_names, train, train_vae

def _toml_literal(value: Any) -> str:
    """A value as a `--set` literal (strings quoted, so paths never parse as numbers)."""
    return json.dumps(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


class StudyBackend:
    """Trains runs with `lddpm.train` and scores cells with `lddpm.evaluate`.

    Builds one lddpm.evaluate.Scorer per study (the FID feature network, the reference statistics and the
    classifier, loaded once; a second one without the classifier for text cells) and one SamplingSpec per
    cell. `extractor` replaces the pinned Inception network (tests use a tiny stand-in).
    """

    def __init__(self, *, extractor=None, progress: bool = True):
        self.extractor = extractor
        self.progress = progress
        self._reference: dict[tuple, Any] = {}
        self._scorers: dict[bool, Scorer] = {}

    # ------------------------------------------------------------------------- training
    def run_config(self, run: RunSpec, run_dir: Path, study: Study, deps: dict):
        """The trainer config of a run: its preset/file, the study's data settings, then `set`."""
        s = study.settings
        source = run.config
        if source.endswith(".toml") or "/" in source:
            source = str((study.base_dir / source).resolve())
        overrides = [
            f"data.dataset={_toml_literal(s.dataset)}",
            f"data.resolution={s.resolution}",
            f"run.out={_toml_literal(str(run_dir))}",
            f"run.seed={s.seed}",
            f"run.device={_toml_literal(_config_device(s.device))}",
        ]
        if s.data_root:
            overrides.append(f"data.root={_toml_literal(s.data_root)}")
        if s.cache_dir:
            overrides.append(f"data.cache_dir={_toml_literal(s.cache_dir)}")
        if run.vae:
            overrides.append(f"data.latent={_toml_literal(str(deps[run.vae]['run_dir']))}")
        if run.steps:
            overrides.append(f"run.steps={run.steps}")
        overrides += run.set
        return check_names(load_config(source, overrides))

    def train(self, run: RunSpec, run_dir: Path, study: Study, deps: dict) -> dict:
        """Reuse the run if its final checkpoint exists, else train it (resuming from its last checkpoint)."""
        config = self.run_config(run, run_dir, study, deps)
        final = final_checkpoint(run_dir, config.run.steps, config.run.max_minutes)
        if final is None:
            resume = bool(list_checkpoints(run_dir / "checkpoints")) if (run_dir / "checkpoints").is_dir() else False
            if study.settings.train_nproc > 1:
                self._train_subprocess(run, config, run_dir, resume, study.settings.train_nproc)
            else:
                fn = train_vae if run.kind == "vae" else train
                result = fn(config, run_dir, resume=resume, progress=self.progress)
                if result.get("stopped"):
                    raise KeyboardInterrupt(f"training of {run.name} stopped at step {result['step']}")
            save_config(config, run_dir)
            final = final_checkpoint(run_dir, config.run.steps, config.run.max_minutes)
        if final is None:
            raise LddpmError(f"run {run.name}: training ended without its final checkpoint in {run_dir / 'checkpoints'}")
        return self._run_info(run, config, final)

    def _train_subprocess(self, run: RunSpec, config, run_dir: Path, resume: bool, nproc: int) -> None:
        """Train through `lddpm train --nproc N` (torchrun, DDP) from the resolved config file."""
        save_config(config, run_dir)
        command = [sys.executable, "-m", "lddpm", "train-vae" if run.kind == "vae" else "train",
                   str(run_dir / "config.toml"), "--out", str(run_dir), "--nproc", str(nproc)]
        command += ["--resume"] if resume else []
        command += [] if self.progress else ["--quiet"]
        print("[study] " + " ".join(command), flush=True)
        code = subprocess.call(command)
        if code:
            raise LddpmError(f"run {run.name}: `{' '.join(command)}` exited with status {code}")

    @staticmethod
    def _run_info(run: RunSpec, config, final: Path) -> dict:
        """What the table needs from a finished run, read from its final checkpoint."""
        meta = load_checkpoint(final).meta
        dataset = meta.get("dataset") or {}
        name = config.model.name
        if run.kind == "vae":
            model = f"VAE {name}"
        else:
            model = f"{'DiT' if config.model.kind == 'dit' else 'U-Net'} {name}"
            if config.data.latent:
                model += " (latent)"
            if config.run.class_conditional:
                model += ", class-cond."
            if config.text.encoder:
                model += f", text ({Path(config.text.encoder).name})"
        return {
            "run_dir": str(final.parent.parent),
            "checkpoint": str(final),
            "model": model,
            "schedule": None if run.kind == "vae" else config.diffusion.schedule,
            "train_images": int(meta.get("images_seen", 0)),
            "train_seconds": float(meta.get("wall_time", 0.0)),
            "class_names": list(dataset.get("class_names") or []),
            "text_encoder": "" if run.kind == "vae" else config.text.encoder,
            "data": f"{dataset.get('name', config.data.dataset)} {dataset.get('resolution', config.data.resolution)}px",
        }

    # ------------------------------------------------------------------------- evaluation
    def _extractor(self, study: Study):
        """The FID feature network (pinned Inception unless one was given)."""
        if self.extractor is None:
            self.extractor = load_extractor(batch_size=study.settings.fid_batch_size,
                                            device=_config_device(study.settings.device, resolve=True),
                                            backend=study.settings.feature_backend, cache_dir=study.settings.cache_dir)
        return self.extractor

    def _reference_stats(self, study: Study):
        """Reference statistics of the study's reference split (cached on disk by lddpm.evaluate)."""
        s = study.settings
        key = (s.dataset, s.reference_split, s.reference_n, s.resolution)
        if key not in self._reference:
            self._reference[key] = reference_stats(
                s.dataset, split=s.reference_split, num=s.reference_n or None, resolution=s.resolution,
                extractor=self._extractor(study), cache_dir=s.cache_dir, data_root=s.data_root, progress=self.progress,
            )
        return self._reference[key]

    def real_floor(self, study: Study) -> dict:
        """FID/KID of N real images of another split (train, or the test split when the reference is train)."""
        s = study.settings
        split = "train" if s.reference_split != "train" else test_split(s.dataset)
        return real_data_floor(s.dataset, reference=self._reference_stats(study), split=split, num=s.fid_n,
                               resolution=s.resolution, extractor=self._extractor(study), cache_dir=s.cache_dir,
                               data_root=s.data_root, progress=self.progress)

    def _classifier_folder(self, study: Study) -> Path:
        """The classifier for class accuracy and the classifier score; trained here if missing."""
        s = study.settings
        folder = Path(s.classifier) if s.classifier else default_classifier_dir(s.dataset, s.resolution, s.cache_dir)
        if not (folder / META_FILE).is_file():
            log(self.progress, f"[study] training the classifier for class metrics -> {folder}")
            train_dataset_classifier(s.dataset, s.resolution, epochs=s.classifier_epochs, seed=s.seed, out=folder,
                                     cache_dir=s.cache_dir, root=s.data_root, device=_config_device(s.device, resolve=True),
                                     progress=self.progress)
        return folder

    def scorer(self, study: Study, *, classes: bool = True) -> Scorer:
        """The study's Scorer (built once): its reference and feature network, with the study classifier
        (trained here if missing) when `classes`, without one for text cells."""
        if classes not in self._scorers:
            s = study.settings
            self._scorers[classes] = Scorer(
                reference=self._reference_stats(study), extractor=self._extractor(study),
                classifier=str(self._classifier_folder(study)) if classes else None, batch_size=s.fid_batch_size,
                device=_config_device(s.device, resolve=True), cache_dir=s.cache_dir, data_root=s.data_root,
                progress=self.progress)
        return self._scorers[classes]

    def cell(self, cell: CellSpec, info: dict, study: Study, out_dir: Path) -> dict:
        """Score one cell; returns row fields plus `images`/`labels` for the grid."""
        if cell.kind == "vae":
            return self._vae_cell(cell, info, study)
        s = study.settings
        device = _config_device(s.device, resolve=True)
        partial = out_dir / "cells" / f"{cell.name}.samples"
        prompt_spec = study.prompt_spec(cell)
        check_cell_fits_run(cell, info, prompt_spec)
        records = prompt_records(prompt_spec, out_dir) if prompt_spec is not None else None
        source, trained = cell_source(cell, info)
        spec = cell_sampling_spec(cell, study, records, guide_source(cell, info, study))
        result = evaluate_checkpoint(source, spec, self.scorer(study, classes=records is None), num=study.fid_n(cell),
                                     partial_dir=partial, device=device, progress=self.progress)
        images, labels = _read_partial(partial)
        cost = result.get("cost") or {}
        evals = cost.get("nfe")  # network rows per image, a guide's included (planned when every batch was resumed)
        if evals is None:  # no count and no plan: the sampler's evaluations from its grid (Heun: 2N - 1)
            evals = (cost.get("nfe_expected") or cell.steps) * (2 if cell.guidance_scale != 1.0 else 1)
        row = {
            "fid": result["fid"], "fid_n": result["num_images"], "kid": result.get("kid"), "kid_std": result.get("kid_std"),
            "classifier_score": result.get("classifier_score"),
            "class_accuracy": result.get("class_accuracy"), "precision": result.get("precision"),
            "recall": result.get("recall"), "seconds_per_image": cost.get("seconds_per_image"),
            "model_evals": int(round(evals)), "images": images, "labels": labels, **trained,
            "extra": {"reference": result.get("reference"), "cost": cost, "notes": result.get("notes")},
        }
        if records is not None:  # the grid is labelled with each image's prompt (labels are prompt indices)
            row["labels"] = None
            if labels is not None:
                row["prompts"] = [records[int(i) % len(records)]["prompt"] for i in labels]
            row["extra"]["prompts_sha256"] = (result.get("settings") or {}).get("prompts_sha256")
            if result.get("faithfulness"):
                row.update(faithfulness_fields(result["faithfulness"]))
                row["extra"]["faithfulness"] = result["faithfulness"]
        track_cell(source, cell, row)
        return row

    def _vae_cell(self, cell: CellSpec, info: dict, study: Study) -> dict:
        """Reconstructions of the reference split: rFID, PSNR; grid of originals next to reconstructions."""
        s = study.settings
        device = _config_device(s.device, resolve=True)
        source, trained = cell_source(cell, info)
        vae = load_vae(source, device)
        cache = open_cache(prepare(s.dataset, resolution=s.resolution, split=s.reference_split, root=s.data_root,
                                   cache_dir=s.cache_dir, progress=self.progress))
        if len(cache) < study.fid_n(cell):
            raise LddpmError(f"cell {cell.name!r}: {s.dataset}:{s.reference_split} has {len(cache)} images, fewer than "
                             f"the study's fid_n = {study.fid_n(cell)}; lower [study] fid_n for every cell")
        start = time.perf_counter()
        result = evaluate_vae(vae, cache, reference_stats=self._reference_stats(study), extractor=self._extractor(study),
                              num=study.fid_n(cell), batch_size=s.sample_batch_size, device=device, progress=self.progress)
        seconds = time.perf_counter() - start
        originals = np.asarray(cache.images[:32])
        recon = vae_reconstructions(vae, originals, batch_size=32, device=device)
        pairs = np.stack([originals, recon], axis=1).reshape(-1, *originals.shape[1:])
        track_cell(source, cell, {**result, "seconds_per_image": seconds / max(1, result["num_images"])})
        return {
            "fid": result["fid"], "fid_n": result["num_images"], "kid": result.get("kid"), "kid_std": result.get("kid_std"),
            "precision": result.get("precision"),
            "recall": result.get("recall"), "seconds_per_image": seconds / max(1, result["num_images"]),
            "model_evals": 1, "psnr": result["psnr"], "mse": result["mse"], "images": pairs, "labels": None, **trained,
        }


def cell_sampling_spec(cell: CellSpec, study: Study, records: list[dict] | None, guide: str | None) -> SamplingSpec:
    """How a cell samples: its sampler, sampler options and guidance, the study's seed, sampling batch and bf16."""
    s = study.settings
    return SamplingSpec(sampler=cell.sampler, num_steps=cell.steps, eta=cell.eta, guidance_scale=cell.guidance_scale,
                        guide=guide, guide_scale=cell.guide_scale, guidance_interval=cell.guidance_interval,
                        labels=cell.labels, prompts=tuple(records) if records is not None else None,
                        negative_prompt=cell.negative_prompt, seed=s.seed, batch_size=s.sample_batch_size, bf16=s.bf16,
                        sampler_options=cell.sampler_options() or None)


def guide_source(cell: CellSpec, info: dict, study: Study) -> str | None:
    """The cell's guide network: its study run's folder (`info["guide_info"]`), or a path relative to the study file."""
    if not cell.guide:
        return None
    if info.get("guide_info"):
        return str(info["guide_info"]["run_dir"])
    return str(study.base_dir / cell.guide)


def track_cell(source: Path, cell: CellSpec, numbers: dict) -> None:
    """A cell's numbers to its run's trackers (run.trackers, e.g. TensorBoard) as study/<cell>/<metric>, at the step
    of the checkpoint it scored; the row in results.json is the record, so a tracker failure is only printed."""
    from lddpm.tracking import log_evaluation

    try:
        log_evaluation(resolve_checkpoint(source), "study", cell.name, numbers)
    except (LddpmError, OSError) as exc:
        print(f"[study] cell {cell.name}: not logged to the run's trackers: {exc}", flush=True)


def check_cell_fits_run(cell: CellSpec, info: dict, spec: PromptSpec | None) -> None:
    """A prompt set only for a text run, and a text run only with a prompt set: one clear line each."""
    if "text_encoder" not in info:  # a run described by another backend
        return
    if spec is not None and not info["text_encoder"]:
        raise LddpmError(f"cell {cell.name!r} has prompts = {cell.prompts!r}, but run {cell.run!r} is not a text "
                         "run (its [text] encoder is empty); remove the cell's `prompts`/`negative_prompt`, or train "
                         "the run with a text preset such as fashion-pairs-30min")
    if spec is None and info["text_encoder"]:
        raise LddpmError(f"cell {cell.name!r}: run {cell.run!r} is a text run (encoder {info['text_encoder']!r}) and "
                         "samples from prompts; give the cell `prompts` (a JSONL file, or a built-in set such as "
                         "\"fashion-pairs:200\")")


def prompt_records(spec: PromptSpec, out_dir: Path) -> list[dict]:
    """A cell's prompt records; a built-in scene set is written once into the study folder's prompts/ (the same
    records every time: `lddpm.data.scenes.write_prompt_set` with a fixed seed) and read back from there."""
    path = spec.path
    if spec.scene_set is not None:
        path = Path(out_dir) / PROMPTS_FOLDER / spec.file_name
        if not path.is_file():
            write_prompt_set(spec.scene_set, path, num=spec.num, heldout=spec.heldout, seed=PROMPT_SET_SEED)
    return read_prompt_records(path)


def faithfulness_fields(faith: dict) -> dict:
    """Row fields from evaluate_checkpoint's `faithfulness` (scores, ceiling, of_ceiling): the scene set's
    headline metric (pair accuracy / all-clause accuracy), its ceiling on real test scenes, seen / held-out."""
    scores, ceiling = faith["scores"], faith.get("ceiling") or {}
    metric = FAITHFULNESS_METRIC[scores["task"]]
    pairs = scores["task"] == "fashion-pairs"
    return {
        "faithfulness_metric": metric, "faithfulness": scores.get(metric), "faithfulness_ceiling": ceiling.get(metric),
        "faithfulness_of_ceiling": (faith.get("of_ceiling") or {}).get(metric),
        "faithfulness_seen": (scores.get("seen") or {}).get(metric),
        "faithfulness_heldout": (scores.get("heldout") or {}).get(metric),
        # the checker's per-slot accuracy; a fashion-text scene has one slot, so there it is the class accuracy
        "slot_accuracy": scores.get("slot_accuracy") if pairs else scores.get("class_accuracy"),
        "swap_rate": scores.get("swap_rate") if pairs else None,
    }


def cell_source(cell: CellSpec, info: dict) -> tuple[Path, dict]:
    """What a cell scores: its run's folder (final weights), or with `at_step` that step's checkpoint
    together with the training length it had then (train_images, train_seconds for the table)."""
    if cell.at_step is None:
        return Path(info["run_dir"]), {}
    source = checkpoint_at_step(Path(info["run_dir"]), cell.at_step, cell.run)
    meta = load_checkpoint(source).meta
    return source, {"train_images": int(meta.get("images_seen", 0)), "train_seconds": float(meta.get("wall_time", 0.0))}


def checkpoint_at_step(run_dir: Path, step: int, run_name: str) -> Path:
    """The run's checkpoint written at `step`; a clear error naming the kept steps when it is gone."""
    folder = run_dir / "checkpoints"
    if (folder / checkpoint_name(step)).is_file():
        return folder / checkpoint_name(step)
    steps = [checkpoint_step(p) for p in list_checkpoints(folder)] if folder.is_dir() else []
    raise LddpmError(f"run {run_name}: no checkpoint at step {step} in {folder} (kept: {steps}); give the run "
                     f"run.keep_steps = [{step}] (or a run.checkpoint_every dividing it and a run.keep_checkpoints that keeps "
                     "it), then train it again")


def _config_device(device: str, resolve: bool = False) -> str:
    """The study's device as the trainer's run.device (auto/cpu/cuda); `resolve` turns auto into one."""
    name = device.split(":")[0] if device else "auto"
    return resolve_device(name).type if resolve else name


def _read_partial(folder: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The images (and labels) lddpm.evaluate saved batch by batch under `folder`."""
    files = sorted(folder.glob("batch-*.npz"))
    if not files:
        return None, None
    images, labels = [], []
    for f in files:
        with np.load(f) as data:
            images.append(data["images"])
            labels.append(data["labels"] if "labels" in data else None)
    return np.concatenate(images), (None if any(y is None for y in labels) else np.concatenate(labels))


def train_run(run: RunSpec, run_dir: Path, study: Study, deps: dict) -> dict:
    """Train (or reuse / resume) one run with the project's trainer; returns its info."""
    return StudyBackend().train(run, run_dir, study, deps)


def evaluate_cell(cell: CellSpec, info: dict, study: Study, out_dir: Path) -> dict:
    """Score one cell with the project's evaluator (a fresh backend; `run_study` shares one)."""
    return StudyBackend().cell(cell, info, study, out_dir)
