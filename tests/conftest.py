"""Shared test settings: deterministic, two threads, float64 where formulas are checked."""

import pytest
import torch


def pytest_configure(config):
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
