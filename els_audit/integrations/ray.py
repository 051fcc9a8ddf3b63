"""The machines' dictionary sharded over Ray actors (the extra ``els-audit[ray]``).

Each actor holds one :class:`els_audit.machines.sharded.Shard`: the machines over every S-th
training image, built in the actor.  The driver sends each evaluation to every actor at once
and merges their partial answers exactly (:mod:`els_audit.machines._partial`), so the answer
is the single-process one within float32 rounding, whatever the number of shards.

- Cluster: ``address="auto"`` joins the cluster this machine belongs to (``ray start``, or
  ``RAY_ADDRESS``) and starts a local one when there is none; any other address is passed to
  ``ray.init``.  The workers import ``els_audit``: on a multi-node cluster install it there
  (or ship it with a ``runtime_env``) as for any Ray job.
- Shards and placement (:func:`plan_shards`): one shard per CPU of the cluster, more when a
  shard's images and its deduplicated dictionary at one size would not fit half of
  ``memory_budget`` (the budget each actor's machines keep to); each actor reserves its share
  of the CPUs and runs that many torch threads; actors spread over the nodes.  The machines
  run on the CPU (GPU placement waits for the machines on CUDA).  Actors the cluster cannot
  place within ``start_timeout`` seconds are a :class:`ShardError`, not a hang.
- Faults: actors restart up to ``max_restarts`` times (Ray rebuilds the shard by running its
  constructor again) and a call in flight on a dead actor is retried on the restarted one.
  When the restarts are spent, the evaluation raises :class:`ShardError` with one line: there
  is never a silently partial answer.

Usage::

    from els_audit.integrations.ray import RayShardPool
    from els_audit.machines.sharded import sharded_machines
    pool = RayShardPool(images, labels, [("ELS", "periodic"), ("IS", "periodic")], address="auto")
    els, ideal = sharded_machines(pool, images, labels)
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
from typing import Optional, Sequence, Union

import ray
import torch

from ..machines import DEFAULT_MEMORY_BUDGET
from ..machines._dictionary import DEDUP_BYTES_PER_KEY
from ..machines.sharded import Shard, ShardError, shard_ids
from ..schedules import NoiseSchedule

__all__ = ["RayShardPool", "connect", "plan_shards"]


def connect(address: str = "auto") -> dict:
    """Join the Ray cluster at ``address`` (``"auto"``: this machine's, else a new local
    one); a no-op when this process is connected already.  Returns the cluster's resources.

    An address is first tried with a plain TCP connection (5 s): ``ray.init`` retries an
    unreachable one for minutes.  The process's signal handlers are kept (``ray.init``
    replaces SIGTERM's with its own exit, which would skip the audit's clean-up).  And
    ``ray.init`` runs from an empty private folder: it puts the driver's current folder on
    every worker's ``sys.path``, so the workers would import whatever modules the user's
    folder holds (the audit itself drops that folder from its own path)."""
    if not ray.is_initialized():
        saved = _signal_handlers()
        here = os.getcwd()
        os.chdir(_empty_folder())
        try:
            if address == "auto":
                try:
                    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
                except ConnectionError:
                    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            else:
                _reachable(address)
                try:
                    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
                except ConnectionError as exc:
                    raise ShardError(f"cannot join the Ray cluster at {address!r} ({_first_line(exc)}); start it "
                                     "with 'ray start --head' or pass --ray auto") from None
        finally:
            os.chdir(here)
            _restore(saved)
    return dict(ray.cluster_resources())


_EMPTY: list[str] = []


def _empty_folder() -> str:
    """A private empty folder for this process (removed at exit)."""
    if not _EMPTY:
        _EMPTY.append(tempfile.mkdtemp(prefix="els-audit-ray-"))
        atexit.register(shutil.rmtree, _EMPTY[0], ignore_errors=True)
    return _EMPTY[0]


def _reachable(address: str, timeout: float = 5.0) -> None:
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ShardError(f"--ray {address!r} is not a Ray address; give host:port (or ray://host:port) or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ShardError(f"cannot reach the Ray cluster at {address!r} ({exc.strerror or exc}); start it with "
                         "'ray start --head' or pass --ray auto") from None


_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, n))


def _signal_handlers() -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.getsignal(s) for s in _SIGNALS}


def _restore(saved: dict) -> None:
    for s, handler in saved.items():
        if handler is not None:
            signal.signal(s, handler)


def shard_bytes(images: torch.Tensor, n_shards: int) -> int:
    """What one shard keeps at one patch size: its images (padded) and the deduplication's
    bookkeeping per key (:func:`els_audit.machines._dictionary.build_dictionary`)."""
    N, C, H, W = images.shape
    n = math.ceil(N / n_shards)
    return n * C * H * W * images.element_size() * 2 + n * H * W * (DEDUP_BYTES_PER_KEY + 4 * C)


def plan_shards(images: torch.Tensor, cpus: float, memory_budget: int) -> int:
    """Shards: one per CPU (at least one), more while a shard's dictionary at one size
    would not fit half its ``memory_budget``; never more than the images."""
    n = max(1, int(cpus))
    while n < images.shape[0] and shard_bytes(images, n) > memory_budget // 2:
        n += 1
    return min(n, images.shape[0])


class RayShardPool:
    """Shards held by Ray actors (module docstring); ``call`` runs a method on all at once."""

    name = "ray"

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor], specs: Sequence[tuple[str, str]], *,
                 address: str = "auto", schedule: Union[str, NoiseSchedule] = "cosine-legacy",
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, n_shards: Optional[int] = None,
                 max_restarts: int = 3, start_timeout: float = 300.0):
        resources = connect(address)
        cpus = float(resources.get("CPU", 1.0))
        self.specs = list(specs)
        self.n_shards = n_shards or plan_shards(images, cpus, memory_budget)
        self.cpus_per_actor = cpus / self.n_shards if self.n_shards > cpus else 1.0
        threads = max(1, int(self.cpus_per_actor))
        actor = ray.remote(_RayShard).options(num_cpus=self.cpus_per_actor, max_restarts=max_restarts,
                                          max_task_retries=max_restarts, scheduling_strategy="SPREAD")
        self.actors, self._held = [], []
        for ids in shard_ids(images.shape[0], self.n_shards):
            # NB: the pool holds each shard's data in the object store for as long as it lives:
            # a restarted actor reads it again (an argument Ray put there itself would be
            # dropped once the first actor had read it, and the restart would fail)
            held = ray.put((images[ids].contiguous(), None if labels is None else labels[ids], ids))
            self._held.append(held)
            self.actors.append(actor.remote([held], self.specs, schedule, int(memory_budget), threads))
        try:                                                         # built, or the build's error
            self.pids = self._get([a.pid.remote() for a in self.actors], timeout=start_timeout)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise ShardError(f"the Ray cluster did not start {self.n_shards} actors of {self.cpus_per_actor:g} CPU "
                             f"within {start_timeout:g} s (free: {ray.available_resources().get('CPU', 0):g} CPU); "
                             "free the cluster or add nodes") from None

    def call(self, method: str, *args) -> list:
        shared = [ray.put(a) if isinstance(a, torch.Tensor) else a for a in args]     # sent once, read by all
        return self._get([getattr(a, method).remote(*shared) for a in self.actors])

    def _get(self, refs: list, timeout: Optional[float] = None) -> list:
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.RayActorError as exc:                  # ActorDiedError is one
            what = ("died and could not be restarted" if isinstance(exc, ray.exceptions.ActorDiedError)
                    else "is unavailable")
            raise ShardError(f"a Ray actor holding one of {self.n_shards} shards {what} ({_first_line(exc)}); "
                             "stopped rather than give a partial answer") from None

    def describe(self) -> dict:
        return {"backend": self.name, "shards": self.n_shards, "cpus_per_shard": self.cpus_per_actor}

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors, self._held = [], []


class _RayShard(Shard):
    """A :class:`Shard` whose data comes as a reference the pool holds (passed inside a list,
    so that Ray does not resolve it into a by-value argument of the constructor)."""

    def __init__(self, held: list, specs, schedule, memory_budget: int, threads: int):
        images, labels, ids = ray.get(held[0])
        super().__init__(images, labels, ids, specs, schedule, memory_budget, threads)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]
