"""Autoguidance and the guidance interval end to end on tiny trained runs: the guide given as a run folder or a
checkpoint file, the compatibility check, Pipeline.generate / evaluate_checkpoint with a SamplingSpec and a
Scorer (NFE counted and planned, result settings), `lddpm sample` / `lddpm eval`, and study cells."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lddpm import evaluate as ev
from lddpm.errors import LddpmError
from lddpm.metrics import FeatureExtractor
from lddpm.pipeline import load_pipeline
from lddpm.sampling import SamplingSpec
from lddpm.study import run_study, study_from_dict
from lddpm.study.backend import cell_sampling_spec, guide_source
from helpers import ConvFeatures, write_random_idx

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A class-conditional main run, a guide run (another seed) and guides that differ from the main run."""
    from lddpm.config import apply_overrides, config_from_preset
    from lddpm.train import train

    tmp = tmp_path_factory.mktemp("guidance-runs")
    root, cache = write_random_idx(tmp / "idx"), tmp / "cache"

    def make(name: str, *extra: str) -> Path:
        config = apply_overrides(config_from_preset("fashion-quick"), [
            f"data.root={json.dumps(str(root))}", f"data.cache_dir={json.dumps(str(cache))}", "data.resolution=8",
            "optim.batch_size=4", "optim.warmup_steps=1", "run.steps=1", "run.log_every=1", "run.sample_every=0",
            "run.checkpoint_every=100", 'run.device="cpu"', "run.num_sample_images=4", "run.sample_steps=2",
            "model.overrides={model_channels=8, channel_mult=[1], attention_resolutions=[]}", *extra])
        train(config, tmp / name, progress=False)
        return tmp / name

    return {"main": make("main"), "guide": make("guide", "run.seed=1"), "root": root, "cache": cache,
            "v": make("v", "diffusion.objective='v'"), "uncond": make("uncond", "run.class_conditional=false"),
            "linear16": make("linear16", "diffusion.schedule='linear'", "data.resolution=16")}


def _extractor():
    net = ConvFeatures()
    return FeatureExtractor(net, name="stand-in", sha1="e" * 40, input_size=None, batch_size=16)


def _unclipped(pipe, **kw):
    """The pipeline's networks through sample() without clipping (an untrained net's images saturate)."""
    from lddpm.sampling import sample

    x_T = torch.randn((4, *pipe.latent_shape), generator=torch.Generator().manual_seed(0))
    return sample(pipe.model, pipe.diffusion, tuple(x_T.shape), num_steps=3, clip_x0=False, x_T=x_T,
                  y=torch.tensor([0, 1, 2, 3]), null_label=pipe.null_label, guide=pipe.guide, **kw)


def test_a_guide_from_a_run_folder_or_a_checkpoint_file(runs):
    pipe = load_pipeline(runs["main"], guide=runs["guide"])
    assert pipe.guide is not None and pipe.guide_source == str(runs["guide"])
    calls = []
    hook = pipe.guide.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    pipe.generate(4, num_steps=3, guide_scale=3.0, progress=False)
    hook.remove()
    assert calls == [4, 4, 4]                                # one guide forward per step
    plain, guided = _unclipped(pipe), _unclipped(pipe, guide_scale=3.0)
    assert not torch.allclose(plain, guided)
    file = next((runs["guide"] / "checkpoints").glob("step_*.safetensors"))
    by_file = load_pipeline(runs["main"], guide=file)
    assert by_file.guide_checkpoint == str(file)
    assert torch.equal(_unclipped(by_file, guide_scale=3.0), guided)
    # the main run as its own guide: D_g + w (D_main - D_g) = D_main, for any w
    itself = load_pipeline(runs["main"], guide=runs["main"])
    assert torch.equal(_unclipped(itself, guide_scale=4.0), plain)
    assert np.array_equal(itself.generate(4, num_steps=3, guide_scale=4.0, progress=False)[0],
                          itself.generate(4, num_steps=3, progress=False)[0])


