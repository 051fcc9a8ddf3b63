"""Test-wide settings.

One torch thread: the suite is many small tensor ops, where a second OpenMP thread buys
little and, on a loaded 2-core machine, costs a scheduler quantum per op (10x slowdowns
measured here).  Benchmarks in bench/ use all threads.
"""

import torch

torch.set_num_threads(1)
