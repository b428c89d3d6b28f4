"""The prepared GPU check (benchmarks/gpu.py) runs end to end as a CPU dry run; CUDA-path fixes it relies on."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("environment", "training_throughput", "train_resume", "sampling", "inception", "end_to_end")


def _gpu_module():
    """benchmarks/gpu.py as a module (benchmarks/ is not a package)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module("gpu")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of the whole check in a fresh process: (exit status, output, JSON report, Markdown)."""
    out = tmp_path_factory.mktemp("gpu-check")
    path = os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--dry-run", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    report = json.loads((out / "gpu-check.json").read_text()) if (out / "gpu-check.json").is_file() else None
    md = (out / "gpu-check.md").read_text() if (out / "gpu-check.md").is_file() else ""
    return proc, report, md


def test_dry_run_has_every_section_without_errors(dry_run):
    proc, report, md = dry_run
    assert report is not None, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert report["dry_run"] is True and tuple(report["sections"]) == SECTIONS
    errors = {n: s["error"] for n, s in report["sections"].items() if s["status"] != "ok"}
    assert not errors, errors
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, section in report["sections"].items():
        assert section["error"] is None and section["seconds"] >= 0, name
        assert not [r for r in section["rows"] if "error" in r or "skipped" in r], name
    assert "| section | status |" in md and "DRY RUN" in md
    assert all(f"## {name}" in md for name in SECTIONS)


def test_dry_run_measures_what_the_gpu_run_will(dry_run):
    _, report, _ = dry_run
    s = report["sections"]
    rows = s["training_throughput"]["rows"]
    assert {(r["impl"], r["mode"]) for r in rows} >= {(i, m) for i in ("lddpm", "diffusers")
                                                      for m in ("fp32", "bf16", "bf16_compile")}
    assert {r["kind"] for r in rows} >= {"unet", "vae"} and all(r["train_img_s"] > 0 for r in rows)
    ours = [r for r in rows if r["impl"] == "lddpm"]
    assert all(r["vs_diffusers"] > 0 for r in ours)
    twins = {(r["config"], r["overrides"], r["mode"]): r["params"] for r in rows if r["impl"] == "diffusers"}
    assert all(r["params"] == twins[(r["config"], r["overrides"], r["mode"])] for r in ours if r["kind"] == "vae")
    resume = s["train_resume"]
    assert resume["summary"]["resumed_equals_uninterrupted"] and resume["summary"]["resumed_from_step"] == 2
    assert all(r["bitwise_equal"] == r["tensors"] > 0 for r in resume["rows"])
    assert resume["summary"]["ddp_probe"] == {"backend": "gloo", "world_size": 1, "grads_equal_plain": True,
                                              "all_reduce_sum": 1.0}
    assert {(r["sampler"], r["guidance_scale"]) for r in s["sampling"]["rows"]} == {
        (n, g) for n in ("ddpm", "ddim", "dpm++2m") for g in (1.0, 3.0)}
    inc = s["inception"]["summary"]
    assert inc["max_relative_difference"] == 0.0 and abs(inc["fid_device_vs_cpu"]) < 1e-6  # same device twice
    e2e = s["end_to_end"]["summary"]
    assert e2e["steps"] >= 1 and e2e["num_samples"] == e2e["reference_num"] == 8 and math.isfinite(e2e["fid_vs_test"])


def test_a_failing_section_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    gpu = _gpu_module()

    def boom(chk):
        raise RuntimeError("sampling exploded")

    def bad_row(chk):
        return {"rows": [{"config": "x", "error": "OutOfMemoryError: no room"}, {"config": "y", "value": 1.0}]}

    monkeypatch.setitem(gpu.SECTIONS, "sampling", boom)
    monkeypatch.setitem(gpu.SECTIONS, "inception", bad_row)
    status = gpu.main(["--dry-run", "--out", str(tmp_path), "--sections", "sampling,environment,inception"])
    assert status == 1
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    sections = report["sections"]
    assert sections["sampling"]["status"] == "error" and "sampling exploded" in sections["sampling"]["error"]
    assert sections["environment"]["status"] == "ok"
    assert sections["environment"]["summary"]["torch"] == torch.__version__
    assert sections["inception"]["status"] == "error" and "no room" in sections["inception"]["error"]
    md = (tmp_path / "gpu-check.md").read_text()
    assert "| sampling | error |" in md and "sampling exploded" in md


def test_deterministic_kernels_are_chosen_for_cuda_only(monkeypatch):
    from lddpm.train import use_deterministic_kernels

    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        torch.use_deterministic_algorithms(False)
        use_deterministic_kernels(torch.device("cpu"))
        use_deterministic_kernels(torch.device("cuda", 0), enabled=False)
        assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        torch.backends.cudnn.benchmark = True
        use_deterministic_kernels(torch.device("cuda", 0))  # sets flags only; needs no GPU
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def test_fid_features_turn_tf32_off_on_cuda_only():
    from lddpm.metrics.inception import full_fp32

    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        with full_fp32("cpu"):
            assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        with full_fp32(torch.device("cuda", 0)):
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # restored
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
