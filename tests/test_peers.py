"""benchmarks/peers.py: its --quick path end to end (tiny data, a stand-in feature network) and its argument errors."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

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


def _run(inputs, tmp_path, systems: str, variants: str = "default,tuned") -> dict:
    out = tmp_path / "peers.json"
    argv = ["--quick", "--in-process", "--systems", systems, "--variants", variants, "--minutes", "0.02,0.03",
            "--num", "4", "--sample-batch", "4", "--lddpm-steps", "2", "--lucidrains-steps", "2", "--diffusers-steps", "2",
            "--inception", str(inputs["net"]), "--feature-backend", "torch", "--data-root", str(inputs["data"]),
            "--cache-dir", str(inputs["cache"]), "--work", str(tmp_path / "work"), "--out", str(out)]
    report = peers.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
    assert out.with_suffix(".md").read_text().count("\n| ") >= len(report["rows"])
    return report


def _check_run(run: dict, system: str, variant: str, report: dict) -> None:
    assert not run.get("error"), run.get("error")
    assert (run["system"], run["variant"]) == (system, variant)
    assert run["params"] > 0 and run["torch_threads"] >= 1 and run["settings"]
    assert [m["mark_minutes"] for m in run["marks"]] == report["marks"] == [0.02, 0.03]
    previous = 0
    for mark in run["marks"]:
        assert mark["train_seconds"] >= 60 * mark["mark_minutes"]  # it stops after the step that reaches the mark
        assert mark["steps"] >= previous and mark["images_seen"] == mark["steps"] * report["batch"]
        previous = mark["steps"]
        assert mark["num_scored"] == report["num"] == 4
        assert math.isfinite(mark["fid"]) and math.isfinite(mark["kid"])
        assert mark["nfe_per_image"] == 2  # two steps of every sampler here: one network evaluation each
        assert mark["seconds_per_image"] > 0
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


@pytest.mark.parametrize("system", ["lucidrains", "diffusers"])
def test_quick_peer_default_and_tuned(inputs, tmp_path, system):
    # the peers are an optional extra (pip install -e ".[peers]"); the script imports lucidrains' package without
    # torchvision (see its docstring), so a plain importorskip of it would skip where the script works
    missing = [p for p in peers.PEER_PACKAGES[system] if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"the peers extra is not installed ({', '.join(missing)})")
    report = _run(inputs, tmp_path, system)
    default, tuned = report["runs"]
    _check_run(default, system, "default", report)
    _check_run(tuned, system, "tuned", report)
    assert default["mapping"] == {} and tuned["mapping"]
    # tuned takes the recipe's optimizer and objective; default keeps the peer's own
    lr = tuned["settings"]["optimizer"]["lr"]
    assert lr == report["recipe"]["lr"] != default["settings"]["optimizer"]["lr"]
    recipe_params = report["recipe"]["params"]
    assert abs(tuned["params"] - recipe_params) < abs(default["params"] - recipe_params)


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
    tuned = peers.diffusers_settings("tuned", recipe, False, "dpm++2m", 25, 64, 60000)
    s = tuned["settings"]
    assert s["unet"]["block_out_channels"] == [32, 64, 64]
    with torch.device("meta"):
        assert sum(p.numel() for p in UNet2DModel(**s["unet"]).parameters()) == 1_112_801
    assert s["scheduler"]["prediction_type"] == "v_prediction" and s["snr_gamma"] == 5.0
    assert s["scheduler"]["beta_schedule"] == "trained_betas"  # lddpm's sigmoid has no diffusers name
    default = peers.diffusers_settings("default", recipe, False, "dpm++2m", 25, 64, 60000)["settings"]
    assert default["lr_scheduler"] == {"name": "cosine", "num_warmup_steps": 500, "num_training_steps": 938 * 100}


@pytest.mark.parametrize("argv, message", [
    (["--systems", "lddpm,stable"], "--systems 'lddpm,stable': unknown 'stable'"),
    (["--variants", "fast"], "--variants 'fast': unknown 'fast'"),
    (["--minutes", "10,abc"], "--minutes '10,abc': expected numbers"),
    (["--minutes", "0,10"], "every mark must be a positive number"),
    (["--minutes", "10,10"], "names a mark twice"),
    (["--lucidrains-steps", "250"], "at most 50 network evaluations"),
    (["--num", "1"], "KID needs at least 2 images"),
])
def test_argument_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        peers.parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().splitlines()[-1].startswith("peers.py: error:")