def test_generate_with_a_spec_equals_the_keywords_and_loads_its_guide_once(runs):
    pipe = load_pipeline(runs["main"])
    spec = SamplingSpec(sampler="dpm++2m", num_steps=3, guidance_scale=2.0, guide=str(runs["guide"]), guide_scale=2.0,
                        guidance_interval=(0.1, 50.0), seed=5, batch_size=3)
    a, labels = pipe.generate(5, spec, progress=False)
    guide = pipe.guide
    b, _ = pipe.generate(5, sampler="dpm++2m", num_steps=3, guidance_scale=2.0, guide_scale=2.0,
                         guidance_interval=(0.1, 50.0), seed=5, batch_size=3, progress=False)
    assert np.array_equal(a, b) and pipe.guide is guide and list(labels) == [0, 1, 2, 3, 4]
    with pytest.raises(LddpmError, match="not both"):
        pipe.generate(2, spec, seed=1, progress=False)
    with pytest.raises(LddpmError, match="needs a guide network"):
        load_pipeline(runs["main"]).generate(2, num_steps=2, guide_scale=2.0, progress=False)


@pytest.mark.parametrize("other,what", [
    ("v", r"objective \(eps vs v\)"),
    ("uncond", r"conditioning \(10 classes vs unconditional\)"),
    ("linear16", r"diffusion schedule \(cosine, T=1000 vs linear, T=1000\); data shape \(8px x1 vs 16px x1\)"),
])
def test_an_incompatible_guide_is_one_clear_error(runs, other, what):
    with pytest.raises(LddpmError, match=r"guide .* cannot guide .*: its " + what + r".*differ \(main vs guide\)"):
        load_pipeline(runs["main"], guide=runs[other])


def test_evaluate_with_spec_and_scorer_counts_the_guide_and_matches_the_plan(runs, tmp_path):
    scorer = ev.Scorer(reference="fashion-mnist:train", extractor=_extractor(), classifier=None,
                       cache_dir=runs["cache"], data_root=runs["root"], progress=False)
    pipe = load_pipeline(runs["main"], guide=runs["guide"])
    sigmas_inside = (0.5, 20.0)
    spec = SamplingSpec(num_steps=4, guidance_scale=2.0, guide=str(runs["guide"]), guide_scale=2.0,
                        guidance_interval=sigmas_inside, batch_size=5)
    r = ev.evaluate_checkpoint(runs["main"], spec, scorer, num=10, pipeline=pipe, partial_dir=tmp_path / "p",
                               progress=False)
    cost = r["cost"]
    main_rows, guide_rows = ev.planned_nfe(pipe, spec, 4)
    assert 4 < main_rows < 8 and 0 < guide_rows < 4         # some of the 4 steps inside the interval, some outside
    assert cost["network_evaluations_per_image"] == main_rows and cost["guide_evaluations_per_image"] == guide_rows
    assert cost["nfe"] == main_rows + guide_rows and cost["nfe_source"] == "counted"
    assert cost["model_calls"] == 8 and cost["guide_model_calls"] == 2 * guide_rows
    s = r["settings"]
    assert s["guide_scale"] == 2.0 and s["guidance_interval"] == [0.5, 20.0]
    assert Path(s["guide"]).name.startswith("step_") and "spacing" not in s
    assert f"+ {guide_rows} guide evals/image" in ev.summary_line(r)
    again = ev.evaluate_checkpoint(runs["main"], spec, scorer, num=10, pipeline=pipe, partial_dir=tmp_path / "p",
                                   progress=False)  # every batch resumed: the count is planned
    assert again["cost"]["nfe"] == cost["nfe"] and again["cost"]["nfe_source"] == "planned"
    assert again["fid"] == r["fid"]


