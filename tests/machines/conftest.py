"""Fixtures shared by the machines' tests."""

import pytest
import torch


@pytest.fixture
def two_threads():
    """The kernels split columns (or rows) over OpenMP threads: test with two."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)
