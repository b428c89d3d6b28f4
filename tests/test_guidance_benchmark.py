"""benchmarks/guidance.py end to end at its smallest size (slow: trains two tiny runs and spawns a process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ConvFeatures, write_random_idx

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.slow
def test_guidance_benchmark_writes_a_row_file_per_setting_and_the_summary(tmp_path):
    from lddpm.config import apply_overrides, config_from_preset
    from lddpm.train import train

    root, cache = write_random_idx(tmp_path / "idx"), tmp_path / "cache"
    for name, steps in (("main", 2), ("guide", 1)):
        train(apply_overrides(config_from_preset("fashion-quick"), [
            f"data.root={json.dumps(str(root))}", f"data.cache_dir={json.dumps(str(cache))}", "data.resolution=8",
            "optim.batch_size=4", "optim.warmup_steps=1", f"run.steps={steps}", "run.sample_every=0",
            'run.device="cpu"', "model.overrides={model_channels=8, channel_mult=[1], attention_resolutions=[]}"]),
            tmp_path / name, progress=False)
    net = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(ConvFeatures()), str(net))
    out = tmp_path / "bench"
    command = [sys.executable, str(REPO / "benchmarks" / "guidance.py"), str(tmp_path / "main"), "--guide",
               str(tmp_path / "guide"), "--num", "8", "--steps", "4", "--cfg-scales", "2", "--guide-scales", "2",
               "--both", "2:1.5", "--interval", "0.5", "inf", "--sigma-min", "0.3", "--reference", "fashion-mnist:train", "--batch-size", "4",
               "--bf16", "false", "--classifier", "none", "--inception", str(net), "--cache-dir", str(cache),
               "--data-root", str(root), "--floor", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "guidance.json").read_text())
    names = [r["name"] for r in summary["rows"]]
    assert names == ["none", "cfg-s2", "ag-w2", "both-s2-w1.5", "cfg-s2-interval", "ag-w2-interval",
                     "both-s2-w1.5-interval"]
    nfe = {r["name"]: r["nfe"] for r in summary["rows"]}
    assert nfe["none"] == 4 and nfe["cfg-s2"] == 8 and nfe["ag-w2"] == 8 and nfe["both-s2-w1.5"] == 12
    assert nfe["none"] < nfe["cfg-s2-interval"] < nfe["cfg-s2"]           # the interval saves evaluations
    for r in summary["rows"]:
        full = json.loads((out / r["file"]).read_text())
        assert full["fid"] == r["fid"] and full["settings"]["num"] == 8    # each row is lddpm eval's full JSON
        assert full["settings"]["sampler_options"]["sigma_min"] == 0.3
    assert summary["environment"]["torch"] and summary["floor"]["num"] == 8
    assert summary["sampler_options"] == {"sigma_min": 0.3}
    assert not (out / "samples").exists() and "| cfg-s2-interval | 2 | 1 | [0.5, inf] |" in (out / "table.md").read_text()
    # no upper bound: null in the JSON (strict JSON has no Infinity)
    assert "Infinity" not in (out / "guidance.json").read_text() and summary["settings"]["interval"] == [0.5, None]
    assert {tuple(r["interval"]) for r in summary["rows"] if r["interval"]} == {(0.5, None)}
    # --no-ema: the run's raw weights (after 2 steps they differ from the EMA, so the baseline's samples do too)
    raw = tmp_path / "raw"
    base = command[:command.index("--cfg-scales")] + ["--cfg-scales", "--guide-scales"]
    proc = subprocess.run(base + command[command.index("--interval"):-1] + [str(raw), "--no-ema"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw_summary = json.loads((raw / "guidance.json").read_text())
    assert raw_summary["settings"]["no_ema"] is True and summary["settings"]["no_ema"] is False
    assert [r["name"] for r in raw_summary["rows"]] == ["none"] and raw_summary["rows"][0]["fid"] != summary["rows"][0]["fid"]


def test_guidance_rows_interval_only_keeps_the_baseline_and_the_interval_rows():
    """`--interval-only` drops the every-step guided rows (they cost the most evaluations), keeps the rest."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import guidance
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    from argparse import Namespace

    args = Namespace(interval=[0.28, 5.42], interval_only=False, cfg_scales=[1.5], guide="g", guide_scales=[2.0],
                     both=["1.5:2"])
    every = [r["name"] for r in guidance.rows_to_run(args)]
    assert every == ["none", "cfg-s1.5", "ag-w2", "both-s1.5-w2", "cfg-s1.5-interval", "ag-w2-interval",
                     "both-s1.5-w2-interval"]
    args.interval_only = True
    rows = guidance.rows_to_run(args)
    assert [r["name"] for r in rows] == ["none", "cfg-s1.5-interval", "ag-w2-interval", "both-s1.5-w2-interval"]
    assert all(r["interval"] == (0.28, 5.42) for r in rows[1:]) and rows[0]["interval"] is None