def test_the_keyword_form_of_evaluate_checkpoint_equals_spec_and_scorer(runs, tmp_path):
    extractor = _extractor()
    common = dict(reference="fashion-mnist:train", classifier=None, cache_dir=runs["cache"], data_root=runs["root"])
    old = ev.evaluate_checkpoint(runs["main"], num=8, num_steps=2, guidance_scale=2.0, batch_size=4, seed=3,
                                 extractor=extractor, progress=False, **common)
    new = ev.evaluate_checkpoint(runs["main"], SamplingSpec(num_steps=2, guidance_scale=2.0, batch_size=4, seed=3),
                                 ev.Scorer(extractor=extractor, batch_size=4, progress=False, **common), num=8,
                                 progress=False)
    assert old["fid"] == new["fid"] and old["settings"] == new["settings"]
    assert set(old["settings"]) == {"checkpoint", "num", "sampler", "num_steps", "eta", "guidance_scale", "labels",
                                    "seed", "batch_size", "bf16"}        # unguided settings keep their fields
    assert old["cost"]["nfe"] == 4 and old["cost"]["network_evaluations_per_image"] == 4
    with pytest.raises(LddpmError, match="SamplingSpec or as keywords, not both"):
        ev.evaluate_checkpoint(runs["main"], SamplingSpec(), num=2, seed=1)
    with pytest.raises(LddpmError, match="Scorer or as keywords, not both"):
        ev.evaluate_checkpoint(runs["main"], None, ev.Scorer(extractor=extractor), num=2, classifier=None)
    with pytest.raises(LddpmError, match="an `inception` network file, not both"):
        ev.Scorer(extractor=extractor, inception="x.pt")


def test_the_scorer_builds_each_reference_once(runs):
    scorer = ev.Scorer(extractor=_extractor(), cache_dir=runs["cache"], data_root=runs["root"], progress=False)
    a = scorer.reference_for("fashion-mnist", 8, 12)
    assert scorer.reference_for("fashion-mnist", 8, 12) is a and a.manifest["num"] == 12
    assert scorer.reference_for("fashion-mnist", 8, 20) is not a


