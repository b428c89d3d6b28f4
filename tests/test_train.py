"""Training loop: exact resume, DDP equivalence, loss goes down, signals, guards, VAE + latent runs."""

from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lddpm.checkpoint import list_checkpoints, load_checkpoint
from lddpm.config import Config, apply_overrides, config_from_preset, save_config
from lddpm.errors import LddpmError
from lddpm.train import EMA, lr_at, step_seed, train, train_vae

REPO = Path(__file__).resolve().parents[1]


def write_idx(root: Path, n: int = 64, seed: int = 0) -> Path:
    """Tiny Fashion-MNIST-format IDX files: class k is a bright block at a class-dependent place."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = np.zeros((n, 28, 28), np.uint8)
    for i, k in enumerate(labels):
        r, c = divmod(int(k), 5)
        images[i, 4 + 12 * r:12 + 12 * r, 2 + 5 * c:7 + 5 * c] = 255
    images = np.clip(images.astype(int) + rng.integers(0, 30, images.shape), 0, 255).astype(np.uint8)
    with gzip.open(root / "train-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
    with gzip.open(root / "train-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(struct.pack(">II", 2049, n) + labels.tobytes())
    return root


@pytest.fixture(scope="session")
def data_dirs(tmp_path_factory):
    """(IDX root, cache dir) shared by the training tests."""
    base = tmp_path_factory.mktemp("lddpm-data")
    return write_idx(base / "idx"), base / "cache"


# The tiny noise predictors the engine tests train: a U-Net and a DiT (16 tokens of 4x4 patches).
TINY_NETWORKS = {
    "unet": ["model.overrides={model_channels=8, channel_mult=[1, 2], attention_resolutions=[8]}"],
    "dit": ['model.kind="dit"', 'model.name="dit-tiny/4"', "model.overrides={hidden_size=16, depth=2, num_heads=2}"],
}


def tiny_config(data_dirs, *sets: str, preset: str = "fashion-quick", network: str = "unet") -> Config:
    """A 16x16 grey, ~10k-parameter run on the synthetic IDX data, on CPU."""
    root, cache = data_dirs
    base = [
        f"data.root={json.dumps(str(root))}",
        f"data.cache_dir={json.dumps(str(cache))}",
        "data.resolution=16",
        "optim.batch_size=8",
        "optim.warmup_steps=2",
        "run.steps=4",
        "run.log_every=1",
        "run.sample_every=0",
        "run.checkpoint_every=100",
        "run.device=\"cpu\"",
        "run.num_sample_images=10",
        "run.sample_steps=2",
    ]
    if preset != "vae-fashion-quick":
        base += TINY_NETWORKS[network]
    else:
        base.append("model.overrides={base_channels=8, channel_mult=[1, 2, 2]}")
    return apply_overrides(config_from_preset(preset), base + list(sets))


def weights(run_dir: Path, group: str) -> dict:
    return load_checkpoint(run_dir).load(group)


def test_step_seed_and_lr_schedule():
    assert step_seed(0, 5, 1) == step_seed(0, 5, 1)
    assert len({step_seed(0, 5, 0), step_seed(0, 5, 1), step_seed(0, 6, 0), step_seed(1, 5, 0)}) == 4
    assert [lr_at(s, 1.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_at(0, 3e-4, 0) == 3e-4
    # cool-down: linear to zero over the last quarter of the run (progress = step / steps before each step)
    assert [lr_at(s, 1.0, 0, 0.25, s / 8) for s in range(8)] == [1.0] * 7 + [0.5]
    assert [lr_at(s, 1.0, 0, 0.5, s / 8) for s in range(8)] == [1.0] * 5 + [0.75, 0.5, 0.25]
    assert lr_at(1, 2.0, 4, 0.5, 0.75) == pytest.approx(2.0 * 0.5 * 0.5)  # warm-up and cool-down multiply
    # the 1-sqrt shape: 1 - sqrt(x) of the cool-down's fraction x done (x = 0, 1/4, 1/2, 3/4 over the last half)
    sqrt_shape = [lr_at(s, 1.0, 0, 0.5, s / 8, "sqrt") for s in range(8)]
    assert sqrt_shape == pytest.approx([1.0] * 5 + [1 - 0.5, 1 - 0.5 ** 0.5, 1 - 0.75 ** 0.5])
    assert all(a <= b for a, b in zip(sqrt_shape, [lr_at(s, 1.0, 0, 0.5, s / 8) for s in range(8)]))  # never above


def test_cooldown_reaches_the_log_and_the_optimizer(data_dirs, tmp_path):
    """optim.cooldown lowers the learning rate the optimizer takes; the log records it at each step."""
    train(tiny_config(data_dirs, "optim.warmup_steps=0", "optim.cooldown=0.5", "optim.lr=0.01"), tmp_path / "run",
          progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log if "lr" in r] == pytest.approx([0.01, 0.01, 0.01, 0.005])
    state = load_checkpoint(tmp_path / "run").load("optimizer")
    assert state["param_groups"][0]["lr"] == pytest.approx(0.005)


def test_stop_minutes_stops_with_a_checkpoint_and_the_cooldown_keeps_its_horizon(data_dirs, tmp_path):
    """stop_minutes stops once the training time reaches it (here after the first step) without changing
    run.max_minutes; the progress the cool-down reads is the further of steps / run.steps and time / max_minutes."""
    from lddpm.train import DiffusionTrainer

    config = tiny_config(data_dirs, "run.max_minutes=600", "optim.cooldown=0.5")
    first = train(config, tmp_path / "run", progress=False, stop_minutes=1e-9)
    assert first["stopped"] and first["step"] == 1 and load_checkpoint(tmp_path / "run").meta["step"] == 1
    done = train(config, tmp_path / "run", resume=True, progress=False)
    assert not done["stopped"] and done["step"] == 4
    trainer = DiffusionTrainer(config, tmp_path / "other", progress=False)
    trainer.step = 1
    assert trainer.progress_at(60.0 * 6) == pytest.approx(0.25)     # 1 of 4 steps is further than 6 of 600 minutes
    assert trainer.progress_at(60.0 * 300) == pytest.approx(0.5)    # 300 of 600 minutes is further than 1 of 4 steps


def test_ema_follows_closed_form():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9, warmup=True)
    expected = 0.0
    for n in range(5):
        with torch.no_grad():
            model.weight.fill_(float(n + 1))
        ema.update(model, n)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * (n + 1)
        assert ema.model.weight.item() == pytest.approx(expected, rel=1e-6)
    assert EMA(model, 0.99, warmup=False).decay_at(0) == 0.99


@pytest.mark.parametrize("gamma", [6.94, 16.97])
def test_power_ema_weighs_the_run_by_the_closed_form_profile(gamma):
    # Karras et al. 2024: after t updates, weights of update tau count (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1).
    model = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(model, decay=0.5, warmup=True, gamma=gamma)  # decay and warm-up are unused with gamma > 0
    values = torch.randn(40, dtype=torch.float64)
    for n, v in enumerate(values):
        with torch.no_grad():
            model.weight.fill_(float(v))
        ema.update(model, n)
        t = n + 1
        tau = torch.arange(1, t + 1, dtype=torch.float64)
        weights = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / t ** (gamma + 1)
        assert float(weights.sum()) == pytest.approx(1.0)
        assert ema.model.weight.item() == pytest.approx(float((weights * values[:t]).sum()), rel=1e-5, abs=1e-6)
    assert ema.decay_at(0) == 0.0  # the first update copies the weights


def test_max_minutes_stops_the_run_and_a_resume_with_more_time_continues(data_dirs, tmp_path):
    from lddpm.checkpoint import final_checkpoint

    config = tiny_config(data_dirs, "run.steps=100000", "run.max_minutes=0.1", "run.bf16=\"auto\"")
    first = train(config, tmp_path / "run", progress=False)
    assert not first["stopped"] and 1 <= first["step"] < 100000 and first["wall_time"] >= 6.0
    final = final_checkpoint(tmp_path / "run", 100000, 0.1)
    meta = load_checkpoint(final).meta
    assert final.name == Path(first["checkpoint"]).name and meta["finished"] and isinstance(meta["bf16"], bool)
    assert final_checkpoint(tmp_path / "run", 100000, 10.0) is None  # not finished for a longer budget
    config.run.max_minutes = 10.0
    config.run.steps = first["step"] + 2  # the step cap still applies
    more = train(config, tmp_path / "run", resume=True, progress=False)
    assert more["step"] == first["step"] + 2
    with pytest.raises(LddpmError, match="run.max_minutes = -1.0 must be a finite number >= 0"):
        train(tiny_config(data_dirs, "run.max_minutes=-1"), tmp_path / "bad", progress=False)


@pytest.mark.parametrize("network", ["unet", "dit"])
def test_resume_equals_uninterrupted(data_dirs, tmp_path, network):
    # Dropout (U-Net), label dropout, flips and the adaptive timestep sampler all draw random numbers.
    dropout = ["model.overrides.dropout=0.2"] if network == "unet" else ["diffusion.learned_variance=true"]
    config = tiny_config(
        data_dirs, "run.steps=6", "optim.batch_size=16", *dropout, "run.label_dropout=0.5",
        "data.hflip=true", "diffusion.timestep_sampling=\"adaptive\"", "diffusion.num_timesteps=4", network=network,
    )
    full, part = tmp_path / "full", tmp_path / "part"
    train(config, full, progress=False)
    stopped = train(config, part, progress=False, stop_at=3)
    assert stopped["stopped"] and stopped["step"] == 3
    # Exactly the state a resume restores (no RNG states: every draw is reseeded from (seed, step, shard)).
    assert sorted(load_checkpoint(part).groups) == ["diffusion", "ema", "model", "optimizer"]
    assert load_checkpoint(part).meta["step"] == 3 and load_checkpoint(part).meta["network"]["kind"] == network
    resumed = train(config, part, resume=True, progress=False)
    assert resumed["step"] == 6 and not resumed["stopped"]
    for group in ("model", "ema"):
        a, b = weights(full, group), weights(part, group)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{group}.{key} differs after resume"
    a, b = weights(full, "optimizer"), weights(part, "optimizer")
    assert all(torch.equal(a["state"][i]["exp_avg_sq"], b["state"][i]["exp_avg_sq"]) for i in a["state"])
    a, b = weights(full, "diffusion"), weights(part, "diffusion")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (part / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.fixture
def one_thread():
    """Run the in-process reference single-threaded, as the torchrun workers are (OMP_NUM_THREADS=1):
    the thread count changes float rounding, and under load MKL may change it on its own."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _torchrun(config, tmp_path, command: str, out: str) -> None:
    """Train `config` with torchrun, 2 gloo processes, through `lddpm <command>`."""
    save_config(config, tmp_path / "cfg")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lddpm",
           command, str(tmp_path / "cfg" / "config.toml"), "--out", str(tmp_path / out), "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("network", ["unet", "dit"])
