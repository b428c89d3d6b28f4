"""The shared conditioning module (lddpm.nn.conditioning): one class in both networks, and the refactor that
introduced it changed no computed value and no state-dict key of existing U-Nets and DiTs.

tests/data/network_reference.json holds, for a few non-text networks with deterministic (formula) weights,
their state-dict keys and shapes and their outputs, written by the code before the refactor with
`python tests/test_conditioning.py --write` (run it only when a change of the numbers is intended).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from lddpm.nn import build_network

REFERENCE = Path(__file__).resolve().parent / "data" / "network_reference.json"

CASES = {
    "unet-labels-learned-sigma": ("unet", "tiny", dict(resolution=16, in_channels=1, model_channels=16, norm_groups=4,
                                                       num_heads=2, num_classes=3, learned_sigma=True)),
    "unet-ho-options": ("unet", "tiny", dict(resolution=16, in_channels=2, model_channels=16, norm_groups=4,
                                                      use_scale_shift_norm=True, flip_sin_to_cos=False,
                                                      freq_shift=1.0, downsample_padding=0, norm_eps=1e-6)),
    "dit-labels-learned-sigma": ("dit", "dit-tiny/2", dict(resolution=8, in_channels=4, patch_size=2, hidden_size=32,
                                                           depth=2, num_heads=2, num_classes=5, learned_sigma=True)),
    "dit-unconditional-shift": ("dit", "dit-tiny/2", dict(resolution=8, in_channels=2, patch_size=2, hidden_size=24,
                                                          depth=2, num_heads=3, num_classes=0, freq_shift=1.0)),
}


def formula_weights(model: torch.nn.Module) -> None:
    """Set every parameter from a closed formula (no RNG): w_k = sin(1.7 k + i) / sqrt(fan_in) for tensor i."""
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(model.state_dict().items())):
            if not p.is_floating_point():
                continue
            k = torch.arange(p.numel(), dtype=torch.float64)
            fan_in = p[0].numel() if p.dim() > 1 else 10
            p.copy_((torch.sin(1.7 * k + i) / math.sqrt(fan_in)).reshape(p.shape))


def inputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A fixed batch of 3: x from a formula, timesteps 0/17/999, labels (last one null) when conditional."""
    shape = (3, model.in_channels, model.resolution, model.resolution)
    x = torch.sin(0.31 * torch.arange(math.prod(shape), dtype=torch.float64)).reshape(shape).float()
    t = torch.tensor([0, 17, 999])
    y = torch.tensor([0, model.num_classes - 1, model.num_classes]) if model.num_classes else None
    return x, t, y


def run_case(name: str) -> dict:
    kind, base, overrides = CASES[name]
    model = build_network(kind, base, **overrides).eval()
    formula_weights(model)
    x, t, y = inputs(model)
    with torch.no_grad():
        out = model(x, t, y)
    return {"keys": {k: list(v.shape) for k, v in model.state_dict().items()},
            "output_shape": list(out.shape), "output": out.flatten()[::7].tolist(),
            "output_mean": out.double().mean().item(), "output_abs_mean": out.double().abs().mean().item()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_and_keys_equal_the_networks_before_the_shared_conditioning(name):
    want = json.loads(REFERENCE.read_text())[name]
    got = run_case(name)
    assert got["keys"] == want["keys"]  # same names, order and shapes: checkpoints and converters still apply
    assert got["output_shape"] == want["output_shape"]
    assert got["output_abs_mean"] > 0.05  # a non-trivial output
    torch.testing.assert_close(torch.tensor(got["output"]), torch.tensor(want["output"]), rtol=1e-5, atol=1e-5)
    assert got["output_mean"] == pytest.approx(want["output_mean"], rel=1e-5, abs=1e-6)
    assert got["output_abs_mean"] == pytest.approx(want["output_abs_mean"], rel=1e-5)


if __name__ == "__main__" and "--write" in sys.argv:
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps({name: run_case(name) for name in sorted(CASES)}, indent=1) + "\n")
    print(f"wrote {REFERENCE}")