def test_cli_sample_and_eval_with_a_guide_and_an_interval(runs, tmp_path, capsys):
    from lddpm.cli import main

    grid = tmp_path / "g.png"
    assert main(["sample", str(runs["main"]), "--guide", str(runs["guide"]), "--guide-scale", "2",
                 "--guidance-interval", "0.2", "inf", "--steps", "2", "--num", "3", "--out", str(grid), "--device",
                 "cpu", "--quiet"]) == 0
    assert grid.is_file()
    for bad, message in ((["--guide", str(runs["guide"])], "--guide without --guide-scale"),
                         (["--guide-scale", "2"], "needs a guide network: --guide"),
                         (["--guide", str(runs["v"]), "--guide-scale", "2"], "objective"),
                         (["--guidance-interval", "2", "1"], "sigma_lo <= sigma_hi")):
        with pytest.raises(SystemExit) as exit_info:
            main(["sample", str(runs["main"]), "--steps", "2", "--num", "1", "--out", str(grid), "--device", "cpu",
                  "--quiet", *bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    net = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(ConvFeatures()), str(net))
    assert main(["eval", str(runs["main"]), "--guide", str(runs["guide"]), "--guide-scale", "2", "--guidance-interval",
                 "0.5", "20", "--steps", "2", "--num", "8", "--batch-size", "4", "--classifier", "none",
                 "--inception", str(net), "--cache-dir", str(runs["cache"]), "--root", str(runs["root"]),
                 "--device", "cpu", "--quiet"]) == 0
    out = next((runs["main"] / "eval").glob("ddim-k2-ag2-guide-gi0.5-20-n8-seed0.json"))
    result = json.loads(out.read_text())
    assert result["settings"]["guide_scale"] == 2.0 and result["cost"]["nfe"] >= 2
    assert "guide evals/image" in capsys.readouterr().out


GUIDE_STUDY = {
    "study": {"name": "guided", "dataset": "toy", "resolution": 8, "fid_n": 4},
    "runs": {"net": {"config": "toy.toml"}, "small": {"config": "toy.toml"}},
    "cells": [
        {"name": "plain", "run": "net", "steps": 2},
        {"name": "ag-w{guide_scale:g}", "run": "net", "steps": 2, "guide": "small", "guide_scale": [1.5, 2.0]},
        {"name": "gi-{guidance_interval}", "run": "net", "steps": 2, "guidance_scale": 2.0,
         "guidance_interval": [[0.3, 5.0], [0.0, 1e9]]},
    ],
}


def test_study_cells_with_a_guide_run_and_an_interval(tmp_path):
    study = study_from_dict(GUIDE_STUDY, base_dir=tmp_path)
    assert [c.name for c in study.cells] == ["plain", "ag-w1.5", "ag-w2", "gi-[0.3, 5.0]", "gi-[0.0, 1000000000.0]"]
    assert [c.group for c in study.cells] == ["samplers", "other", "other", "other", "other"]
    trained, seen = [], {}

    def train_fn(run, run_dir, study_, deps):
        trained.append(run.name)
        return {"run_dir": str(run_dir), "model": run.name}

    def cell_fn(cell, info, study_, out_dir):
        seen[cell.name] = (cell_sampling_spec(cell, study_, None, guide_source(cell, info, study_)), info)
        return {"fid": 1.0, "model_evals": 2}

    rows = run_study(study, tmp_path / "out", train_fn=train_fn, cell_fn=cell_fn, progress=False)
    assert trained == ["net", "small"] and all(r["status"] == "ok" for r in rows)
    spec, info = seen["ag-w2"]
    assert spec.guide == str(tmp_path / "out" / "runs" / "small") and spec.guide_scale == 2.0
    assert info["guide_info"]["model"] == "small"
    assert seen["gi-[0.3, 5.0]"][0].guidance_interval == (0.3, 5.0) and seen["plain"][0].guide is None
    assert "guide" not in rows[0] and rows[2]["guide"] == "small" and rows[3]["guidance_interval"] == [0.3, 5.0]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| Guide | Guide w | Guidance interval (sigma) |" in md and "[0.3, 5]" in md
    assert "guide_scale" in (tmp_path / "out" / "results.csv").read_text().splitlines()[0]


@pytest.mark.parametrize("cell,match", [
    ({"guide_scale": 2.0}, "guide_scale = 2 needs a guide"),
    ({"guide": "small"}, "without guide_scale does nothing"),
    ({"guide": "nowhere", "guide_scale": 2.0}, "neither a run of this study"),
    ({"guide": "ae", "guide_scale": 2.0}, "is a vae run"),
    ({"guidance_interval": [5.0, 1.0]}, r"guidance_interval = \(5, 1\): needs 0 <= sigma_lo"),
    ({"guide_scale": math.nan, "guide": "small"}, "guide_scale = nan"),
])
def test_bad_guidance_keys_of_a_study_cell(cell, match, tmp_path):
    data = {"study": {"dataset": "toy"}, "runs": {"net": {"config": "t"}, "small": {"config": "t"},
                                                  "ae": {"config": "t", "kind": "vae"}},
            "cells": [{"name": "c", "run": "net", **cell}]}
    with pytest.raises(LddpmError, match=match):
        study_from_dict(data, base_dir=tmp_path)


def test_text_guides_need_one_frozen_encoder():
    """check_guide on text pipelines (stand-ins with the attributes it reads): a scratch encoder is refused, a
    frozen encoder must be the same one."""
    from types import SimpleNamespace

    from lddpm.diffusion import GaussianDiffusion
    from lddpm.pipeline import check_guide
    from lddpm.schedule import NoiseSchedule

    def text_pipe(identity):
        encoder = SimpleNamespace(identity=lambda: identity)
        return SimpleNamespace(diffusion=GaussianDiffusion(NoiseSchedule.from_name("cosine", 1000)), config=None,
                               latent_shape=(1, 8, 8), resolution=8, channels=1, vae=None, num_classes=0,
                               context_dim=16, text_encoder=encoder, checkpoint="main")

    minilm = {"kind": "bert", "weights_sha256": "a", "tokenizer_sha256": "b", "max_length": 24}
    check_guide(text_pipe(minilm), text_pipe(dict(minilm)), "guide")
    with pytest.raises(LddpmError, match=r"text encoder \(another encoder"):
        check_guide(text_pipe(minilm), text_pipe({**minilm, "max_length": 32}), "guide")
    scratch = {"kind": "scratch", "weights_sha256": None, "tokenizer_sha256": "c", "max_length": 24}
    with pytest.raises(LddpmError, match="a scratch encoder trains inside each network"):
        check_guide(text_pipe(scratch), text_pipe(scratch), "guide")
