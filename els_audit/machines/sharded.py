"""Machines whose dictionary is split over shards, merged exactly.

The training images are dealt out in turn to S shards (image i to shard i mod S, so every
shard sees every class and the same mix of images); each shard builds the ordinary machines
over its images and answers with :class:`._partial.Partial`s, which the driver merges exactly
(:func:`._partial.merge_partials`: a log-sum-exp over the shards' normalisers).  The answer
is the single-process one within float32 rounding, whatever S.

Where the shards live is a *pool*: anything with ``call(method, *args) -> [one result per
shard]``, ``n_shards`` and ``describe() -> dict``.  :class:`LocalShardPool` holds them in this
process (tests, and a reference for the others); ``els_audit.integrations.ray`` holds each in
a Ray actor.  One pool serves several machines over the same images (the fitted machine and
the IS baseline): each shard keeps one machine per spec.

Usage::

    pool = LocalShardPool(images, labels, [("ELS", "periodic"), ("IS", "periodic")], n_shards=4)
    els, ideal = sharded_machines(pool, images, labels)
    els.score(x, 0.5, k=5)                  # == build_machine("ELS", images).score(x, 0.5, k=5)
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch

from . import DEFAULT_MEMORY_BUDGET, ScoreMachine, build_machine
from ._device import machine_call
from ._partial import Partial, merge_partials
from .supports import SupportSchedule
from ..schedules import NoiseSchedule, get_schedule

__all__ = ["Shard", "LocalShardPool", "ShardedMachine", "ShardError", "sharded_machines", "shard_ids"]

Spec = tuple                  # (kind, dictionary) or (kind, dictionary, SupportSchedule or None)


def spec_parts(spec: Spec) -> tuple[str, str, Optional[SupportSchedule]]:
    """(kind, dictionary, supports) of a spec; the supports (shaped windows) are optional."""
    kind, dic, *rest = spec
    return kind, dic, (rest[0] if rest else None)


class ShardError(RuntimeError):
    """A shard was lost and could not be brought back: the answer would be partial, so
    there is none.  The message is one line."""


def shard_ids(n_images: int, n_shards: int) -> list[torch.Tensor]:
    """The image indices of each shard: image i goes to shard i mod n_shards."""
    if not 1 <= n_shards <= n_images:
        raise ValueError(f"cannot split {n_images} images into {n_shards} shards; use 1..{n_images} shards")
    return [torch.arange(s, n_images, n_shards) for s in range(n_shards)]


class Shard:
    """One shard: the machines of ``specs`` over a subset of the training images.

    Its answers carry image indices into the WHOLE training set (``ids`` maps local to
    global).  ``threads``: torch threads for this shard (a Ray actor sets its own)."""

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor], ids: torch.Tensor,
                 specs: Sequence[Spec], schedule: Union[str, NoiseSchedule], memory_budget: int,
                 threads: Optional[int] = None):
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.ids = torch.as_tensor(ids, dtype=torch.long)
        self.machines = [build_machine(kind, images, labels, schedule=schedule, dictionary=dic,
                                       memory_budget=memory_budget, supports=sup)
                         for kind, dic, sup in map(spec_parts, specs)]

    def partial(self, which: int, x, t, k, label, diagnostics: bool) -> Partial:
        return self.machines[which].partial(x, t, k, label, diagnostics=diagnostics).with_image_ids(self.ids)

    def partial_sweep(self, which: int, x, t, ks, label) -> dict[int, Partial]:
        return self.machines[which].partial_sweep(x, t, ks, label)

    def prepare_sweep(self, which: int, ks, label) -> None:
        m = self.machines[which]
        if label is not None and m.labels is not None:
            label = [lab for lab in torch.as_tensor(label).reshape(-1).tolist() if lab in m.labels_present]
            if not label:
                return
        m.prepare_sweep(ks, label)

    def dictionary_stats(self, which: int, k, label) -> Optional[dict]:
        m = self.machines[which]
        if label is not None and int(label) not in m.labels_present:
            return None
        return m.dictionary_stats(k, label)

    def release_kept(self, which: int) -> int:
        return self.machines[which].release_kept()

    def pid(self) -> int:
        return os.getpid()


class LocalShardPool:
    """Shards held in this process, evaluated one after the other."""

    name = "local"

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor], specs: Sequence[Spec], *,
                 n_shards: int, schedule: Union[str, NoiseSchedule] = "cosine-legacy",
                 memory_budget: int = DEFAULT_MEMORY_BUDGET):
        self.specs = list(specs)
        self.shards = [Shard(images[ids], None if labels is None else labels[ids], ids, self.specs, schedule,
                             memory_budget) for ids in shard_ids(images.shape[0], n_shards)]

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    def call(self, method: str, *args) -> list:
        return [getattr(s, method)(*args) for s in self.shards]

    def describe(self) -> dict:
        return {"backend": self.name, "shards": self.n_shards}

    def close(self) -> None:
        self.shards = []


class ShardedMachine(ScoreMachine):
    """A :class:`ScoreMachine` whose dictionary lives in a pool's shards (module docstring).

    ``images``/``labels`` are the whole training set (for checks, and for the novelty stage's
    patch mosaics); every evaluation runs in the shards and is merged here."""

    def __init__(self, pool, which: int, kind: str, images: torch.Tensor, labels: Optional[torch.Tensor],
                 schedule: NoiseSchedule, dictionary: str, k: Optional[int], memory_budget: int,
                 supports: Optional[SupportSchedule] = None):
        super().__init__(kind, images, labels, schedule, dictionary, k, memory_budget, supports)
        self.pool = pool
        self.which = which

    def to_dict(self) -> dict:
        return {**super().to_dict(), **self.pool.describe()}

    @machine_call
    def score(self, x, t, k=None, label=None, *, diagnostics: bool = False):
        x, a, b = self._checked_coefficients(x, t)
        t_vec = self._check_t(t, x.shape[0], x.dtype)
        self._support_time(x, t)                             # shaped supports: one t per call
        k = self._resolve_k(k)
        labels = self.check_label(label, x.shape[0])
        parts = self.pool.call("partial", self.which, x, t_vec, k, labels, diagnostics)
        mean, diag = merge_partials(parts, merge_duplicates=self.kind != "IS")
        score = self._score_from_mean(x, a, b, mean)
        return (score, diag) if diagnostics else score

    def _sweep_means(self, x, t, ks, label, norms=False):
        if norms:
            raise NotImplementedError("a sharded machine is not itself a shard")
        x, a, b = self._checked_coefficients(x, t)
        t_vec = self._check_t(t, x.shape[0], x.dtype)
        self._support_time(x, t)                             # shaped supports: one t per call
        labels = self.check_label(label, x.shape[0])
        parts = self.pool.call("partial_sweep", self.which, x, t_vec, ks, labels)
        return (x, a, b), {k: merge_partials([p[k] for p in parts])[0] for k in ks}, None

    def partial(self, *args, **kwargs):
        raise NotImplementedError("a sharded machine is not itself a shard")

    def prepare_sweep(self, ks, label=None) -> None:
        ks = self._check_ks(ks)
        labels = None if label is None else self.check_label(label, torch.as_tensor(label).numel())
        self.pool.call("prepare_sweep", self.which, ks, labels)

    def dictionary_stats(self, k=None, label=None) -> dict:
        """The shards' dictionaries together: keys add up; identical patches in different
        shards count once per shard in ``unique_keys``."""
        k = self._resolve_k(k)
        if label is not None:
            self.check_label(label, 1)
        stats = [s for s in self.pool.call("dictionary_stats", self.which, k, label) if s is not None]
        out = dict(stats[0])
        for key in ("keys", "unique_keys", "bytes"):
            if key in out:
                out[key] = int(sum(s[key] for s in stats))
        if "deduplicated" in out:
            out["deduplicated"] = all(s["deduplicated"] for s in stats)
        if "materialized_fraction" in out:
            out["materialized_fraction"] = min(s["materialized_fraction"] for s in stats)
        out["shards"] = self.pool.n_shards
        return out

    def release_kept(self) -> int:
        """Bytes the shards' caches still hold, over all shards."""
        return int(sum(self.pool.call("release_kept", self.which)))

    def _mean_centre(self, *args, **kwargs):                # every path above goes to the shards
        raise AssertionError("a sharded machine evaluates in its shards")


def sharded_machines(pool, images: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                     schedule: Union[str, NoiseSchedule] = "cosine-legacy", k: Optional[int] = None,
                     memory_budget: int = DEFAULT_MEMORY_BUDGET) -> list[ShardedMachine]:
    """One :class:`ShardedMachine` per spec of ``pool`` (the same images, labels and
    schedule the pool's shards were built with)."""
    labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
    return [ShardedMachine(pool, i, kind, images.contiguous(), labels, get_schedule(schedule), dic, k, memory_budget,
                           sup) for i, (kind, dic, sup) in enumerate(map(spec_parts, pool.specs))]
