"""Test-wide settings.

One torch thread: the suite is many small tensor ops, where a second OpenMP thread buys
little and, on a loaded 2-core machine, costs a scheduler quantum per op (10x slowdowns
measured here).  Benchmarks in bench/ use all threads.
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _native_kernel_cache(tmp_path_factory):
    """Build the native kernels (els_audit/machines/_native.py) into this session's own
    folder, so the suite compiles them from the shipped source instead of reusing a user's
    cached build."""
    from els_audit.machines import _native

    mp = pytest.MonkeyPatch()
    mp.setenv("ELS_AUDIT_CACHE", str(tmp_path_factory.mktemp("native-cache")))
    _native._reset_for_tests()
    yield
    mp.undo()
    _native._reset_for_tests()