def test_two_processes_train_the_same_model_as_one(data_dirs, tmp_path, one_thread, network):
    """torchrun with 2 gloo processes == 1 process with the same global batch (2 micro-batches)."""
    config = tiny_config(data_dirs, "run.steps=3", "run.label_dropout=0.3", network=network)
    _torchrun(config, tmp_path, "train", "ddp")
    single = apply_overrides(config, ["optim.grad_accum=2"])
    train(single, tmp_path / "one", progress=False)
    a, b = weights(tmp_path / "ddp", "model"), weights(tmp_path / "one", "model")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)
    init = weights(tmp_path / "one", "ema")  # EMA also agrees, and training moved the weights
    assert any(not torch.equal(init[k], b[k]) for k in b)
    torch.testing.assert_close(weights(tmp_path / "ddp", "ema"), init, atol=1e-5, rtol=1e-5)
    logs = [json.loads(x) for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3]  # rank 0 alone writes the log
    assert load_checkpoint(tmp_path / "ddp").meta["network"]["kind"] == network


def test_two_processes_train_the_same_vae_with_discriminator_as_one(data_dirs, tmp_path, monkeypatch, one_thread):
    """The VAE with the PatchGAN and its adaptive adversarial weight: 2 processes == 1 process, grad_accum=2."""
    from lddpm.nn import vae as vae_module

    config = tiny_config(data_dirs, "run.steps=3", "vae.disc_start=1", "vae.disc_weight=0.5",
                         preset="vae-fashion-quick")
    _torchrun(config, tmp_path, "train-vae", "ddp")
    calls = []
    original = vae_module.adaptive_weight
    monkeypatch.setattr(vae_module, "adaptive_weight", lambda *a: calls.append(1) or original(*a))
    train_vae(apply_overrides(config, ["optim.grad_accum=2"]), tmp_path / "one", progress=False)
    assert calls, "the adaptive adversarial weight was never used"
    for group in ("model", "disc"):
        a, b = weights(tmp_path / "ddp", group), weights(tmp_path / "one", group)
        # BatchNorm running statistics are per-process buffers (each rank sees its own micro-batch), used
        # only in eval mode, which the discriminator never runs in: the trained parameters must agree.
        for key in (k for k in a if "running_" not in k and "num_batches_tracked" not in k):
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


