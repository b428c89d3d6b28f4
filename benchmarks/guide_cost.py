"""What an autoguidance guide costs beside its main model: training compute and sampling cost per evaluation.

    python benchmarks/guide_cost.py --out benchmarks/results/guidance/guide-cost.json

Builds the networks of two presets exactly as `lddpm train` does for Fashion-MNIST 32x32 grey with 10 classes
(the main run `--main`, default fashion-30min, and its guide `--guide`, default fashion-guide) and times, in
this process's CPU time with the two networks called in turn each round (so the ratio survives other processes
on a shared machine; benchmarks/networks.py's `interleaved_times`): one training step (forward, MSE on the v
target, backward, Adam) at the presets' batch size, and one no-grad forward at the sampling batch, both in the
presets' precision here (bf16 autocast where the CPU has native bf16, as run.bf16 = "auto"). The guide's share
of the main run's training compute is (guide steps x guide step time) / (main steps x main step time); an
autoguided sampling step costs 1 + (guide forward / main forward) main-network evaluations.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lddpm.config import config_from_preset
from lddpm.distributed import use_bf16
from lddpm.nn import build_network
from lddpm.train.utils import network_overrides

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402
from networks import interleaved_times  # noqa: E402


def preset_network(name: str):
    """(config, network) of a preset on Fashion-MNIST 32x32 grey, 10 classes, as the trainer builds it."""
    config = config_from_preset(name)
    derived = {"resolution": 32, "in_channels": 1, "num_classes": 10 if config.run.class_conditional else 0,
               "learned_sigma": config.diffusion.learned_variance}
    return config, build_network(config.model.kind, config.model.name, **network_overrides(config, derived))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--main", default="fashion-30min")
    parser.add_argument("--guide", default="fashion-guide")
    parser.add_argument("--sample-batch", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    configs, nets = {}, {}
    for role, preset in (("main", args.main), ("guide", args.guide)):
        configs[role], nets[role] = preset_network(preset)
    batch = configs["main"].optim.batch_size
    if configs["guide"].optim.batch_size != batch:
        raise SystemExit("the two presets train at different batch sizes; this benchmark compares steps of one size")
    bf16 = use_bf16(configs["main"].run.bf16, torch.device("cpu"))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(batch, 1, 32, 32, generator=g), torch.randn(batch, 1, 32, 32, generator=g)
    t, y = torch.randint(0, 1000, (batch,), generator=g), torch.randint(0, 10, (batch,), generator=g)
    optims = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in nets.items()}

    def train_step(role: str) -> None:
        loss = F.mse_loss(nets[role](x, t, y).float(), target)
        optims[role].zero_grad(set_to_none=True)
        loss.backward()
        optims[role].step()

    train = interleaved_times({k: (lambda k=k: train_step(k)) for k in nets}, args.rounds, 2, True, autocast)
    xs = torch.randn(args.sample_batch, 1, 32, 32, generator=g)
    ts, ys = torch.full((args.sample_batch,), 500), torch.randint(0, 10, (args.sample_batch,), generator=g)
    for m in nets.values():
        m.eval()
    forward = interleaved_times({k: (lambda k=k: nets[k](xs, ts, ys)) for k in nets}, args.rounds, 1, False, autocast)
    steps = {k: configs[k].run.steps for k in nets}
    result = {
        "benchmark": "guide_cost", "command": [Path(sys.argv[0]).name, *sys.argv[1:]], "environment": environment(),
        "presets": {"main": args.main, "guide": args.guide}, "bf16_autocast": bf16, "batch": batch,
        "sample_batch": args.sample_batch, "rounds": args.rounds,
        "params": {k: sum(p.numel() for p in m.parameters()) for k, m in nets.items()},
        "steps": steps,
        "train_step_cpu_seconds": train,
        "forward_cpu_seconds_per_image": {k: v / args.sample_batch for k, v in forward.items()},
        "guide_train_step_over_main": train["guide"] / train["main"],
        "guide_forward_over_main": forward["guide"] / forward["main"],
        "guide_training_share_of_main": steps["guide"] * train["guide"] / (steps["main"] * train["main"]),
    }
    write_json(result, args.out)
    print(f"params main {result['params']['main']:,} guide {result['params']['guide']:,}; training step guide/main "
          f"{result['guide_train_step_over_main']:.3f}, forward guide/main {result['guide_forward_over_main']:.3f}; "
          f"guide training = {100 * result['guide_training_share_of_main']:.1f}% of the main run's")


if __name__ == "__main__":
    main()
