"""benchmarks/peers.py: its --quick path end to end (tiny data, a stand-in feature network) and its argument errors."""

from __future__ import annotations

import importlib.util
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lddpm.guidance import interval_from_json

from helpers import ConvFeatures, write_random_idx

REPO = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("peers_benchmark", REPO / "benchmarks" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peers = _load_script()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Fashion-MNIST-format IDX files of 40 random images and a TorchScript stand-in for the Inception network."""
    root = tmp_path_factory.mktemp("peers")
    net = root / "features.pt"
    torch.jit.save(torch.jit.script(ConvFeatures()), str(net))
    return {"data": write_random_idx(root / "idx"), "net": net, "cache": root / "cache"}


def _run(inputs, tmp_path, systems: str, variants: str = "default,tuned", minutes: str = "0.02,0.03",
         extra: tuple[str, ...] = ()) -> dict:
    out = tmp_path / "peers.json"
    argv = ["--quick", "--in-process", "--systems", systems, "--variants", variants, "--minutes", minutes, *extra,
            "--num", "4", "--sample-batch", "4", "--lddpm-steps", "2", "--lucidrains-steps", "2", "--diffusers-steps", "2",
            "--inception", str(inputs["net"]), "--feature-backend", "torch", "--data-root", str(inputs["data"]),
            "--cache-dir", str(inputs["cache"]), "--work", str(tmp_path / "work"), "--out", str(out)]
    report = peers.main(argv)
    written = out.read_text()
    # the committed JSON names the work folder WORK (no machine paths); otherwise it is the returned report
    assert json.loads(written) == json.loads(json.dumps(peers.portable(report, tmp_path / "work"), default=str))
    assert str(tmp_path / "work") not in written and '"work": "WORK"' in written
    assert out.with_suffix(".md").read_text().count("\n| ") >= len(report["rows"])
    return report


def _check_run(run: dict, system: str, variant: str, report: dict, marks=(0.02, 0.03), nfe=(2,)) -> None:
    assert not run.get("error"), run.get("error")
    assert (run["system"], run["variant"]) == (system, variant)
    assert run["params"] > 0 and run["torch_threads"] >= 1 and run["settings"]
    assert [m["mark_minutes"] for m in run["marks"]] == report["marks"] == list(marks)
    previous = 0
    for mark in run["marks"]:
        assert mark["train_seconds"] >= 60 * mark["mark_minutes"]  # it stops after the step that reaches the mark
        assert mark["steps"] >= previous and mark["images_seen"] == mark["steps"] * report["batch"]
        previous = mark["steps"]
        assert [r["nfe_per_image"] for r in mark["samplers"]] == list(nfe)  # network rows per image, guide included
        for r in mark["samplers"]:
            assert r["num_scored"] == report["num"] == 4
            assert math.isfinite(r["fid"]) and math.isfinite(r["kid"])
            assert r["seconds_per_image"] > 0
    if run["setup_seconds"] is not None and run["setup_seconds"] < 60 * report["marks"][-1]:
        assert previous > 0  # set-up left time to train (on a contended machine it may not: the clock is wall time)


def test_quick_lddpm_writes_the_table(inputs, tmp_path):
    report = _run(inputs, tmp_path, "lddpm")
    assert [(r["system"], r["variant"]) for r in report["runs"]] == [("lddpm", "recipe")]
    _check_run(report["runs"][0], "lddpm", "recipe", report)
    assert report["recipe"]["params"] == report["runs"][0]["params"]
    assert "run.class_conditional=false" in report["recipe"]["overrides"]
    assert report["environment"]["threads"] >= 1 and report["environment"]["torch"] == torch.__version__
    assert math.isfinite(report["real_data_floor"]["fid"])
    row = report["rows"][0]
    assert set(row) >= {"system", "variant", "mark_minutes", "params", "train_images_per_s", "images_seen", "sampler",
                        "nfe_per_image", "seconds_per_image", "fid", "kid_x1e3"}
    assert row["train_images_per_s"] == pytest.approx(row["images_seen"] / row["train_seconds"])


def test_quick_lddpm_several_samplers_and_its_own_checkpoint_as_guide(inputs, tmp_path):
    """One row per sampler; guide=0.5 autoguides each mark by the run's checkpoint at half the mark, and the
    guide's network evaluations are counted (the interval covers every step here: 2 + 2 rows per image)."""
    # a constant rate after warm-up (the recipe cools down): one run resumed from mark to mark
    report = _run(inputs, tmp_path, "lddpm", minutes="0.02,0.04", extra=(
        "--lddpm-set", "optim.cooldown=0.0",
        "--lddpm-samplers", "ddim:2", "euler:2:grid=logsnr", "ddim:2:guide=0.5,guide_scale=2,interval=0/inf",
        "ddim:2:guide=0.5,guide_scale=2,interval=1e8/1e9"))
    run = report["runs"][0]
    _check_run(run, "lddpm", "recipe", report, marks=(0.02, 0.04), nfe=(2, 2, 4, 2))
    assert [r["sampler"] for r in report["rows"]][:4] == ["ddim:2", "euler:2:grid=logsnr",
                                                          "ddim:2:guide=0.5,guide_scale=2,interval=0/inf",
                                                          "ddim:2:guide=0.5,guide_scale=2,interval=1e8/1e9"]
    guided = [mark["samplers"][2] for mark in run["marks"]]
    assert [Path(g["guide_checkpoint"]).name for g in guided] == ["0.01min.pt", "0.02min.pt"]
    assert guided[0]["guide_step"] <= run["marks"][0]["steps"] and guided[1]["guide_step"] == run["marks"][0]["steps"]
    # outside the interval the guided row is the unguided row exactly; inside it differs (where the guide is an
    # earlier step than the main network: on a busy machine a resume may end before its first step)
    mark = run["marks"][1]
    images = [np.load(r["samples"])["images"] for r in mark["samplers"]]
    assert np.array_equal(images[0], images[3])
    if guided[1]["guide_step"] < mark["steps"]:
        assert not np.array_equal(images[0], images[2])


def test_an_open_interval_is_null_in_the_json_and_inf_for_sampling():
    item = peers.parse_sampler("dpm++2m:25:guide=0.3333,guide_scale=2.5,interval=0.28/inf", ("dpm++2m",))
    assert item["options"]["interval"] == [0.28, None] and "Infinity" not in json.dumps(item)
    assert interval_from_json(item["options"]["interval"]) == (0.28, math.inf)
    assert interval_from_json([0.28, 5.42]) == (0.28, 5.42) and interval_from_json(None) is None


def test_a_cooldown_recipe_trains_one_run_per_mark(inputs, tmp_path):
    """optim.cooldown ties the learning rate to the run's budget: each mark is its own run, stopped at its guide
    time by stop_minutes (run.max_minutes stays the mark), its guide copied aside under the mark's name."""
    spec = {"marks": [0.02, 0.04], "lddpm_samplers": [peers.parse_sampler(t, ("ddim",)) for t in
                                                      ("ddim:2", "ddim:2:guide=0.5,guide_scale=2")]}
    assert peers.lddpm_plan(spec, tmp_path, 0.0) == [(tmp_path / "run", None, [0.01, 0.02, 0.04], {0.01, 0.02})]
    assert peers.lddpm_plan(spec, tmp_path, 0.2) == [(tmp_path / "run-0.02min", 0.02, [0.01, 0.02], {0.01}),
                                                     (tmp_path / "run-0.04min", 0.04, [0.02, 0.04], {0.02})]
    report = _run(inputs, tmp_path, "lddpm", minutes="0.02,0.04", extra=(
        "--lddpm-set", "optim.cooldown=0.5", "--lddpm-samplers", "ddim:2", "ddim:2:guide=0.5,guide_scale=2"))
    run = report["runs"][0]
    _check_run(run, "lddpm", "recipe", report, marks=(0.02, 0.04), nfe=(2, 4))
    assert [m["run"] for m in run["marks"]] == ["run-0.02min", "run-0.04min"]
    assert [Path(m["samplers"][1]["guide_checkpoint"]).name for m in run["marks"]] == ["0.02-0.01min.pt", "0.04-0.02min.pt"]
    assert report["recipe"]["cooldown"] == 0.5 and "one run per mark" in run["sources"]["settings"]


@pytest.mark.parametrize("argv, message", [
    (["--lddpm-samplers", "unipc:10:grid=foo"], "unknown grid 'foo'"),
    (["--lddpm-samplers", "unipc"], "expected NAME:STEPS"),
    (["--lddpm-samplers", "unipc:80"], "steps must be an integer from 1 to 50"),
    (["--lddpm-samplers", "unipc:10:guide=1.5"], "a number between 0 and 1"),
    (["--lddpm-samplers", "unipc:10:guide_scale=2"], "need guide=FRACTION"),
    (["--lddpm-samplers", "unipc:10:order"], "is not K=V"),
    (["--systems", "lddpm", "--diffusers-samplers", "heun:10"], "unknown 'heun'"),
])
def test_sampler_list_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        peers.parse_args(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_diffusers_scheduler_options_are_checked():
    pytest.importorskip("diffusers")
    with pytest.raises(SystemExit):
        peers.parse_args(["--systems", "diffusers", "--diffusers-samplers", "unipc:10:no_such_option=1"])


@pytest.mark.parametrize("system", ["lucidrains", "diffusers"])
def test_quick_peer_default_and_tuned(inputs, tmp_path, system):
    # the peers are an optional extra (pip install -e ".[peers]"); the script imports lucidrains' package without
    # torchvision (see its docstring), so a plain importorskip of it would skip where the script works
    missing = [p for p in peers.PEER_PACKAGES[system] if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"the peers extra is not installed ({', '.join(missing)})")
    # diffusers samples with two schedulers, the second with its own config arguments
    extra = ("--diffusers-samplers", "dpm++2m:2", "unipc:2:use_exponential_sigmas=true,solver_order=3") \
        if system == "diffusers" else ()
    nfe = (2, 2) if system == "diffusers" else (2,)
    report = _run(inputs, tmp_path, system, extra=extra)
    default, tuned = report["runs"]
    _check_run(default, system, "default", report, nfe=nfe)
    _check_run(tuned, system, "tuned", report, nfe=nfe)
    assert default["mapping"] == {} and tuned["mapping"]
    # tuned takes the recipe's optimizer and objective; default keeps the peer's own
    lr = tuned["settings"]["optimizer"]["lr"]
    assert lr == report["recipe"]["lr"] != default["settings"]["optimizer"]["lr"]
    recipe_params = report["recipe"]["params"]
    assert abs(tuned["params"] - recipe_params) < abs(default["params"] - recipe_params)


def test_speed_times_both_training_steps_in_one_process(inputs, tmp_path, monkeypatch):
    """--speed: lddpm's trainer step and diffusers' tuned step in turn, medians and their ratio; nothing sampled."""
    pytest.importorskip("diffusers")
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    out = tmp_path / "speed.json"
    report = peers.main(["--quick", "--speed", "2", "--systems", "lddpm,diffusers", "--data-root", str(inputs["data"]),
                         "--cache-dir", str(inputs["cache"]), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report["systems"]) == {"lddpm", "diffusers"} and report["rounds"] == 2
    for row in report["systems"].values():
        assert len(row["wall_s_blocks"]) == 2 and row["wall_s_per_step"] > 0 and row["cpu_s_per_step"] > 0
        assert row["images_per_s"] == pytest.approx(report["batch"] / row["wall_s_per_step"])
    lddpm, diffusers = (report["systems"][k]["wall_s_per_step"] for k in ("lddpm", "diffusers"))
    assert report["lddpm_over_diffusers_images_wall"] == pytest.approx(diffusers / lddpm)
    assert not list(temp.iterdir())  # no run folder is made (nor left behind) when nothing is trained to a mark
    # without --out the timing goes to its own file, never over the peers table's JSON
    assert peers.parse_args(["--speed", "2", "--systems", "lddpm,diffusers"]).out == "benchmarks/results/peers-speed.json"
    assert peers.parse_args(["--systems", "lddpm"]).out == "benchmarks/results/peers.json"


def test_diffusers_tuned_network_matches_the_recipe_exactly():
    """The recipe's U-Net layout maps onto UNet2DModel block for block: the same parameter count."""
    pytest.importorskip("diffusers")
    from diffusers import UNet2DModel

    recipe = {"params": 1_112_801, "network": {"channel_mult": [1, 2, 2], "attention_resolutions": [8], "num_res_blocks": 1,
                                               "norm_groups": 8, "dropout": 0.0, "num_heads": 1, "mid_attention": True},
              "hflip": False, "objective": "v", "schedule": "sigmoid", "num_timesteps": 1000, "rescale_zero_terminal_snr": False,
              "loss_weighting": "min_snr", "min_snr_gamma": 5.0, "lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.0,
              "warmup_steps": 50, "grad_clip": 1.0, "ema_gamma": 0.0, "ema_decay": 0.999, "ema_warmup": True,
              "bf16": False, "bf16_setting": False, "learned_variance": False, "timestep_sampling": "uniform", "grad_accum": 1}
    samplers = [peers.parse_sampler("dpm++2m:25", tuple(peers.DIFFUSERS_SAMPLERS))]
    tuned = peers.diffusers_settings("tuned", recipe, False, samplers, 64, 60000)
    s = tuned["settings"]
    assert s["unet"]["block_out_channels"] == [32, 64, 64]
    with torch.device("meta"):
        assert sum(p.numel() for p in UNet2DModel(**s["unet"]).parameters()) == 1_112_801
    assert s["scheduler"]["prediction_type"] == "v_prediction" and s["snr_gamma"] == 5.0
    assert s["scheduler"]["beta_schedule"] == "trained_betas"  # lddpm's sigmoid has no diffusers name
    assert s["samplers"] == [{"label": "dpm++2m:25", "scheduler": "DPMSolverMultistepScheduler",
                              "num_inference_steps": 25, "config": {}}]
    default = peers.diffusers_settings("default", recipe, False, samplers, 64, 60000)["settings"]
    assert default["lr_scheduler"] == {"name": "cosine", "num_warmup_steps": 500, "num_training_steps": 938 * 100}


@pytest.mark.parametrize("argv, message", [
    (["--systems", "lddpm,stable"], "--systems 'lddpm,stable': unknown 'stable'"),
    (["--variants", "fast"], "--variants 'fast': unknown 'fast'"),
    (["--minutes", "10,abc"], "--minutes '10,abc': expected numbers"),
    (["--minutes", "0,10"], "every mark must be a positive number"),
    (["--minutes", "10,10"], "names a mark twice"),
    (["--lucidrains-steps", "250"], "at most 50 network evaluations"),
    (["--num", "1"], "KID needs at least 2 images"),
    (["--speed", "-1"], "--speed -1: give a positive number of rounds"),
    (["--speed", "3", "--systems", "lddpm"], "keep diffusers in --systems"),
])
def test_argument_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        peers.parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().splitlines()[-1].startswith("peers.py: error:")


def test_diffusers_loop_is_ddpm_pipeline_for_its_schedulers():
    """The benchmark's own denoising loop (needed because UniPC's step takes no generator) gives DDPMPipeline's
    images for the schedulers DDPMPipeline can run, from the same generator."""
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler, DDPMPipeline, DPMSolverMultistepScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**peers.diffusers_unet_kwargs([8, 16], [False, True], 1, 4)).eval()
    for cls in (DPMSolverMultistepScheduler, DDIMScheduler):
        scheduler = cls(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
        pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            want = pipe(batch_size=3, generator=torch.Generator().manual_seed(5), num_inference_steps=4,
                        output_type="np").images
            got = peers.diffusers_sample(unet, scheduler, 3, 4, torch.Generator().manual_seed(5), torch.device("cpu"))
        want = (np.clip(want, 0, 1) * 255).round().astype(np.uint8)
        assert np.abs(peers.to_uint8(got).astype(int) - want.astype(int)).max() <= 1


def test_lddpm_set_changes_the_recipe_of_lddpm_and_of_the_peers():
    """`--lddpm-set` overrides come last in lddpm's run and in the recipe the tuned peers read (so the runs made
    before the preset moved to min-SNR gamma 20 are reproducible with diffusion.min_snr_gamma=5.0)."""
    from lddpm.config import config_from_preset

    spec = {"lddpm_preset": "fashion-30min", "batch": 64, "seed": 0, "device": "cpu", "cache_dir": "/nonexistent",
            "quick": False}
    assert peers.recipe_summary(spec)["min_snr_gamma"] == config_from_preset("fashion-30min").diffusion.min_snr_gamma
    old = peers.recipe_summary({**spec, "lddpm_set": ["diffusion.min_snr_gamma=5.0"]})
    assert old["min_snr_gamma"] == 5.0 and old["overrides"][-1] == "diffusion.min_snr_gamma=5.0"
    args = peers.parse_args(["--systems", "lddpm", "--lddpm-set", "diffusion.min_snr_gamma=5.0"])
    assert args.lddpm_set == ["diffusion.min_snr_gamma=5.0"]
