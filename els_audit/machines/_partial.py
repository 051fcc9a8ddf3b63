"""Answers over parts of a dictionary, and their exact merge (the sharded machines).

Every machine's answer at a query pixel is a softmax-weighted average over its keys::

    mean = sum_j w_j centre_j,   w_j = count_j 2**(s_j) / Z,   Z = sum_j count_j 2**(s_j)

with the absolute base-2 logit ``s_j = -log2(e) ||q - a p_j||^2 / (2 b^2)``.  Split the keys
into disjoint shards s (here: the training images, dealt out in turn) and each shard's answer
is the same average over its own keys with its own normaliser ``Z_s``.  Then, exactly,

    Z = sum_s Z_s,    mean = sum_s (Z_s / Z) mean_s,

computed as a log-sum-exp over the shards' ``log2 Z_s`` (kept in float64: at low noise the
logits are thousands of bits).  Identical patches in different shards are not merged into one
key, but they enter the sum with their counts either way, so the answer does not change.

The diagnostics merge too: the winning entry is the shard winner with the largest absolute
logit ``log2(weight_s) + log2 Z_s``; identical patches are one entry of the whole dictionary,
so the winners whose patch content equals the overall winner's (a hash of their values, see
:func:`winner_hash`) add their multiplicities and the first occurrence (lowest image index,
then row-major position) stands for them, as in one process.  The entropy over the whole
dictionary is ``H = sum_s pi_s (H_s - ln pi_s)`` with ``pi_s = Z_s / Z``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn.functional as F

from ._dictionary import circular_pad

if TYPE_CHECKING:                                           # pragma: no cover
    from . import ScoreDiagnostics

__all__ = ["Partial", "merge_partials", "winner_hash"]


@dataclass
class Partial:
    """One shard's answer for a batch of B queries.

    mean: (B, C, H, W) the softmax mean over this shard's keys (any value where the
    normaliser is -inf); log2_norm: (B, H, W) float64 absolute log2 normaliser, -inf where
    this shard has no key for the query (a class it holds no image of); diagnostics: a
    ``ScoreDiagnostics`` over this shard with image indices into the WHOLE training set;
    winner_hash: (B, H, W) int64 content hash of each winning entry's patch.
    """

    mean: torch.Tensor
    log2_norm: torch.Tensor
    diagnostics: Optional["ScoreDiagnostics"] = None
    winner_hash: Optional[torch.Tensor] = None

    def with_image_ids(self, ids: torch.Tensor) -> "Partial":
        """This answer with the winners' image indices mapped through ``ids`` (local index ->
        index in the whole training set)."""
        if self.diagnostics is None:
            return self
        d = self.diagnostics
        mapped = type(d)(ids[d.source_image], d.source_y, d.source_x, d.weight, d.multiplicity, d.entropy)
        return Partial(self.mean, self.log2_norm, mapped, self.winner_hash)


def merge_partials(parts: Sequence[Partial], *, merge_duplicates: bool = True):
    """(mean (B, C, H, W), diagnostics or None) of the whole dictionary from its shards'
    answers (module docstring).  ``merge_duplicates``: False for IS, whose entries are whole
    images and are never merged (multiplicity 1 everywhere)."""
    if not parts:
        raise ValueError("no shard answers to merge")
    norms = torch.stack([p.log2_norm for p in parts])                                   # (S, B, H, W)
    top = norms.amax(0)
    if not bool(torch.isfinite(top).all()):
        raise ValueError("some queries have no key in any shard (a label without training images?)")
    log2_total = top + torch.log2(torch.exp2(norms - top).sum(0))                      # (B, H, W): log2 Z
    pi = torch.exp2(norms - log2_total)                                                 # (S, B, H, W), 0 for -inf
    dtype = parts[0].mean.dtype
    mean = torch.zeros(parts[0].mean.shape, dtype=torch.float64, device=parts[0].mean.device)
    for p, w in zip(parts, pi):
        mean += torch.where(w[:, None] > 0, w[:, None] * p.mean.to(torch.float64), 0.0)
    diag = None
    if parts[0].diagnostics is not None:
        diag = _merge_winners(parts, norms, log2_total, pi, merge_duplicates)
    return mean.to(dtype), diag


def _merge_winners(parts, norms, log2_total, pi, merge_duplicates: bool):
    ds = [p.diagnostics for p in parts]
    live = torch.isfinite(norms)                                                        # (S, B, H, W)
    logit = torch.where(live, torch.log2(torch.stack([d.weight.to(torch.float64) for d in ds])) + norms,
                        float("-inf"))
    # the best shard; exact ties (the same patch in two shards) go to the lower image index
    src = torch.stack([d.source_image for d in ds])
    order = torch.where(live, src, torch.iinfo(torch.long).max)
    best_logit = logit.amax(0)
    cand = logit == best_logit
    win = torch.where(cand, order, torch.iinfo(torch.long).max).argmin(0)              # (B, H, W)
    pick = lambda v: v.gather(0, win[None])[0]                                          # noqa: E731
    ys, xs = torch.stack([d.source_y for d in ds]), torch.stack([d.source_x for d in ds])
    hashes = torch.stack([p.winner_hash for p in parts])
    counts = torch.stack([d.multiplicity for d in ds])
    h_win = pick(hashes)
    same = live & (hashes == h_win[None])                                               # the winner's patch
    # first occurrence among them: lowest (image, y, x)
    H, W = src.shape[-2:]
    pos = torch.where(same, (src * H + ys) * W + xs, torch.iinfo(torch.long).max)
    first = pos.argmin(0)
    first_of = lambda v: v.gather(0, first[None])[0]                                    # noqa: E731
    # IS: equal images are separate entries (multiplicity 1); the lowest index stands first
    count = torch.where(same, counts, 0).sum(0) if merge_duplicates else torch.ones_like(counts[0])
    weight = torch.exp2(best_logit - log2_total)
    ent = torch.stack([d.entropy.to(torch.float64) for d in ds])
    h = torch.where(pi > 0, pi * (ent - torch.log(pi.clamp_min(torch.finfo(torch.float64).tiny))), 0.0).sum(0)
    dtype = ds[0].weight.dtype
    return type(ds[0])(first_of(src), first_of(ys), first_of(xs), weight.to(dtype), count, h.to(dtype))


_HASH_SEED = 0x5EED


def winner_hash(images: torch.Tensor, kind: str, dictionary: str, k: Optional[int],
                diagnostics: "ScoreDiagnostics") -> torch.Tensor:
    """(B, H, W) int64 hash of the values of each winning entry: the k x k patch (padded as
    the machine pads: circularly for periodic ELS, with zeros otherwise) centred at the
    winner's position in its image, or the whole image for IS.  Equal patches get equal
    hashes (their bits are hashed, wrapping in int64); different ones collide with
    probability about 2**-60."""
    d = diagnostics
    B, H, W = d.source_image.shape
    src = d.source_image.reshape(-1)
    if kind == "IS":
        vals = images[src].reshape(src.numel(), -1)
    else:
        r = k // 2
        used, which = torch.unique(src, return_inverse=True)            # pad only the winners' images
        sub = images[used]
        padded = (circular_pad(sub, r) if kind == "ELS" and dictionary == "periodic"      # may wrap more than once
                  else F.pad(sub, (r, r, r, r)))
        C = images.shape[1]
        dy = torch.arange(k, device=images.device)
        rows = (d.source_y.reshape(-1)[:, None] + dy[None, :])                          # (n, k) padded coords
        cols = (d.source_x.reshape(-1)[:, None] + dy[None, :])
        vals = padded[which[:, None, None, None], torch.arange(C, device=images.device)[None, :, None, None],
                      rows[:, None, :, None], cols[:, None, None, :]].reshape(src.numel(), -1)
    bits = vals.contiguous().view(torch.int32 if vals.dtype == torch.float32 else torch.int64).to(torch.int64)
    # each (position, value) mixed on its own (a sum of raw bits times constants would
    # collide: the bits of 1.0 and -1.0 differ by 2**63), then summed
    return _mix64(bits ^ _salt(bits.shape[1]).to(bits.device)[None, :]).sum(1).reshape(B, H, W)


@functools.lru_cache(maxsize=8)
def _salt(width: int) -> torch.Tensor:
    """(width,) int64: a fixed random value per patch position."""
    gen = torch.Generator().manual_seed(_HASH_SEED)
    return torch.randint(-(1 << 62), 1 << 62, (width,), generator=gen, dtype=torch.int64, device="cpu")


_M1, _M2 = 0xFF51AFD7ED558CCD - (1 << 64), 0xC4CEB9FE1A85EC53 - (1 << 64)


def _mix64(v: torch.Tensor) -> torch.Tensor:
    """A 64-bit finaliser (MurmurHash3's fmix64 shape: shift-xor, multiply, wrapping in int64)."""
    v = v ^ ((v >> 33) & ((1 << 31) - 1))
    v = v * _M1
    v = v ^ ((v >> 33) & ((1 << 31) - 1))
    v = v * _M2
    return v ^ ((v >> 33) & ((1 << 31) - 1))
