"""The public Python API named in lddpm/__init__.py resolves to the functions the CLI commands call."""

import subprocess
import sys

import lddpm


def test_every_public_name_resolves_to_its_module_object():
    from lddpm.evaluate import evaluate_checkpoint
    from lddpm.pipeline import load_pipeline
    from lddpm.sampling import sample
    from lddpm.study import run_study
    from lddpm.train import train, train_vae

    for name in lddpm.__all__:
        assert getattr(lddpm, name) is not None
    assert lddpm.train_diffusion is train and lddpm.train_vae is train_vae
    assert lddpm.load_pipeline is load_pipeline and lddpm.sample is sample
    assert lddpm.evaluate_checkpoint is evaluate_checkpoint and lddpm.run_study is run_study


def test_import_lddpm_does_not_import_torch():
    code = "import sys, lddpm; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
