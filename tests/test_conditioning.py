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
from lddpm.nn.conditioning import Conditioning

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


def test_one_conditioning_class_in_both_networks_and_its_parts_are_the_networks_parts():
    unet = build_network("unet", "tiny", resolution=16, num_classes=3)
    dit = build_network("dit", "dit-tiny/2", num_classes=0)
    assert type(unet.conditioning) is type(dit.conditioning) is Conditioning
    for net in (unet, dit):
        for name, part in net.conditioning.parts().items():
            assert getattr(net, name) is part  # registered under the historic names, the same objects
        assert not any(n.startswith("conditioning.") for n in net.state_dict())  # each tensor once
    assert dit.label_embed is None and unet.context_embed is None and dit.context_embed is None
    # the U-Net embeds model_channels frequencies into 4 x model_channels, the DiT 256 into hidden_size
    assert unet.time_embed[0].weight.shape == (4 * 32, 32) and dit.time_embed[0].weight.shape == (96, 256)


def test_moving_and_copying_a_network_keeps_its_conditioning_in_step():
    """The conditioning module is not a registered child: dtype moves, copies and state loads must still reach
    the tensors it computes with."""
    import copy

    net = build_network("dit", "dit-tiny/2").double()
    assert net.conditioning.time_embed[0].weight.dtype == torch.float64
    twin = copy.deepcopy(net)
    assert twin.conditioning.time_embed is twin.time_embed and twin.time_embed is not net.time_embed
    with torch.no_grad():
        twin.time_embed[2].bias.add_(1.0)
    net.load_state_dict(twin.state_dict())
    assert torch.equal(net.conditioning.time_embed[2].bias, twin.time_embed[2].bias)
    x, t = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([5, 600])
    assert torch.equal(net(x, t, torch.tensor([1, 10])), twin(x, t, torch.tensor([1, 10])))


def test_the_timestep_and_label_embedding_is_the_mlp_of_the_sinusoid_plus_the_table_row():
    cond = Conditioning(frequencies=8, dim=12, num_classes=3, network="U-Net")
    t, y = torch.tensor([0.0, 10.0, 999.0]), torch.tensor([0, 2, 3])
    emb, context = cond(t, y, batch=3, device=torch.device("cpu"))
    half = torch.arange(4) / 4
    args = t[:, None] * torch.exp(-math.log(10000.0) * half)[None]
    sinusoid = torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # [cos, sin] (ADM)
    want = cond.time_embed[2](torch.nn.functional.silu(cond.time_embed[0](sinusoid))) + cond.label_embed.weight[y]
    torch.testing.assert_close(emb, torch.nn.functional.silu(want))
    assert context is None
    null, _ = cond(t, None, batch=3, device=torch.device("cpu"))  # y=None means the null label (row 3)
    torch.testing.assert_close(null, cond(t, torch.tensor([3, 3, 3]), batch=3, device=torch.device("cpu"))[0])


if __name__ == "__main__" and "--write" in sys.argv:
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps({name: run_case(name) for name in sorted(CASES)}, indent=1) + "\n")
    print(f"wrote {REFERENCE}")
