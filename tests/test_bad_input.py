"""Bad input, hostile files and full disks, through the CLI as a user meets them.

Every case runs `lddpm.cli.main(argv)` in-process and asserts: exit status 2, exactly one stderr
line `lddpm <command>: error: ...` that says what is wrong, no traceback, and that no good file
(the source data, the prepared cache, the trained run, and the case's own files) changed.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lddpm.cli import main
from lddpm.errors import LddpmError
from lddpm.io import LOCK_FILE
from helpers import write_random_idx

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


# ------------------------------------------------------------------------------------------------
# the good data every case must leave alone


class _Features(torch.nn.Module):
    """A stand-in feature network (TorchScript, as a user's --inception file would be)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


class World:
    """Paths of the good data: IDX source, prepared cache, a trained run, a feature network, a study."""

    def __init__(self, base: Path):
        self.base = base
        self.idx = base / "idx"
        self.cache = base / "cache"
        self.run = base / "run"
        self.net = base / "net.pt"
        self.study = base / "study"

    @property
    def checkpoint(self) -> Path:
        return next((self.run / "checkpoints").glob("step_*.safetensors"))

    @property
    def prepared(self) -> Path:
        return next(self.cache.glob("fashion-mnist-train-16*"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from lddpm.config import apply_overrides, config_from_preset
    from lddpm.data import prepare
    from lddpm.train import train

    w = World(tmp_path_factory.mktemp("good"))
    write_random_idx(w.idx)
    prepare("fashion-mnist", resolution=16, root=w.idx, cache_dir=w.cache, progress=False)
    config = apply_overrides(config_from_preset("fashion-quick"), [
        f"data.root={json.dumps(str(w.idx))}", f"data.cache_dir={json.dumps(str(w.cache))}", "data.resolution=16",
        "optim.batch_size=8", "run.steps=1", "run.sample_every=0", "run.device=\"cpu\"", "run.num_sample_images=4",
        "run.sample_steps=2", "model.overrides={model_channels=8, channel_mult=[1, 2], attention_resolutions=[8]}",
    ])
    train(config, w.run, progress=False)
    torch.jit.save(torch.jit.script(_Features()), str(w.net))
    assert main(["fid-ref", "fashion-mnist", "--num", "16", "--resolution", "16", "--inception", str(w.net), "--cache-dir",
                 str(w.cache), "--root", str(w.idx), "--out", str(w.base / "ref"), "--quiet"]) == 0
    w.study.mkdir()
    (w.study / "toy.toml").write_text(
        '[study]\nname = "toy"\n\n[runs.net]\nconfig = "fashion-quick"\n\n'
        '[[cells]]\nname = "ddim"\nrun = "net"\nsampler = "ddim"\nsteps = 2\n'
    )
    return w


def damaged_cell(tmp: Path) -> Path:
    """A study folder whose finished-cell file was cut short."""
    out = tmp / "damaged-study"
    (out / "cells").mkdir(parents=True)
    (out / "cells" / "ddim.json").write_text('{"name": "ddim", "status": "o')
    return out


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path (not the folder locks: they name their last holder)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


def run_cli(argv: list[str]) -> int:
    """`lddpm argv` in-process; the exit status."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


# ------------------------------------------------------------------------------------------------
# helpers that build bad files in a case's own folder


def copy_checkpoint(world: World, tmp: Path, tensors=None, header=None, name="bad.safetensors") -> Path:
    """A copy of the run's checkpoint with its tensors and/or JSON header changed by the given functions."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(world.checkpoint), framework="pt") as f:
        meta = f.metadata()
        data = {k: f.get_tensor(k) for k in f.keys()}
    if tensors:
        tensors(data)
    if header:
        h = json.loads(meta["lddpm"])
        header(h)
        meta = dict(meta, lddpm=json.dumps(h))
    path = tmp / name
    save_file(data, str(path), metadata=meta)
    return path


def copy_run(world: World, tmp: Path, **changes) -> Path:
    """A copy of the run folder whose (only) checkpoint is replaced by a changed one."""
    run = tmp / "run"
    shutil.copytree(world.run, run)
    bad = copy_checkpoint(world, tmp, **changes)
    os.replace(bad, run / "checkpoints" / world.checkpoint.name)
    return run


def model_tensor(data: dict) -> str:
    """Name of the first conv weight of the `model` group."""
    return next(k for k in sorted(data) if k.startswith("model/") and k.endswith("weight") and data[k].ndim == 4)


def nan_weights(data):
    key = model_tensor(data)
    data[key] = torch.full_like(data[key], float("nan"))
    ema = "ema/" + key.split("/", 1)[1]
    data[ema] = torch.full_like(data[ema], float("nan"))


def inf_weight(data):
    key = "ema/" + model_tensor(data).split("/", 1)[1]
    data[key] = data[key].clone()
    data[key].view(-1)[0] = float("inf")


def half_weights(data):
    for k in list(data):
        if k.startswith(("model/", "ema/")) and data[k].is_floating_point():
            data[k] = data[k].half()


def wrong_shape(data):
    for group in ("model/", "ema/"):
        key = group + model_tensor(data).split("/", 1)[1]
        data[key] = torch.zeros(tuple(s + 1 for s in data[key].shape))


def copy_cache(world: World, tmp: Path) -> tuple[Path, Path]:
    """(cache dir, cache folder): a copy of the prepared cache the case may damage."""
    shutil.copytree(world.cache, tmp / "c")
    return tmp / "c", tmp / "c" / world.prepared.name


def flip_byte(path: Path, offset: int = -1) -> None:
    """Change one byte (same size)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_manifest(folder: Path, fn) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    fn(m)
    (folder / "manifest.json").write_text(json.dumps(m))


def image_folder(tmp: Path, empty_class: bool = False, bad_png: bool = False) -> Path:
    root = tmp / "pics"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for j in range(3):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / c / f"{j}.png")
    if empty_class:
        (root / "emu").mkdir()
    if bad_png:
        (root / "dog" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image at all")
    return root


def png_folder(tmp: Path, bad: bool) -> Path:
    folder = tmp / "gen"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / f"{i}.png")
    if bad:
        (folder / "5.png").write_text("this is text with a .png name")
    return folder


def png_file(tmp: Path, name: str = "in.png", size: int = 16, mode: str = "L", value: int | None = None) -> Path:
    """One PNG image (random pixels, or all `value`) for the editing commands."""
    shape = (size, size) if mode == "L" else (size, size, 3)
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8) if value is None else \
        np.full(shape, value, np.uint8)
    path = tmp / name
    Image.fromarray(pixels).save(path)
    return path


def _edit(w, t, cmd, *extra, inputs=None):
    return [cmd, w.run, *(inputs or [png_file(t)]), "--out-dir", t / "out", "--steps", "2", "--device", "cpu",
            "--quiet", *extra]


def idx_copy(world: World, tmp: Path, images: bytes) -> Path:
    """A copy of the IDX folder whose train images file is replaced by `images` (gzipped)."""
    shutil.copytree(world.idx, tmp / "idx")
    with gzip.open(tmp / "idx" / "train-images-idx3-ubyte.gz", "wb", compresslevel=1) as f:
        f.write(images)
    return tmp / "idx"


def gzip_bomb(world: World, tmp: Path) -> Path:
    """A header for 40 images, then 64 MiB of zeros (a few hundred KiB compressed)."""
    root = idx_copy(world, tmp, struct.pack(">IIII", 2051, 40, 28, 28))
    with gzip.open(root / "train-images-idx3-ubyte.gz", "ab", compresslevel=1) as f:
        for _ in range(64):
            f.write(bytes(1 << 20))
    return root


def damaged_reference(world: World, tmp: Path, npz: bytes | None = None, manifest: str | None = None) -> Path:
    """A copy of the good FID reference (ref.npz + ref.json) with one file replaced."""
    (tmp / "ref.npz").write_bytes(npz if npz is not None else (world.base / "ref.npz").read_bytes())
    (tmp / "ref.json").write_text(manifest if manifest is not None else (world.base / "ref.json").read_text())
    return tmp / "ref"


def damaged_classifier(tmp: Path, meta: dict, weights: dict) -> Path:
    from safetensors.torch import save_file

    folder = tmp / "clf"
    folder.mkdir()
    (folder / "classifier.json").write_text(json.dumps(meta))
    save_file(weights, str(folder / "model.safetensors"))
    return folder


def file_blocker(tmp: Path) -> Path:
    """A regular file, so that `blocker/x` cannot be created."""
    p = tmp / "blocker"
    p.write_text("a file, not a folder")
    return p


def bad_toml(tmp: Path, text: str) -> Path:
    p = tmp / "bad.toml"
    p.write_text(text)
    return p


# ------------------------------------------------------------------------------------------------
# the cases: (id, argv builder(world, tmp), regex the error line must match)


def _prep(w, *extra):
    return ["prepare", "fashion-mnist", "--root", w.idx, "--quiet", *extra]


def _train_cfg(w):
    return w.run / "config.toml"


def _train(w, t, *sets, cmd="train"):
    argv = [cmd, _train_cfg(w), "--out", t / "new-run", "--quiet"]
    for s in sets:
        argv += ["--set", s]
    return argv


_HELD_SOCKETS = []  # listening sockets the serve-port-in-use case keeps open


def _busy_port() -> int:
    """A loopback port some socket is listening on."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    _HELD_SOCKETS.append(sock)
    return sock.getsockname()[1]


def _sample(w, t, *extra, run=None):
    return ["sample", run or w.run, "--out", t / "grid.png", "--num", "2", "--steps", "2", "--device", "cpu", "--quiet", *extra]


def _eval(w, t, *extra, run=None):
    return ["eval", *([run] if run is not False else []), "--inception", w.net, "--cache-dir", t / "c", "--root", w.idx,
            "--num", "4", "--steps", "2", "--classifier", "none", "--out", t / "res.json", "--quiet", *extra]


def _fidref(w, t, *extra):
    return ["fid-ref", "fashion-mnist", "--inception", w.net, "--cache-dir", t / "c", "--root", w.idx, "--quiet", *extra]


def _clf(w, t, *extra):
    return ["train-classifier", "fashion-mnist", "--cache-dir", t / "c", "--root", w.idx, "--quiet", *extra]


CASES = [
    # ---- top level
    ("unknown-command", lambda w, t: ["prepar", "mnist"], r"^lddpm: error: argument COMMAND: invalid choice"),
    ("unknown-option", lambda w, t: ["--colour"], r"^lddpm: error: unrecognized arguments: --colour"),
    # ---- prepare: arguments
    ("prepare-int-type", lambda w, t: _prep(w, "--resolution", "x"), r"argument --resolution: invalid int value: 'x'"),
    ("prepare-dataset-choice", lambda w, t: ["prepare", "fashion"], r"argument dataset: invalid choice: 'fashion'"),
    ("prepare-fit-choice", lambda w, t: _prep(w, "--fit", "squash"), r"argument --fit: invalid choice"),
    ("prepare-resolution-0", lambda w, t: _prep(w, "--resolution", "0", "--cache-dir", t), r"--resolution = 0 is out of range.*between 1 and 4096"),
    ("prepare-resolution-negative", lambda w, t: _prep(w, "--resolution", "-5", "--cache-dir", t), r"--resolution = -5 is out of range"),
    ("prepare-resolution-8192", lambda w, t: _prep(w, "--resolution", "8192", "--cache-dir", t), r"--resolution = 8192.*4096 pixels"),
    ("prepare-resolution-100000", lambda w, t: _prep(w, "--resolution", "100000", "--cache-dir", t), r"--resolution = 100000"),
    ("prepare-workers-0", lambda w, t: _prep(w, "--workers", "0", "--cache-dir", t), r"--workers = 0 is out of range"),
    ("prepare-unknown-split", lambda w, t: _prep(w, "--split", "valid", "--cache-dir", t), r"unknown split 'valid'.*train, test"),
    ("prepare-missing-root", lambda w, t: ["prepare", "mnist", "--root", t / "nowhere", "--cache-dir", t / "c", "--quiet"], r"not found"),
    ("prepare-imagefolder-no-root", lambda w, t: ["prepare", "imagefolder", "--cache-dir", t, "--quiet"], r"imagefolder needs --root"),
    ("prepare-imagenet-no-tree", lambda w, t: ["prepare", "imagenet100", "--root", t, "--cache-dir", t / "c", "--quiet"], r"imagenet100"),
    ("prepare-truncated-idx", lambda w, t: (shutil.copytree(w.idx, t / "idx"),
                                            (t / "idx" / "train-images-idx3-ubyte.gz").write_bytes(
                                                (w.idx / "train-images-idx3-ubyte.gz").read_bytes()[:200]),
                                            ["prepare", "fashion-mnist", "--root", t / "idx", "--cache-dir", t / "c", "--quiet"])[-1],
     r"train-images-idx3-ubyte"),
    ("prepare-gzip-bomb", lambda w, t: ["prepare", "fashion-mnist", "--root", gzip_bomb(w, t), "--cache-dir", t / "c", "--quiet"],
     r"has more than 31376 bytes but its header \(dims \(40, 28, 28\)\) says 31376"),
    ("prepare-idx-huge-header", lambda w, t: ["prepare", "fashion-mnist", "--root", idx_copy(w, t, struct.pack(">IIII", 2051, 2**31, 4096, 4096)),
                                              "--cache-dir", t / "c", "--quiet"], r"announces \d+ bytes of data.*header is damaged"),
    ("prepare-cache-dir-under-a-file", lambda w, t: _prep(w, "--cache-dir", file_blocker(t) / "c"), r"blocker"),
    ("prepare-cache-dir-is-a-file", lambda w, t: _prep(w, "--cache-dir", file_blocker(t)), r"blocker"),
    # ---- prepare: image folders
    ("prepare-empty-class", lambda w, t: ["prepare", "imagefolder", "--root", image_folder(t, empty_class=True), "--resolution", "8",
                                          "--cache-dir", t / "c", "--workers", "1", "--quiet"], r"class folder .*emu has no images"),
    ("prepare-non-image-png", lambda w, t: ["prepare", "imagefolder", "--root", image_folder(t, bad_png=True), "--resolution", "8",
                                            "--cache-dir", t / "c", "--workers", "1", "--quiet"], r"cannot read image .*9\.png.*--skip-bad"),
    # ---- prepare: a damaged cache is refused on reuse
    ("prepare-reuse-images-changed", lambda w, t: (flip_byte(copy_cache(w, t)[1] / "images.npy"),
                                                   _prep(w, "--resolution", "16", "--cache-dir", t / "c"))[-1],
     r"images\.npy is corrupt.*lddpm prepare fashion-mnist .*--overwrite"),
    ("prepare-reuse-labels-changed", lambda w, t: (flip_byte(copy_cache(w, t)[1] / "labels.npy"),
                                                   _prep(w, "--resolution", "16", "--cache-dir", t / "c"))[-1],
     r"labels\.npy is corrupt.*--overwrite"),
    ("prepare-reuse-checksum-edited", lambda w, t: (edit_manifest(copy_cache(w, t)[1], lambda m: m.update(checksum="0" * 64)),
                                                    _prep(w, "--resolution", "16", "--cache-dir", t / "c"))[-1],
     r"manifest\.json was edited.*--overwrite"),
    ("prepare-reuse-array-hash-edited", lambda w, t: (edit_manifest(copy_cache(w, t)[1], lambda m: m["arrays"]["images.npy"].update(sha256="1" * 64)),
                                                      _prep(w, "--resolution", "16", "--cache-dir", t / "c"))[-1],
     r"manifest\.json was edited"),
    ("prepare-reuse-truncated", lambda w, t: ((lambda f: f.write_bytes(f.read_bytes()[:-16]))(copy_cache(w, t)[1] / "images.npy"),
                                              _prep(w, "--resolution", "16", "--cache-dir", t / "c"))[-1],
     r"images\.npy has \d+ bytes, the manifest says \d+"),
    ("prepare-manifest-missing-count", lambda w, t: (edit_manifest(copy_cache(w, t)[1], lambda m: m.pop("count")),
                                                     _prep(w, "--resolution", "16", "--cache-dir", t / "c"))[-1],
     r"manifest\.json: the manifest has no 'count' entry"),
    ("prepare-manifest-not-json", lambda w, t: ((copy_cache(w, t)[1] / "manifest.json").write_text("{oops"),
                                                _prep(w, "--resolution", "16", "--cache-dir", t / "c"))[-1],
     r"cannot read .*manifest\.json"),
    ("prepare-verify-damaged", lambda w, t: (flip_byte(copy_cache(w, t)[1] / "images.npy", 500),
                                             _prep(w, "--resolution", "16", "--cache-dir", t / "c", "--verify"))[-1],
     r"images\.npy is corrupt"),
    # ---- verify-cache
    ("verify-cache-damaged", lambda w, t: (flip_byte(copy_cache(w, t)[1] / "images.npy", 300),
                                           ["verify-cache", t / "c" / w.prepared.name])[-1], r"images\.npy is corrupt"),
    ("verify-cache-not-a-cache", lambda w, t: ["verify-cache", t], r"is not a prepared cache \(no manifest\.json\)"),
    ("verify-cache-no-args", lambda w, t: ["verify-cache"], r"the following arguments are required: CACHE_DIR"),
    # ---- train / train-vae
    ("train-missing-config", lambda w, t: ["train", t / "nope.toml", "--quiet"], r"config file .*nope\.toml not found"),
    ("train-broken-toml", lambda w, t: ["train", bad_toml(t, "[run\nsteps = "), "--quiet"], r"not valid TOML"),
    ("train-override-wrong-type", lambda w, t: _train(w, t, 'model.overrides.model_channels="abc"'),
     r"model_channels = 'abc': expected an integer.*model\.overrides\.model_channels"),
    ("train-override-list-type", lambda w, t: _train(w, t, 'model.overrides.channel_mult="x"'), r"channel_mult = 'x': expected a list of integers"),
    ("train-override-float-type", lambda w, t: _train(w, t, "model.overrides.dropout=true"), r"dropout = True: expected a finite number"),
    ("train-override-unknown-key", lambda w, t: _train(w, t, "model.overrides.width=3"), r"unknown UNetConfig field\(s\) 'width'"),
    ("train-guidance-nan", lambda w, t: _train(w, t, "run.guidance_scale=nan"), r"run\.guidance_scale = nan: expected a finite number"),
    ("train-guidance-inf", lambda w, t: _train(w, t, "run.guidance_scale=inf"), r"run\.guidance_scale = inf"),
    ("train-timesteps-huge", lambda w, t: _train(w, t, "diffusion.num_timesteps=2000000000"), r"diffusion\.num_timesteps = 2000000000 is out of range"),
    ("train-resolution-0", lambda w, t: _train(w, t, "data.resolution=0"), r"data\.resolution = 0 is out of range"),
    ("train-resolution-huge", lambda w, t: _train(w, t, "data.resolution=100000"), r"data\.resolution = 100000 is out of range"),
    ("train-set-no-equals", lambda w, t: _train(w, t, "run.steps"), r"must look like section\.key=value"),
    ("train-set-unknown-key", lambda w, t: _train(w, t, "run.stepz=3"), r"stepz"),
    ("train-negative-lr", lambda w, t: _train(w, t, "optim.lr=-1.0"), r"optim\.lr = -1\.0"),
    ("train-nproc-type", lambda w, t: ["train", _train_cfg(w), "--nproc", "two"], r"argument --nproc: invalid int value: 'two'"),
    ("train-nproc-0", lambda w, t: ["train", _train_cfg(w), "--nproc", "0"], r"--nproc must be >= 1"),
    ("train-out-under-a-file", lambda w, t: ["train", _train_cfg(w), "--out", file_blocker(t) / "run", "--quiet"], r"blocker"),
    ("train-resume-nothing", lambda w, t: ["train", "--resume", "--out", t / "empty", "--quiet"], r"config"),
    ("train-resume-nan-checkpoint", lambda w, t: ["train", "--resume", "--out", copy_run(w, t, tensors=nan_weights),
                                                  "--set", "run.steps=2", "--quiet"], r"contains NaN or infinity"),
    ("train-resume-float16-checkpoint", lambda w, t: ["train", "--resume", "--out", copy_run(w, t, tensors=half_weights),
                                                      "--set", "run.steps=2", "--quiet"], r"is float16, but lddpm checkpoints hold float32"),
    ("train-resume-tensors-do-not-fit", lambda w, t: ["train", "--resume", "--out", copy_run(w, t, tensors=wrong_shape),
                                                      "--set", "run.steps=2", "--quiet"], r"do not fit|size mismatch|shape"),
    ("train-vae-recon-loss", lambda w, t: ["train-vae", "vae-fashion-quick", "--out", t / "v", "--set", 'vae.recon_loss="l3"', "--quiet"],
     r"vae\.recon_loss = 'l3' is not allowed"),
    ("train-vae-override-type", lambda w, t: ["train-vae", "vae-fashion-quick", "--out", t / "v", "--set",
                                              'model.overrides.base_channels="wide"', "--quiet"], r"base_channels = 'wide': expected an integer"),
    ("train-vae-unknown-preset", lambda w, t: ["train-vae", "vae-nope", "--quiet"], r"unknown preset 'vae-nope'"),
    # ---- sample
    ("sample-missing-run", lambda w, t: _sample(w, t, run=t / "no-run"), r"does not exist"),
    # ---- edit / inpaint / upscale / denoise (docs/editing.md)
    ("edit-strength-above-1", lambda w, t: _edit(w, t, "edit", "--strength", "1.5"), r"--strength 1.5 is outside \[0, 1\]"),
    ("edit-strength-negative", lambda w, t: _edit(w, t, "edit", "--strength=-0.2"), r"--strength -0.2 is outside \[0, 1\]"),
    ("edit-strength-nan", lambda w, t: _edit(w, t, "edit", "--strength", "nan"), r"--strength nan is outside \[0, 1\]"),
    ("edit-no-strength", lambda w, t: _edit(w, t, "edit"), r"the following arguments are required: --strength"),
    ("edit-missing-image", lambda w, t: _edit(w, t, "edit", "--strength", "0.5", inputs=[t / "nowhere.png"]),
     r"image .*nowhere\.png does not exist"),
    ("edit-wrong-size", lambda w, t: _edit(w, t, "edit", "--strength", "0.5", inputs=[png_file(t, size=28)]),
     r"images are 28x28 pixels, but this run takes 16x16; resize or pad them"),
    ("edit-wrong-channels", lambda w, t: _edit(w, t, "edit", "--strength", "0.5", inputs=[png_file(t, mode="RGB")]),
     r"images have 3 channels, but this run's images have 1 \(grey\)"),
    ("edit-not-an-image", lambda w, t: _edit(w, t, "edit", "--strength", "0.5",
                                             inputs=[(t / "x.png").write_text("text") and t / "x.png"]),
     r"x\.png is not a readable image"),
    ("edit-npz-without-images", lambda w, t: _edit(w, t, "edit", "--strength", "0.5", inputs=[
        (np.savez(t / "in.npz", a=np.zeros((1, 16, 16), np.uint8), b=np.zeros(3)), t / "in.npz")[1]]),
     r"in\.npz has no `images` array \(found: a, b\)"),
    ("inpaint-missing-mask", lambda w, t: _edit(w, t, "inpaint", "--mask", t / "nomask.png"), r"mask .*nomask\.png does not exist"),
    ("inpaint-mask-size", lambda w, t: _edit(w, t, "inpaint", "--mask", png_file(t, "m.png", size=8, value=0)),
     r"the mask is 8x8 pixels but the images are 16x16"),
    ("inpaint-mask-not-binary", lambda w, t: _edit(w, t, "inpaint", "--mask", png_file(t, "m.png")),
     r"the mask is not binary: it holds the value \d+ besides 0 and 255.*white = regenerate"),
    ("inpaint-mask-count", lambda w, t: _edit(w, t, "inpaint", "--mask", png_file(t, "m1.png", value=0),
                                              png_file(t, "m2.png", value=255)), r"2 masks for 1 images"),
    ("inpaint-model-on-a-generating-run", lambda w, t: _edit(w, t, "inpaint", "--mask", png_file(t, "m.png", value=0),
                                                             "--method", "model"),
     r"trained for task 'generate', not 'inpaint'"),
    ("inpaint-resamplings-0", lambda w, t: _edit(w, t, "inpaint", "--mask", png_file(t, "m.png", value=0), "--resamplings", "0"),
     r"--resamplings = 0 is out of range"),
    ("upscale-not-trained-for-it", lambda w, t: _edit(w, t, "upscale", inputs=[png_file(t, size=4)]),
     r"trained for task 'generate', not 'super-resolution'.*task.kind = 'super-resolution'"),
    ("upscale-missing-run", lambda w, t: ["upscale", t / "no-run", png_file(t, size=4), "--out-dir", t / "o", "--quiet"],
     r"does not exist"),
    ("denoise-negative-sigma", lambda w, t: _edit(w, t, "denoise", "--sigma=-0.1"), r"--sigma -0.1 must be a noise std >= 0"),
    ("denoise-sigma-beyond-schedule", lambda w, t: _edit(w, t, "denoise", "--sigma", "1e9"),
     r"beyond this schedule's largest level"),
    ("denoise-wrong-size", lambda w, t: _edit(w, t, "denoise", "--sigma", "0.1", inputs=[png_file(t, size=32)]),
     r"noisy images are 32x32 pixels, but this run takes 16x16"),
    ("sample-guidance-nan", lambda w, t: _sample(w, t, "--guidance-scale", "nan"), r"--guidance-scale = nan: expected a finite number"),
    ("sample-guidance-inf", lambda w, t: _sample(w, t, "--guidance-scale", "inf"), r"--guidance-scale = inf"),
    ("sample-guidance-minus-inf", lambda w, t: _sample(w, t, "--guidance-scale=-inf"), r"--guidance-scale = -inf"),
    ("sample-guidance-type", lambda w, t: _sample(w, t, "--guidance-scale", "strong"), r"argument --guidance-scale: invalid float value"),
    ("sample-eta-nan", lambda w, t: _sample(w, t, "--eta", "nan"), r"--eta = nan"),
    ("sample-num-0", lambda w, t: _sample(w, t) + ["--num", "0"], r"--num must be >= 1"),
    ("sample-num-type", lambda w, t: _sample(w, t) + ["--num", "many"], r"argument --num: invalid int value: 'many'"),
    ("sample-steps-0", lambda w, t: _sample(w, t) + ["--steps", "0"], r"--steps = 0 is out of range"),
    ("sample-batch-size-0", lambda w, t: _sample(w, t, "--batch-size", "0"), r"--batch-size = 0 is out of range"),
    ("sample-class-out-of-range", lambda w, t: _sample(w, t, "--class", "99"), r"--class 99 is out of range"),
    ("sample-unknown-class-name", lambda w, t: _sample(w, t, "--class-name", "Unicorn"), r"unknown class"),
    ("sample-unknown-sampler", lambda w, t: _sample(w, t, "--sampler", "lms"), r"unknown sampler"),
    ("sample-nan-checkpoint", lambda w, t: _sample(w, t, run=copy_checkpoint(w, t, tensors=nan_weights)), r"bad\.safetensors: tensor .* contains NaN"),
    ("sample-inf-checkpoint", lambda w, t: _sample(w, t, run=copy_checkpoint(w, t, tensors=inf_weight)), r"contains NaN or infinity"),
    ("sample-float16-checkpoint", lambda w, t: _sample(w, t, run=copy_checkpoint(w, t, tensors=half_weights)), r"is float16"),
    ("sample-wrong-shape-checkpoint", lambda w, t: _sample(w, t, run=copy_checkpoint(w, t, tensors=wrong_shape)), r"bad\.safetensors|do not fit|shape"),
    ("sample-checkpoint-meta-missing-config", lambda w, t: _sample(w, t, run=copy_checkpoint(w, t, header=lambda h: h["meta"].pop("config"))),
     r"bad\.safetensors: the checkpoint metadata has no 'config' entry"),
    ("sample-checkpoint-no-structure", lambda w, t: _sample(w, t, run=copy_checkpoint(w, t, header=lambda h: h.pop("structure"))),
     r"bad\.safetensors is damaged: its lddpm metadata has no 'structure' table"),
    ("sample-pickle-checkpoint", lambda w, t: (torch.save({"w": torch.zeros(2)}, t / "x.pt"), _sample(w, t, run=t / "x.pt"))[-1],
     r"never loads pickled files"),
    ("sample-truncated-checkpoint", lambda w, t: ((t / "cut.safetensors").write_bytes(w.checkpoint.read_bytes()[:5000]),
                                                  _sample(w, t, run=t / "cut.safetensors"))[-1], r"cut\.safetensors is not a readable lddpm checkpoint"),
    ("sample-out-is-a-folder", lambda w, t: ["sample", w.run, "--out", t, "--num", "1", "--steps", "1", "--device", "cpu", "--quiet"],
     r"cannot write .*: is a directory|folder"),
    ("sample-out-under-a-file", lambda w, t: ["sample", w.run, "--out", file_blocker(t) / "g.png", "--num", "1", "--steps", "1",
                                              "--device", "cpu", "--quiet"], r"blocker"),
    ("sample-class-and-name", lambda w, t: _sample(w, t, "--class", "1", "--class-name", "Trouser"), r"not allowed with argument"),
    # ---- eval
    ("eval-no-mode", lambda w, t: _eval(w, t, run=False), r"give exactly one of"),
    ("eval-guidance-nan", lambda w, t: _eval(w, t, "--guidance-scale", "nan", run=w.run), r"--guidance-scale = nan"),
    ("eval-guidance-inf", lambda w, t: _eval(w, t, "--guidance-scale", "inf", run=w.run), r"--guidance-scale = inf"),
    ("eval-num-0", lambda w, t: _eval(w, t, run=w.run) + ["--num", "0"], r"--num = 0 is out of range"),
    ("eval-labels-choice", lambda w, t: _eval(w, t, "--labels", "random", run=w.run), r"argument --labels: invalid choice"),
    ("eval-images-without-reference", lambda w, t: _eval(w, t, "--images", png_folder(t, False), run=False), r"--images needs --reference"),
    ("eval-images-non-image-png", lambda w, t: _eval(w, t, "--images", png_folder(t, True), "--reference", "fashion-mnist:train", run=False),
     r"5\.png"),
    ("eval-images-missing", lambda w, t: _eval(w, t, "--images", t / "none.npz", "--reference", "fashion-mnist:train", run=False),
     r"none\.npz"),
    ("eval-nan-checkpoint", lambda w, t: _eval(w, t, run=copy_checkpoint(w, t, tensors=nan_weights)), r"contains NaN or infinity"),
    ("eval-missing-inception", lambda w, t: _eval(w, t, run=w.run)[:1] + [w.run, "--inception", t / "net.pt", "--quiet"], r"net\.pt"),
    ("eval-classifier-meta-missing-key", lambda w, t: _eval(w, t, run=w.run)[:-1] + ["--classifier", damaged_classifier(t, {}, {"w": torch.zeros(1)}), "--quiet"],
     r"the classifier in .*clf.* is damaged \(KeyError: 'architecture'\).*train-classifier"),
    ("eval-classifier-weights-do-not-fit", lambda w, t: _eval(w, t, run=w.run)[:-1] + ["--classifier", damaged_classifier(
        t, {"architecture": {"in_channels": 1, "num_classes": 10}}, {"w": torch.zeros(1)}), "--quiet"], r"the classifier in .*clf.* is damaged"),
    # ---- fid-ref
    ("fid-ref-reference-manifest-not-json", lambda w, t: _fidref(w, t, "--num", "16", "--resolution", "16", "--out",
                                                                damaged_reference(w, t, manifest="{oops")), r"cannot read .*ref\.json.*--rebuild"),
    ("fid-ref-reference-npz-garbage", lambda w, t: _fidref(w, t, "--num", "16", "--resolution", "16", "--out",
                                                           damaged_reference(w, t, npz=b"PK not a zip")), r"cannot read .*ref\.npz.*--rebuild"),
    ("fid-ref-reference-npz-pickle", lambda w, t: (np.save(t / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True),
                                                   _fidref(w, t, "--num", "16", "--resolution", "16", "--out",
                                                           damaged_reference(w, t, npz=(t / "obj.npy").read_bytes())))[-1],
     r"cannot read .*ref\.npz"),
    ("fid-ref-num-type", lambda w, t: _fidref(w, t, "--num", "all"), r"argument --num: invalid int value: 'all'"),
    ("fid-ref-num-missing", lambda w, t: _fidref(w, t), r"the following arguments are required: --num"),
    ("fid-ref-num-negative", lambda w, t: _fidref(w, t, "--num", "-3"), r"--num = -3 is out of range"),
    ("fid-ref-resolution-0", lambda w, t: _fidref(w, t, "--num", "8", "--resolution", "0"), r"--resolution = 0 is out of range"),
    ("fid-ref-dataset-choice", lambda w, t: ["fid-ref", "imagenet", "--num", "4"], r"argument dataset: invalid choice"),
    # ---- train-classifier
    ("classifier-epochs-nan", lambda w, t: _clf(w, t, "--epochs", "nan"), r"--epochs = nan"),
    ("classifier-lr-negative", lambda w, t: _clf(w, t, "--lr", "-0.1"), r"--epochs and --lr must be positive"),
    ("classifier-resolution-huge", lambda w, t: _clf(w, t, "--resolution", "9000"), r"--resolution = 9000 is out of range"),
    ("classifier-batch-0", lambda w, t: _clf(w, t, "--batch-size", "0"), r"--batch-size = 0 is out of range"),
    # ---- study / demo
    ("study-missing-file", lambda w, t: ["study", t / "nope.toml", "--quiet"], r"study file .*not found"),
    ("study-broken-toml", lambda w, t: ["study", bad_toml(t, "[study\n"), "--quiet"], r"not valid TOML"),
    ("study-unknown-table", lambda w, t: ["study", bad_toml(t, "[studdy]\nname = 'x'\n"), "--quiet"], r"unknown top-level table"),
    ("study-undefined-run", lambda w, t: ["study", bad_toml(t, "[runs.a]\nconfig = 'x'\n[[cells]]\nname = 'c'\nrun = 'b'\n"), "--quiet"],
     r"run 'b' is not defined"),
    ("study-nan-guidance", lambda w, t: ["study", bad_toml(t, "[runs.a]\nconfig = 'fashion-quick'\n[[cells]]\nname = 'c'\nrun = 'a'\n"
                                                         "guidance_scale = nan\n"), "--quiet"], r"cell 'c': guidance_scale = nan"),
    ("study-zero-steps", lambda w, t: ["study", bad_toml(t, "[runs.a]\nconfig = 'fashion-quick'\n[[cells]]\nname = 'c'\nrun = 'a'\n"
                                                       "steps = 0\n"), "--quiet"], r"cell 'c': steps = 0 is out of range"),
    ("study-damaged-cell-file", lambda w, t: ["study", w.study / "toy.toml", "--out", damaged_cell(t), "--report-only", "--quiet"],
     r"cannot read .*cells/ddim\.json: it is damaged.*delete it"),
    ("study-nproc-0", lambda w, t: ["study", w.study / "toy.toml", "--nproc", "0", "--out", t / "s", "--quiet"], r"--nproc must be >= 1"),
    ("study-out-under-a-file", lambda w, t: ["study", w.study / "toy.toml", "--out", file_blocker(t) / "s", "--quiet"], r"blocker"),
    ("demo-out-under-a-file", lambda w, t: ["demo", "--out", file_blocker(t) / "d", "--quiet"], r"blocker"),
    ("demo-out-is-a-file", lambda w, t: ["demo", "--out", file_blocker(t), "--quiet"], r"blocker"),
    ("demo-unknown-option", lambda w, t: ["demo", "--steps", "3"], r"^lddpm: error: unrecognized arguments: --steps 3"),
    # ---- import / export (diffusers folders)
    ("import-not-a-folder", lambda w, t: ["import", t / "nowhere", "--out", t / "run"], r"nowhere is not a folder"),
    ("import-no-model", lambda w, t: ["import", w.idx, "--out", t / "run"], r"holds no unet/, transformer/ or vae/ folder"),
    ("import-no-out", lambda w, t: ["import", w.idx], r"the following arguments are required: --out"),
    ("export-not-a-run", lambda w, t: ["export", t / "nowhere", "--out", t / "hf"], r"nowhere does not exist"),
    ("export-weights-choice", lambda w, t: ["export", w.run, "--out", t / "hf", "--weights", "raw"],
     r"argument --weights: invalid choice: 'raw'"),
    ("export-out-not-empty", lambda w, t: (file_blocker(t), ["export", w.run, "--out", t])[-1],
     r"already exists and is not empty"),
    # ---- ema (post-hoc EMA reconstruction)
    ("ema-missing-run", lambda w, t: ["ema", t / "no-run", "--sigma-rel", "0.08"], r"run folder .*no-run does not exist"),
    ("ema-no-snapshots", lambda w, t: ["ema", w.run, "--sigma-rel", "0.08"], r"has no post-hoc EMA snapshots"),
    ("ema-many-widths-one-file", lambda w, t: ["ema", w.run, "--sigma-rel", "0.05", "0.1", "--out", t / "x.safetensors"],
     r"names one file, but 2 --sigma-rel values were given"),
    ("ema-no-width", lambda w, t: ["ema", w.run], r"the following arguments are required: --sigma-rel"),
    # ---- serve (each refused before the server starts)
    ("serve-no-run", lambda w, t: ["serve"], r"the following arguments are required: RUN"),
    ("serve-missing-run", lambda w, t: ["serve", t / "no-run", "--port", "0"], r"no-run does not exist"),
    ("serve-not-a-checkpoint", lambda w, t: ["serve", file_blocker(t), "--port", "0"],
     r"blocker is not a readable lddpm checkpoint"),
    ("serve-port-out-of-range", lambda w, t: ["serve", w.run, "--port", "70000"],
     r"--port = 70000 is out of range: expected an integer between 0 and 65535"),
    ("serve-port-type", lambda w, t: ["serve", w.run, "--port", "http"], r"argument --port: invalid int value: 'http'"),
    ("serve-port-in-use", lambda w, t: ["serve", w.run, "--port", _busy_port()],
     r"port \d+ on 127.0.0.1 is already in use; choose another --port"),
    ("serve-unknown-host", lambda w, t: ["serve", w.run, "--port", "0", "--host", "no-such-host.invalid"],
     r"--host 'no-such-host.invalid' is not an address or a known host name"),
    ("serve-bf16", lambda w, t: ["serve", w.run, "--bf16", "maybe"], r"--bf16 must be true, false or auto"),
]


@pytest.mark.parametrize("name,build,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(name, build, pattern, world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LDDPM_CACHE", str(tmp_path / "default-cache"))
    argv = [str(a) for a in build(world, tmp_path)]
    good, own = tree_hashes(world.base), tree_hashes(tmp_path)
    capsys.readouterr()
    status = run_cli(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    expected = "lddpm: error: " if pattern.startswith("^lddpm: error") else f"lddpm {argv[0]}: error: "
    assert lines[0].startswith(expected), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    print(f"{name}: {lines[0]}")
    assert tree_hashes(world.base) == good
    assert {k: v for k, v in tree_hashes(tmp_path).items() if k in own} == own  # the case's files unchanged


def test_cases_cover_every_command():
    """Every command the parser registers has cases (named `<command>-...`; train-classifier's `classifier-...`)."""
    import argparse

    from lddpm.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    commands = set(sub.choices)
    assert {"import", "export", "verify-cache", "train", "sample", "eval", "study"} <= commands
    assert len(CASES) >= 60
    prefix = {c: "classifier" if c == "train-classifier" else c for c in commands}
    missing = [c for c in sorted(commands) if not any(name.startswith(prefix[c] + "-") for name, _, _ in CASES)]
    assert not missing, f"no bad-input case for: {missing}"


# ------------------------------------------------------------------------------------------------
# a real programming error keeps its traceback (exit 1 through Python), it is not turned into a line


def test_a_bug_is_not_swallowed(monkeypatch):
    import lddpm.commands.data as data_cmd

    def buggy(args):
        raise TypeError("a bug")

    monkeypatch.setattr(data_cmd, "run_prepare", buggy)
    with pytest.raises(TypeError, match="a bug"):
        main(["prepare", "mnist"])


@pytest.mark.parametrize("exc,pattern", [
    (MemoryError("Unable to allocate 7.45 TiB for an array with shape (100000, 100000, 100000)"), r"out of memory.*7\.45 TiB"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                  "800000000000 bytes"), r"out of memory.*800000000000 bytes.*lower the resolution"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/x.npy"), r"disk full while writing /data/x\.npy"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), r"permission denied: /root/x"),
])
def test_exhaustion_and_os_failures_are_one_line(exc, pattern, monkeypatch, capsys):
    import lddpm.commands.train as train_cmd

    def fail(args):
        raise exc

    monkeypatch.setattr(train_cmd, "_sample", fail)
    assert run_cli(["sample", "run"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(r"^lddpm sample: error: " + pattern, err), err


def test_an_unexpected_runtime_error_keeps_its_traceback(monkeypatch):
    import lddpm.commands.train as train_cmd

    def fail(args):
        raise RuntimeError("shape bug in the sampler")

    monkeypatch.setattr(train_cmd, "_sample", fail)
    with pytest.raises(RuntimeError, match="shape bug"):
        main(["sample", "run"])


# ------------------------------------------------------------------------------------------------
# full disk: the previous good file stays, the message says "disk full"


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_a_checkpoint_save_keeps_the_previous_one(world, tmp_path, monkeypatch):
    from lddpm.checkpoint import load_checkpoint, save_run_checkpoint

    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    before = tree_hashes(run)
    groups = {"model": {"w": torch.ones(3)}}
    monkeypatch.setattr(os, "replace", _enospc)
    with pytest.raises(LddpmError, match="disk full while writing .*step_0000009.safetensors"):
        save_run_checkpoint(run, 9, groups, {"step": 9}, keep=1)
    monkeypatch.undo()
    assert tree_hashes(run) == before  # no temp file left, the old checkpoint and pointer intact
    assert load_checkpoint(run).meta["step"] == 1


def test_disk_full_during_prepare_keeps_the_previous_cache(world, tmp_path, monkeypatch, capsys):
    shutil.copytree(world.cache, tmp_path / "c")
    before = tree_hashes(tmp_path / "c")
    monkeypatch.setattr(np, "save", _enospc)
    status = run_cli(_prep(world, "--resolution", "16", "--cache-dir", tmp_path / "c", "--overwrite"))
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "disk full while writing" in err and world.prepared.name in err
    assert tree_hashes(tmp_path / "c") == before  # old cache intact, no temp folder left


def test_a_cache_larger_than_the_free_space_is_refused_before_writing(world, tmp_path, monkeypatch, capsys):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    status = run_cli(_prep(world, "--resolution", "64", "--cache-dir", tmp_path / "c"))
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert re.search(r"disk full: this cache needs 0\.00 GiB \(40 images of 64x64x1\) but .* has 0\.00 GiB free", err), err
    assert list((tmp_path / "c").iterdir()) == []  # no temp folder left


def test_sample_out_dir_is_written_atomically_and_a_full_disk_is_one_line(world, tmp_path, monkeypatch, capsys):
    assert run_cli(_sample(world, tmp_path, "--out-dir", tmp_path / "each")) == 0
    capsys.readouterr()
    before = tree_hashes(tmp_path)
    assert len([k for k in before if k.startswith("each/")]) == 2
    monkeypatch.setattr(os, "replace", _enospc)
    assert run_cli(_sample(world, tmp_path, "--out-dir", tmp_path / "each", "--seed", "1")) == 2
    err = capsys.readouterr().err
    assert re.search(r"^lddpm sample: error: disk full while writing .*grid\.png", err) and len(err.strip().splitlines()) == 1
    monkeypatch.undo()
    assert tree_hashes(tmp_path) == before


def test_disk_full_during_a_study_report_keeps_the_previous_report(world, tmp_path, monkeypatch, capsys):
    from lddpm import study as st

    out = tmp_path / "s"
    study = st.load_study(world.study / "toy.toml")
    rows = st.load_rows(study, out)
    st.write_report(study, rows, out, plots=False)
    before = tree_hashes(out)
    assert "results.md" in before
    monkeypatch.setattr(os, "replace", _enospc)
    status = run_cli(["study", world.study / "toy.toml", "--out", out, "--report-only", "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(r"^lddpm study: error: disk full while writing .*s/", err)
    monkeypatch.undo()
    assert {k: v for k, v in tree_hashes(out).items() if k in before} == before
    assert not [p for p in out.rglob(".*tmp-*")]


# ------------------------------------------------------------------------------------------------
# leftovers of killed writers are removed at the next start, and only those


def test_stale_checkpoint_temp_files_are_removed_and_nothing_else(world, tmp_path):
    from lddpm.checkpoint import clean_checkpoint_dir

    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    folder = run / "checkpoints"
    dead = folder / ".step_0000002.safetensors.tmp-999999999-0123abcd"  # no such process
    live = folder / f".step_0000003.safetensors.tmp-{os.getpid()}-0123abcd"  # a running writer
    lookalike = folder / "notes.tmp-1-0123abcd"  # not a name lddpm makes
    for p in (dead, live, lookalike):
        p.write_bytes(b"partial")
    good = tree_hashes(world.run)
    removed = clean_checkpoint_dir(run)
    assert removed == [dead] and not dead.exists() and live.exists() and lookalike.exists()
    assert {k: v for k, v in tree_hashes(run).items() if k in good} == good


def test_prepare_removes_a_killed_prepares_temp_folder(world, tmp_path):
    from lddpm.data import prepare

    shutil.copytree(world.cache, tmp_path / "c")
    stale = tmp_path / "c" / f".{world.prepared.name}.tmp-999999999-deadbeef"
    stale.mkdir()
    (stale / "images.npy").write_bytes(b"half")
    prepare("fashion-mnist", resolution=16, root=world.idx, cache_dir=tmp_path / "c", progress=False)
    assert not stale.exists()
    assert tree_hashes(tmp_path / "c") == tree_hashes(world.cache)


# ------------------------------------------------------------------------------------------------
# cache integrity: sampled check on large files, full check by verify-cache


def test_sampled_check_catches_a_change_in_a_sampled_block_and_verify_catches_any(tmp_path, monkeypatch):
    from lddpm.data import integrity

    monkeypatch.setattr(integrity, "FULL_HASH_BYTES", 1000)  # treat the file as large
    monkeypatch.setattr(integrity, "BLOCK_BYTES", 256)
    data = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8)
    np.save(tmp_path / "a.npy", data)
    record = integrity.array_record(tmp_path / "a.npy", data.shape, data.dtype)
    manifest = {"arrays": {"a.npy": record}, "checksum": integrity.combined_checksum({"a.npy": record}, ("a.npy",))}
    integrity.verify_arrays(tmp_path, manifest, ("a.npy",), fix="fix")
    size = (tmp_path / "a.npy").stat().st_size
    flip_byte(tmp_path / "a.npy", size - 1)  # the last block is always sampled
    with pytest.raises(LddpmError, match=r"\(sampled check\); fix"):
        integrity.verify_arrays(tmp_path, manifest, ("a.npy",), fix="fix")
    flip_byte(tmp_path / "a.npy", size - 1)
    middle = (size - 256) * 10 // 63 + 300  # between two sampled blocks: only the full hash sees it
    flip_byte(tmp_path / "a.npy", middle)
    integrity.verify_arrays(tmp_path, manifest, ("a.npy",), fix="fix")
    with pytest.raises(LddpmError, match="sha256 differs"):
        integrity.verify_arrays(tmp_path, manifest, ("a.npy",), fix="fix", full=True)


def test_verify_cache_accepts_good_image_and_latent_caches(world, tmp_path, capsys):
    from lddpm.data import encode_latents, open_cache

    class Encoder:
        def encode(self, x):
            class Posterior:
                mean = x[:, :, ::4, ::4]
                std = torch.ones_like(x[:, :, ::4, ::4])
            return Posterior()

    latents = encode_latents(Encoder(), open_cache(world.prepared), tmp_path / "lat", progress=False, vae_id="toy")
    assert run_cli(["verify-cache", world.prepared, latents]) == 0
    assert capsys.readouterr().out.count("every byte matches") == 2
    flip_byte(latents / "std.npy")
    assert run_cli(["verify-cache", latents]) == 2
    assert "std.npy is corrupt" in capsys.readouterr().err
