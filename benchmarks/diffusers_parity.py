"""Import parity at full size: the DDPM CIFAR-10 U-Net (35.7M) and the SD kl-f8 autoencoder (83.7M).

Builds each diffusers model with random weights (every parameter perturbed at init scale), saves it
with `save_pretrained`, runs `lddpm import`, and reports the max abs difference of the outputs
(float32, same input) and whether export -> import gives bitwise-equal weights. diffusers is a
benchmark/test-only dependency. Prints a table and writes JSON.

    python benchmarks/diffusers_parity.py --out parity.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

DDPM_CIFAR10 = dict(sample_size=32, block_out_channels=[128, 256, 256, 256], layers_per_block=2,
                    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], attention_head_dim=None,
                    flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6)
SD_VAE = dict(sample_size=256, block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
              scaling_factor=0.18215)


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Noise at init scale on every parameter (so zero-initialised layers are not zero); eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((0.5 / p[0].numel() ** 0.5 if p.ndim > 1 else 0.05) * torch.randn(p.shape, generator=g))
    return model.eval()


def main() -> None:
    import diffusers

    from lddpm.checkpoint import load_checkpoint
    from lddpm.convert.runs import export_diffusers, import_diffusers
    from lddpm.pipeline import load_pipeline, load_vae

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae-resolution", type=int, default=64, help="input size for the autoencoder (default 64)")
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        unet = perturb(diffusers.UNet2DModel(**DDPM_CIFAR10), 0)
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        import_diffusers(tmp / "unet", tmp / "unet-run")
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([0, 10, 500, 999])
        with torch.no_grad():
            diff = float((load_pipeline(tmp / "unet-run").model(x, t) - unet(x, t).sample).abs().max())
        export_diffusers(tmp / "unet-run", tmp / "unet-out")
        import_diffusers(tmp / "unet-out", tmp / "unet-run2")
        a, b = load_checkpoint(tmp / "unet-run").load("ema"), load_checkpoint(tmp / "unet-run2").load("ema")
        rows.append({"model": "UNet2DModel ddpm-cifar10-32 shape", "params": sum(p.numel() for p in unet.parameters()),
                     "output": "eps, 4 x 3x32x32, t in {0,10,500,999}", "max_abs_diff": diff,
                     "round_trip_bitwise": all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()})
        del unet

        vae = perturb(diffusers.AutoencoderKL(**SD_VAE), 2)
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
        import_diffusers(tmp / "vae", tmp / "vae-run")
        ours = load_vae(tmp / "vae-run")
        r = args.vae_resolution
        x = torch.randn(1, 3, r, r, generator=torch.Generator().manual_seed(3))
        z = torch.randn(1, 4, r // 8, r // 8, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            enc = float((ours.encode(x).mean - vae.encode(x).latent_dist.mean).abs().max())
            dec = float((ours.decode(z) - vae.decode(z).sample).abs().max())
        export_diffusers(tmp / "vae-run", tmp / "vae-out")
        import_diffusers(tmp / "vae-out", tmp / "vae-run2")
        a, b = load_checkpoint(tmp / "vae-run").load("model"), load_checkpoint(tmp / "vae-run2").load("model")
        same = all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
        params = sum(p.numel() for p in vae.parameters())
        rows.append({"model": "AutoencoderKL sd-vae kl-f8 shape", "params": params,
                     "output": f"encoder mean, 1 x 3x{r}x{r}", "max_abs_diff": enc, "round_trip_bitwise": same})
        rows.append({"model": "AutoencoderKL sd-vae kl-f8 shape", "params": params,
                     "output": f"decoder, 1 x 4x{r // 8}x{r // 8}", "max_abs_diff": dec, "round_trip_bitwise": same})
    print(f"{'model':36s} {'params':>11s}  {'output':40s} {'max |diff|':>11s}  round trip bitwise")
    for row in rows:
        print(f"{row['model']:36s} {row['params']:11,d}  {row['output']:40s} {row['max_abs_diff']:11.3g}  "
              f"{row['round_trip_bitwise']}")
    if args.out:
        write_json({"benchmark": "diffusers_parity", "rows": rows, "environment": environment()}, args.out)


if __name__ == "__main__":
    main()