def test_short_run_lowers_the_loss(data_dirs, tmp_path):
    from lddpm.data import ImageLoader, open_cache, prepare
    from lddpm.diffusion import build_diffusion
    from lddpm.pipeline import load_pipeline

    config = tiny_config(data_dirs, "run.steps=40", "optim.lr=3e-3", "optim.batch_size=16", "optim.ema_decay=0.0")
    root, cache_dir = data_dirs
    cache = open_cache(prepare("fashion-mnist", resolution=16, root=root, cache_dir=cache_dir, progress=False))
    x, y = ImageLoader(cache, 64, seed=123).batch(0)
    diffusion = build_diffusion(config.diffusion)

    def eval_loss(model):
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            return torch.stack([diffusion.training_losses(model, x, y=y, generator=gen)["mse"].mean()
                                for _ in range(4)]).mean().item()

    train(apply_overrides(config, ["run.steps=1", "optim.lr=1e-12"]), tmp_path / "init", progress=False)
    before = eval_loss(load_pipeline(tmp_path / "init").model)
    train(config, tmp_path / "run", progress=False)
    after = eval_loss(load_pipeline(tmp_path / "run").model)
    assert after < 0.7 * before, (before, after)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "images_per_s", "wall_time"} <= log[0].keys()
    assert np.mean([r["loss"] for r in log[-10:]]) < np.mean([r["loss"] for r in log[:5]])


