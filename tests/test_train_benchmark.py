"""The trainer-overhead benchmark runs end to end at its smoke-test size (slow: spawns a process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_quick_writes_json(tmp_path):
    out = tmp_path / "train.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train.py"), "--quick", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["bare_images_per_s"] > 0 and report["trainer_images_per_s"] > 0
    assert report["overhead"] == pytest.approx(1 - report["trainer_images_per_s"] / report["bare_images_per_s"])
    assert "trainer overhead" in proc.stdout
