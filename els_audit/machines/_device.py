"""Where a machine computes: moving its calls' tensors, exact float32 products, tile sizes.

The machines run the same exact algorithm on every device torch has (:mod:`._engine`): the
C kernels (:mod:`._native`) on CPU tensors, torch operations elsewhere.  A machine lives
on its images' device; its public methods take ``x`` on any device and answer on ``x``'s
(:func:`machine_call`).

Float32 products are IEEE float32 inside a machine call, whatever the caller set: the
logit scale ``a_t^2 / b_t^2`` grows without bound as t -> 0 (hundreds to thousands of bits
at t ~ 0.1), and TensorFloat-32 (CUDA) or bfloat16 (oneDNN on CPU) products keep 10 or 7
mantissa bits instead of 23, which moves the softmax weights there by far more than
float32 rounding.  ``bench/bench_cuda.py`` measures TF32's error per noise level on a GPU;
until such a measurement says where it is harmless, it is off everywhere.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import fields, is_dataclass, replace

import torch

__all__ = ["to_device", "machine_call", "exact_float32", "engine_tile_elems", "nested_row_block", "free_device_bytes",
           "CPU_TILE_ELEMS"]

# logits per (query rows x keys) tile on the CPU: sized for the caches (bench/README.md)
CPU_TILE_ELEMS = 1 << 18
# on a GPU a tile is one large GEMM: its logits and their exp2 may take this share of the
# machine's working memory (the quarter of its budget that dictionaries leave)
GPU_TILE_SHARE = 0.5
GPU_TILE_MAX_ELEMS = 1 << 28
# query rows per block of the nested pass on the CPU (each block walks every tile of the tree)
CPU_NESTED_ROWS = 1024


def to_device(obj, device: torch.device):
    """``obj`` with every tensor in it (tuples, lists, dicts and dataclasses included) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: to_device(getattr(obj, f.name), device) for f in fields(obj) if f.init})
    return obj


@contextlib.contextmanager
def exact_float32():
    """IEEE float32 matrix products (no TF32, no bfloat16) inside, the caller's setting after.

    Uses only torch's per-backend ``fp32_precision`` settings: reading the legacy global ones
    raises once a program has mixed the legacy and new APIs."""
    backends = [b for b in (getattr(torch.backends.cuda, "matmul", None), getattr(torch.backends.mkldnn, "matmul", None))
                if b is not None and hasattr(b, "fp32_precision")]
    old = [b.fp32_precision for b in backends]
    try:
        for b in backends:
            if b.fp32_precision != "ieee":
                b.fp32_precision = "ieee"
        yield
    finally:
        for b, o in zip(backends, old):
            if b.fp32_precision != o:
                b.fp32_precision = o


def machine_call(method):
    """Decorate a public machine method: run it with exact float32 products where the
    machine's images live (``self.device``), its tensor arguments moved there and the
    tensors of its answer moved back to the device of ``x`` (the caller's)."""
    @functools.wraps(method)
    def run(self, x, *args, **kwargs):
        with exact_float32():
            if not isinstance(x, torch.Tensor) or x.device == self.device:
                return method(self, x, *args, **kwargs)
            answer = method(self, x.to(self.device), *to_device(args, self.device), **to_device(kwargs, self.device))
            return to_device(answer, x.device)
    return run


def free_device_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device in bytes (``torch.cuda.mem_get_info``)."""
    return int(torch.cuda.mem_get_info(device)[0])


def engine_tile_elems(device: torch.device, dtype: torch.dtype, memory_budget: int) -> int:
    """Logits per engine tile on ``device``: :data:`CPU_TILE_ELEMS` on the CPU; on a GPU as
    many as :data:`GPU_TILE_SHARE` of the working memory holds (a quarter of the budget,
    and no more than is free on the device), two tensors of them (the logits and, with
    diagnostics, their weighted copy)."""
    if device.type == "cpu":
        return CPU_TILE_ELEMS
    work = memory_budget // 4
    if device.type == "cuda":
        work = min(work, free_device_bytes(device))
    item = dtype.itemsize
    return int(max(CPU_TILE_ELEMS, min(GPU_TILE_MAX_ELEMS, GPU_TILE_SHARE * work // (2 * item))))


def nested_row_block(device: torch.device, tile_elems: int, tile_nodes: int = 1024) -> int:
    """Query rows per block of the nested pass: :data:`CPU_NESTED_ROWS` on the CPU; on a GPU
    as many as keep a level's two logit tiles (previous and current level, ``tile_nodes``
    nodes each) within ``tile_elems``: larger products, fewer kernel launches."""
    if device.type == "cpu":
        return CPU_NESTED_ROWS
    return max(CPU_NESTED_ROWS, tile_elems // (2 * tile_nodes))