def test_sigterm_leaves_a_loadable_checkpoint(data_dirs, tmp_path):
    config = tiny_config(data_dirs, "run.steps=100000")
    save_config(config, tmp_path / "cfg")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lddpm", "train", str(tmp_path / "cfg" / "config.toml"),
                             "--out", str(run), "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not ((run / "log.jsonl").exists() and (run / "log.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped at step" in out and "--resume" in out
    ckpt = load_checkpoint(run)
    assert 2 <= ckpt.meta["step"] < 100000
    assert "model" in ckpt.groups and ckpt.meta["config"]["run"]["steps"] == 100000


def test_resume_with_a_changed_network_is_refused(data_dirs, tmp_path):
    config = tiny_config(data_dirs, "run.steps=1")
    train(config, tmp_path / "run", progress=False)
    with pytest.raises(LddpmError, match="already has checkpoints"):
        train(config, tmp_path / "run", progress=False)
    wider = apply_overrides(config, ["model.overrides.model_channels=16", "run.steps=2"])
    with pytest.raises(LddpmError, match="network shape changed.*model_channels"):
        train(wider, tmp_path / "run", resume=True, progress=False)
    with pytest.raises(LddpmError, match="nothing to resume"):
        train(config, tmp_path / "empty", resume=True, progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dirs, tmp_path, monkeypatch):
    from lddpm import train as train_module

    original = train_module.DiffusionTrainer.micro_loss

    def poisoned(self, shard, generator):
        loss, extra = original(self, shard, generator)
        return (loss * float("nan") if self.step >= 3 else loss), extra

    monkeypatch.setattr(train_module.DiffusionTrainer, "micro_loss", poisoned)
    config = tiny_config(data_dirs, "run.steps=6", "run.checkpoint_every=2")
    with pytest.raises(LddpmError, match="loss became nan at step 4.*step_0000002.safetensors is intact"):
        train(config, tmp_path / "run", progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_0000002.safetensors"]
    assert load_checkpoint(tmp_path / "run").meta["step"] == 2


def test_unwritable_or_full_run_folder_is_reported_before_training(data_dirs, tmp_path, monkeypatch):
    config = tiny_config(data_dirs)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(LddpmError, match="cannot write to the run folder"):
        train(config, blocker / "run", progress=False)
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(LddpmError, match="not enough free disk space"):
        train(config, tmp_path / "full", progress=False)
    assert not (tmp_path / "full" / "log.jsonl").exists()


def test_latent_run_with_a_missing_vae_run_is_refused(data_dirs, tmp_path):
    config = tiny_config(data_dirs, f"data.latent={json.dumps(str(tmp_path / 'no-vae'))}")
    with pytest.raises(LddpmError, match="no such VAE run"):
        train(config, tmp_path / "run", progress=False)


def test_vae_then_latent_diffusion(data_dirs, tmp_path):
    from lddpm.pipeline import load_pipeline, load_vae

    vae_config = tiny_config(data_dirs, "run.steps=3", "run.num_sample_images=4", preset="vae-fashion-quick")
    result = train_vae(vae_config, tmp_path / "vae", progress=False)
    ckpt = load_checkpoint(tmp_path / "vae")
    assert ckpt.meta["kind"] == "vae" and result["step"] == 3
    vae = load_vae(tmp_path / "vae")
    assert vae.scaling_factor == pytest.approx(ckpt.meta["scaling_factor"]) and vae.scaling_factor != 1.0
    assert (tmp_path / "vae" / "samples" / "step_000003.png").exists()

    latent = tiny_config(data_dirs, "run.steps=2", f"data.latent={json.dumps(str(tmp_path / 'vae'))}",
                         "model.overrides.attention_resolutions=[2]")
    train(latent, tmp_path / "ldm", progress=False)
    meta = load_checkpoint(tmp_path / "ldm").meta
    assert meta["vae"]["step"] == 3 and meta["network"]["config"]["in_channels"] == 4
    assert meta["network"]["config"]["resolution"] == 4  # 16 px / downsampling 4
    pipe = load_pipeline(tmp_path / "ldm")
    images, labels = pipe.generate(3, sampler="ddim", num_steps=2, progress=False)
    assert images.shape == (3, 16, 16, 1) and images.dtype == np.uint8 and list(labels) == [0, 1, 2]

    other = apply_overrides(latent, ["data.resolution=32"])
    with pytest.raises(LddpmError, match="trained on fashion-mnist at 16px.*32px"):
        train(other, tmp_path / "ldm32", progress=False)


def test_vae_resume_with_discriminator_equals_uninterrupted(data_dirs, tmp_path):
    config = tiny_config(data_dirs, "run.steps=4", "vae.disc_start=1", "optim.grad_accum=2",
                         "run.num_sample_images=2", preset="vae-fashion-quick")
    train_vae(config, tmp_path / "full", progress=False)
    train_vae(config, tmp_path / "part", progress=False, stop_at=2)
    train_vae(config, tmp_path / "part", resume=True, progress=False)
    for group in ("model", "disc"):
        a, b = weights(tmp_path / "full", group), weights(tmp_path / "part", group)
        assert all(torch.equal(a[k], b[k]) for k in a), group
    assert load_checkpoint(tmp_path / "part").meta["scaling_factor"] == load_checkpoint(tmp_path / "full").meta["scaling_factor"]


def test_finished_vae_resumed_for_more_steps_equals_the_longer_run(data_dirs, tmp_path):
    # The final checkpoint holds the measured scaling factor; it is not a shape change.
    short = tiny_config(data_dirs, "run.steps=2", "run.num_sample_images=2", preset="vae-fashion-quick")
    longer = apply_overrides(short, ["run.steps=4"])
    train_vae(longer, tmp_path / "full", progress=False)
    train_vae(short, tmp_path / "part", progress=False)
    assert load_checkpoint(tmp_path / "part").meta["network"]["config"]["scaling_factor"] != 1.0
    result = train_vae(longer, tmp_path / "part", resume=True, progress=False)
    assert result["step"] == 4
    a, b = weights(tmp_path / "full", "model"), weights(tmp_path / "part", "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_checkpoint(tmp_path / "part").meta["scaling_factor"] == load_checkpoint(tmp_path / "full").meta["scaling_factor"]


def test_resume_refuses_changed_data_or_optim_settings_and_names_them(data_dirs, tmp_path):
    config = tiny_config(data_dirs, "run.steps=4")
    train(config, tmp_path / "run", progress=False, stop_at=2)
    changed = apply_overrides(config, ["data.hflip=true", "optim.lr=0.01"])
    with pytest.raises(LddpmError, match=r"data\.hflip, optim\.lr changed since its checkpoint"):
        train(changed, tmp_path / "run", resume=True, progress=False)
    # Length, logging and checkpoint settings may change on resume.
    longer = apply_overrides(config, ["run.steps=5", "run.log_every=2", "run.checkpoint_every=50"])
    assert train(longer, tmp_path / "run", resume=True, progress=False)["step"] == 5


def test_load_vae_decodes_with_the_ema_weights(data_dirs, tmp_path):
    from lddpm.pipeline import load_vae

    config = tiny_config(data_dirs, "run.steps=3", "optim.ema_decay=0.5", "optim.ema_warmup=false",
                         "run.num_sample_images=2", preset="vae-fashion-quick")
    train_vae(config, tmp_path / "vae", progress=False)
    ema, raw = weights(tmp_path / "vae", "ema"), weights(tmp_path / "vae", "model")
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if k != "latent_scale")
    loaded = load_vae(tmp_path / "vae").state_dict()
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)
    assert all(torch.equal(load_vae(tmp_path / "vae", use_ema=False).state_dict()[k], raw[k]) for k in raw)
    # The scaling factor was measured on the EMA autoencoder's latents, and both copies carry it.
    assert float(ema["latent_scale"]) == float(raw["latent_scale"]) != 1.0


def test_a_killed_saves_temporary_files_are_removed_when_the_run_starts_again(data_dirs, tmp_path):
    config = tiny_config(data_dirs, "run.steps=3")
    train(config, tmp_path / "run", progress=False, stop_at=2)
    stale = tmp_path / "run" / "checkpoints" / ".step_0000003.safetensors.tmp-999999-0123abcd"
    stale.write_bytes(b"half a checkpoint")
    keep = tmp_path / "run" / "checkpoints" / "notes.txt"  # not lddpm's naming: left alone
    keep.write_text("mine")
    train(config, tmp_path / "run", resume=True, progress=False)
    assert not stale.exists() and keep.read_text() == "mine"
