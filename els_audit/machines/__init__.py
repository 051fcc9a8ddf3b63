"""Closed-form score machines: IS, LS, ELS and bbELS.

References:
- M. Kamb and S. Ganguli, "An analytic theory of creativity in convolutional diffusion
  models", ICML 2025 (arXiv 2412.20292); eq. 38 for ELS.  docs/theory.md section 2 restates the
  machines; section 1 the conversion ``eps_hat = -b_t * s``.
- Public code: github.com/Kambm/convolutional_diffusion (MIT).  Deviations, on purpose:
  the softmax is normalised over the WHOLE dictionary (the public code averages per batch);
  ELS offers both the theory's periodic dictionary (default) and the public code's
  interior-only ("valid") one.

Usage::

    from els_audit.machines import build_machine
    m = build_machine("ELS", images, labels, schedule="cosine-legacy", dictionary="periodic")
    s = m.score(x, t, k=5)                 # x (B, C, H, W), t float or (B,) -> (B, C, H, W)
    s, diag = m.score(x, t, k=5, diagnostics=True)
    by_k = m.score_sweep(x, t, ks=(3, 5, 7))   # {k: score}: nested windows for ELS and bbELS

All machines share one exact kernel (:mod:`._engine`): a grouped, tiled, online-softmax
dot-product attention over a deduplicated patch dictionary (:mod:`._dictionary`).  A sweep
over patch sizes of the periodic ELS machine runs as one pass over nested windows
(:mod:`._nested`); so do ELS with the 'valid' dictionary and the interior group of bbELS
(its edge groups one k at a time).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..schedules import NoiseSchedule, get_schedule
from ._device import engine_tile_elems, free_device_bytes, machine_call, nested_row_block
from ._dictionary import PatchDictionary, build_dictionary, circular_pad as _circular_pad
from ._engine import LOG2E, grouped_softmax_average
from ._nested import (NestedDictionary, build_nested_dictionary, interior_tree_bytes, nested_dictionary_bytes,
                      nested_softmax_average, palette_of)
from ._partial import Partial, winner_hash
from .supports import SupportSchedule, check_supports, column_scale

__all__ = ["build_machine", "ScoreMachine", "ScoreDiagnostics", "MACHINE_KINDS", "scale_schedule_eps",
           "free_device_bytes"]

MACHINE_KINDS = ("IS", "LS", "ELS", "bbELS")
DEFAULT_MEMORY_BUDGET = 2 * 1024**3


@dataclass(frozen=True)
class ScoreDiagnostics:
    """Per-pixel diagnostics from the same pass as the score.

    Shapes (B, H, W):
      source_image: long, index (into the images given to ``build_machine``) of the
          highest-weight dictionary entry; source_y, source_x: the centre of its patch.
          Identical patches are merged: the first occurrence (lowest image index, then
          row-major position) stands for all of them.
      weight: softmax weight of that single entry.
      multiplicity: how many identical entries were merged with it (they share its weight);
          1 when the dictionary streams because deduplication would exceed the memory
          budget (then duplicates are not merged and not counted).
      entropy: softmax entropy (nats) over the whole dictionary.
    """

    source_image: torch.Tensor
    source_y: torch.Tensor
    source_x: torch.Tensor
    weight: torch.Tensor
    multiplicity: torch.Tensor
    entropy: torch.Tensor

    def to_dict(self) -> dict:
        return {f: getattr(self, f).tolist() for f in self.__dataclass_fields__}


class ScoreMachine:
    """A closed-form score machine over a fixed training set.

    Build with :func:`build_machine`.  ``score(x, t, k)`` returns the machine's score;
    ``eps(x, t, label, k)`` the equivalent noise prediction ``-b_t * s`` that drives the
    shared DDIM sampler.

    The machine computes on its images' device (:attr:`device`); its public methods take
    ``x`` on any device and answer on ``x``'s.
    """

    def __init__(self, kind: str, images: torch.Tensor, labels: Optional[torch.Tensor],
                 schedule: NoiseSchedule, dictionary: str, k: Optional[int], memory_budget: int,
                 supports: Optional[SupportSchedule] = None):
        self.kind = kind
        self.supports = supports
        self.images = images
        self.labels = labels
        self.schedule = schedule
        self.dictionary = dictionary
        self.default_k = k
        self.memory_budget = int(memory_budget)
        self._cache: "OrderedDict[tuple, PatchDictionary]" = OrderedDict()
        self._palette_coded: Optional[bool] = None        # see _nests
        self._labels_present: Optional[frozenset] = None  # see labels_present

    # -- public ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the machine computes: its images' device."""
        return self.images.device

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def to_dict(self) -> dict:
        N, C, H, W = self.images.shape
        return {"kind": self.kind, "dictionary": self.dictionary if self.kind == "ELS" else None,
                "schedule": getattr(self.schedule, "name", repr(self.schedule)),
                "n_images": N, "image_shape": [C, H, W], "default_k": self.default_k,
                "conditional": self.labels is not None, "dtype": str(self.images.dtype),
                "support": "square" if self.supports is None else self.supports.kind}

    @machine_call
    def score(self, x: torch.Tensor, t: Union[float, torch.Tensor], k: Optional[int] = None,
              label: Union[None, int, torch.Tensor] = None, *, diagnostics: bool = False):
        """The machine's score at ``x``.

        Args:
            x: (B, C, H, W) noisy images, same dtype as the machine's images.
            t: time in [0, 1], a float or a (B,) tensor.
            k: odd patch size (ignored by IS); defaults to the ``k`` given at build time.
            label: restrict the dictionary to training images of this class: an int, or a
                (B,) tensor of per-image labels.  Needs labels at build time.
            diagnostics: also return :class:`ScoreDiagnostics`.
        Returns:
            score (B, C, H, W), or ``(score, diagnostics)``.
        """
        x, a, b = self._checked_coefficients(x, t)
        k = self._resolve_k(k)
        labels = self.check_label(label, x.shape[0])
        mean, diag, _ = self._means(x, a, b, k, labels, diagnostics, t=self._support_time(x, t))
        score = self._score_from_mean(x, a, b, mean)
        return (score, diag) if diagnostics else score

    @machine_call
    def partial(self, x: torch.Tensor, t: Union[float, torch.Tensor], k: Optional[int] = None,
                label: Union[None, int, torch.Tensor] = None, *, diagnostics: bool = False) -> Partial:
        """This machine's answer as one shard of a larger dictionary: its softmax mean with
        the absolute log2 normaliser that merges it exactly with other shards' answers
        (:func:`._partial.merge_partials`), and with ``diagnostics`` its winning entries and
        their content hashes.  A label with no images here is no error: its items get the
        normaliser -inf (no keys in this shard)."""
        x, a, b = self._checked_coefficients(x, t)
        k = self._resolve_k(k)
        labels = self.check_label(label, x.shape[0], present=False)
        t_s = self._support_time(x, t)
        mean, diag, norm = self._means(x, a, b, k, labels, diagnostics, norms=True, t=t_s)
        if not diagnostics:
            return Partial(mean, norm)
        window = k if self.supports is None or k is None else self.supports.window(t_s, k)[0]
        return Partial(mean, norm, diag, winner_hash(self.images, self.kind, self.dictionary, window, diag))

    @machine_call
    def partial_sweep(self, x: torch.Tensor, t: Union[float, torch.Tensor], ks: Sequence[int],
                      label: Union[None, int, torch.Tensor] = None) -> dict[int, Partial]:
        """:meth:`partial` at several patch sizes, one nested pass where :meth:`score_sweep`
        has one."""
        ks = self._check_ks(ks)
        _, means, norms = self._sweep_means(x, t, ks, label, norms=True)
        return {k: Partial(means[k], norms[k]) for k in ks}

    @machine_call
    def score_sweep(self, x: torch.Tensor, t: Union[float, torch.Tensor], ks: Sequence[int],
                    label: Union[None, int, torch.Tensor] = None) -> dict[int, torch.Tensor]:
        """The score at several patch sizes, same ``x`` and ``t``: ``{k: score(x, t, k)}``.

        The periodic ELS machine evaluates all sizes in one pass over nested windows (each
        size adds only its ring to the previous one's logits; :mod:`._nested`), when its
        tree fits half the memory budget; bbELS does so for its interior group (the pixels
        at least k // 2 from every edge) and runs its edge groups one k at a time; ELS with
        the 'valid' dictionary runs every pixel over a tree of the patches that fit inside
        the image; LS runs one k at a time.
        """
        ks = self._check_ks(ks)
        (x, a, b), means, _ = self._sweep_means(x, t, ks, label)
        return {k: self._score_from_mean(x, a, b, mean) for k, mean in means.items()}

    def prepare_sweep(self, ks: Sequence[int], label: Union[None, int, torch.Tensor] = None) -> None:
        """Build now what :meth:`score_sweep` needs for any subset of ``ks`` (for periodic ELS
        and bbELS one tree over all of ks, instead of one per distinct subset); a no-op
        elsewhere."""
        ks = self._check_ks(ks)
        if not self._nests(ks):
            return
        if label is None:
            labs = [None]
        else:
            lab = torch.as_tensor(label, dtype=torch.long, device="cpu").reshape(-1)
            labs = torch.unique(self.check_label(lab, lab.numel())).tolist()
        for lab in labs:
            if self.kind == "bbELS":                      # the edge groups, one k at a time
                for k in ks:
                    self._dictionary(k, lab, interior=False)
            self._nested_dictionary(self._tree_ks(ks), lab)   # last: first call on the budget

    @machine_call
    def denoised_sweep(self, x: torch.Tensor, t: Union[float, torch.Tensor], ks: Sequence[int],
                       label: Union[None, int, torch.Tensor] = None) -> dict[int, torch.Tensor]:
        """``{k: denoised(x, t, k)}``, one nested pass where :meth:`score_sweep` has one."""
        ks = self._check_ks(ks)
        _, means, _ = self._sweep_means(x, t, ks, label)
        return means

    @machine_call
    def eps(self, x: torch.Tensor, t: Union[float, torch.Tensor], label=None, k: Optional[int] = None):
        """Noise prediction ``eps_hat = -b_t * score`` (docs/theory.md section 1)."""
        x = self._check_x(x)
        _, b = self._coefficients(t, x)
        return -b[:, None, None, None] * self.score(x, t, k=k, label=label)

    @machine_call
    def denoised(self, x: torch.Tensor, t, k: Optional[int] = None, label=None) -> torch.Tensor:
        """The machine's estimate of the clean image, E[x0 | x_t] = sum_j w_j centre_j."""
        x = self._check_x(x)
        a, b = self._coefficients(t, x)
        s = self.score(x, t, k=k, label=label)
        return (x + (b**2)[:, None, None, None] * s) / a[:, None, None, None]

    def dictionary_stats(self, k: Optional[int] = None, label: Optional[int] = None) -> dict:
        """Sizes of the dictionary at ``k``: keys before and after merging duplicates."""
        if self.kind == "IS":
            n = int(self._images_for(label)[0].shape[0])
            return {"k": None, "groups": 1, "keys": n, "unique_keys": n}
        d = self._dictionary(self._resolve_k(k), label)
        return {"k": d.k, "groups": len(d.groups), "keys": d.total_keys, "unique_keys": d.unique_keys,
                "deduplicated": d.deduplicated, "materialized_fraction": d.materialized_fraction,
                "bytes": d.nbytes()}

    def release_kept(self) -> int:
        """Drop every cached dictionary's kept keys (the machine gathers them from the images
        again when needed, as it does when memory runs short) and return the bytes the cache
        still holds: what stays resident while other sizes are evaluated."""
        for v in self._cache.values():
            v.release()
        return int(sum(v.nbytes() for v in self._cache.values()))

    # -- internals ------------------------------------------------------------------------
    def _checked_coefficients(self, x, t):
        """Checked x and its schedule coefficients a, b (B,) at t; the score needs b_t > 0."""
        x = self._check_x(x)
        a, b = self._coefficients(t, x)                                                # (B,), (B,)
        if torch.any(b <= 0):
            raise ValueError("the score is undefined at t = 0 (b_t = 0); use t > 0")
        return x, a, b

    def _coefficients(self, t, x):
        """(a, b) (B,) at t for x: computed on the CPU (where the schedules' tables are),
        on x's device and in its dtype."""
        a, b = self.schedule.alpha_sigma(self._check_t(t, x.shape[0], x.dtype), dtype=x.dtype)
        return a.to(x.device), b.to(x.device)

    def _check_ks(self, ks) -> tuple[int, ...]:
        ks = tuple(ks)
        if not ks:
            raise ValueError("ks is empty; give one or more odd patch sizes")
        for k in ks:
            _check_k(k)
        return tuple(sorted(set(ks)))

    def _support_time(self, x, t) -> Optional[float]:
        """The one time of a call of a machine with shaped supports (they are per step), else None."""
        if self.supports is None:
            return None
        t_vec = self._check_t(t, x.shape[0], torch.float64)
        if bool((t_vec != t_vec[0]).any()):
            raise ValueError("a machine with shaped supports takes one t per call (its support is per step)")
        return float(t_vec[0])

    def _means(self, x, a, b, k, labels, diagnostics=False, norms=False, t=None):
        """(mean centre (B, C, H, W), diagnostics or None, log2 normaliser (B, H, W) float64
        or None) at one k, one class subset at a time.  With ``norms``, items whose label has
        no images here keep mean 0 and normaliser -inf (see :meth:`partial`).  ``t``: the
        call's time, for shaped supports."""
        if labels is None:
            return self._mean_centre(x, a, b, k, None, diagnostics, norms, t)
        B, _, H, W = x.shape
        mean = torch.zeros_like(x)
        norm = torch.full((B, H, W), float("-inf"), dtype=torch.float64, device=x.device) if norms else None
        parts = []
        for lab, sel in self._label_groups(labels):
            m_l, d_l, n_l = self._mean_centre(x[sel], a[sel], b[sel], k, lab, diagnostics, norms, t)
            mean[sel] = m_l
            if norms:
                norm[sel] = n_l
            parts.append((sel, d_l))
        return mean, (_merge_diag(parts, B) if diagnostics and parts else None), norm

    def _label_groups(self, labels: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """[(label, item indices)] for the labels of ``labels`` that have images here."""
        return [(int(lab), (labels == lab).nonzero().flatten()) for lab in torch.unique(labels).tolist()
                if lab in self.labels_present]

    @property
    def labels_present(self) -> frozenset:
        """The labels that have training images here (empty without labels)."""
        if self._labels_present is None:
            self._labels_present = frozenset() if self.labels is None else frozenset(torch.unique(self.labels).tolist())
        return self._labels_present

    @staticmethod
    def _score_from_mean(x, a, b, mean):
        return -(x - a[:, None, None, None] * mean) / (b**2)[:, None, None, None]

    def _sweep_means(self, x, t, ks, label, norms=False):
        """((x, a, b), {k: mean centre (B, C, H, W)}, {k: log2 normaliser (B, H, W)} or
        None) for a sweep over ``ks``; ``norms`` as in :meth:`_means`."""
        x, a, b = self._checked_coefficients(x, t)
        B, _, H, W = x.shape
        labels = self.check_label(label, B, present=not norms)
        if not self._nests(ks):
            t_s = self._support_time(x, t)
            res = {k: self._means(x, a, b, k, labels, norms=norms, t=t_s) for k in ks}
            return (x, a, b), {k: r[0] for k, r in res.items()}, ({k: r[2] for k, r in res.items()} if norms else None)
        tree_ks = self._tree_ks(ks)
        means = {k: torch.full_like(x, float("nan") if labels is None else 0.0) for k in ks}
        lnorms = ({k: torch.full((B, H, W), float("-inf"), dtype=torch.float64, device=x.device) for k in ks}
                  if norms else None)
        groups = [(None, torch.arange(B, device=x.device))] if labels is None else self._label_groups(labels)
        for lab, sel in groups:
            xs, a_s, b_s = x[sel], a[sel], b[sel]
            got = {} if norms else None
            out = nested_softmax_average(self._nested_dictionary(tree_ks, lab), xs, a_s, b_s, ks=tree_ks,
                                         log_norms=got, row_block=nested_row_block(self.device, self._tile_elems(x)))
            for k in ks:
                mean = out[k] if k in out else torch.full_like(xs, float("nan"))
                norm = None
                if norms:
                    norm = got.get(k, torch.full((len(sel), H, W), float("nan"), dtype=torch.float64, device=x.device))
                if self.kind == "bbELS":                  # the tree answers the interior group
                    self._edge_means(mean, xs, a_s, b_s, k, lab, norm)
                means[k][sel] = mean
                if norms:
                    lnorms[k][sel] = norm
        return (x, a, b), means, lnorms

    def _edge_means(self, mean, x, a, b, k, label, norm=None) -> None:
        """Write into ``mean`` (B, C, H, W) the bbELS answer at the pixels outside the
        interior group at k (those within k // 2 of an edge), one k at a time; and into
        ``norm`` (B, H, W), if given, their log2 normalisers."""
        dic = self._dictionary(k, label, interior=False)
        if not dic.groups:
            return
        B, C, H, W = x.shape
        res = grouped_softmax_average(dic, F.unfold(x, k, padding=k // 2), a, b, log_norm=norm is not None,
                                      tile_elems=self._tile_elems(x))
        pix = torch.cat([g.query_pixels for g in dic.groups])
        mean.view(B, C, H * W)[:, :, pix] = res.mean_centre[:, :, pix]
        if norm is not None:
            norm.view(B, H * W)[:, pix] = res.log2_norm[:, pix]

    def _tree_ks(self, ks) -> tuple[int, ...]:
        """The sizes of ks a nested tree answers: all of them for periodic ELS; for bbELS
        those with an interior group (k <= min(H, W)); none for other machines."""
        if self.kind == "ELS" and self.dictionary == "periodic":
            return tuple(ks)
        if self._interior_keys:
            return tuple(k for k in ks if k <= min(self.image_shape[1:]))
        return ()

    @property
    def _interior_keys(self) -> bool:
        """Whether a tree of this machine holds the patches that fit inside the image
        (bbELS's interior group, and ELS's 'valid' dictionary)."""
        return self.kind == "bbELS" or (self.kind == "ELS" and self.dictionary == "valid")

    def _nests(self, ks) -> bool:
        """Whether a sweep over ks runs as one nested pass (see score_sweep): two or more
        sizes the tree answers, or any that a tree prepared before covers.

        Periodic ELS nests when the tree's bookkeeping fits half the budget.  bbELS nests
        only when its whole tree, rows included, fits the three quarters of the budget that
        dictionaries may keep: its one-k-at-a-time evaluation is cheap (interior pixels meet
        interior keys only), and rows the tree cannot keep are gathered from the images
        (cache misses, ~10 ns an element at N = 5000), which costs more than nesting saves
        (measured on MNIST-5k, 2026-12-02: with float rows, at the 2 GB default the tree kept 47%
        and the sweep took 20.8 s against 17.1 s one k at a time).  Images with at most 256 distinct values
        keep their rows as byte codes (:func:`._nested.palette_of`): MNIST-5k's tree at k =
        3..15 then needs 1.2 GB instead of 2.8 GB and nests at the default budget.  ELS's
        'valid' dictionary has the same keys as the interior tree and follows the same rule.
        """
        tree_ks = self._tree_ks(ks)
        if not tree_ks or self.supports is not None:          # shaped supports: one k at a time
            return False
        if len(tree_ks) < 2:
            return any(key[0] == "nested" and set(tree_ks) <= set(key[1]) for key in self._cache)
        N, C, H, W = self.images.shape
        if self._interior_keys:
            if self._palette_coded is None:                  # the tree keeps rows as byte codes
                self._palette_coded = palette_of(self.images) is not None
            fits = interior_tree_bytes(N, C, H, W, tree_ks, self.images.element_size(), coded=self._palette_coded)
            return fits <= self.memory_budget * 3 // 4
        return nested_dictionary_bytes(N * H * W, len(tree_ks), C) <= self.memory_budget // 2

    def _nested_dictionary(self, ks, label) -> NestedDictionary:
        """A cached nested dictionary for label whose sizes include ks (the smallest such),
        else a new one for ks; same memory policy as _dictionary."""
        covering = [key for key in self._cache
                    if key[0] == "nested" and key[2] == label and set(ks) <= set(key[1])]
        key = min(covering, key=lambda kk: len(kk[1])) if covering else ("nested", tuple(ks), label)
        if key in self._cache:
            self._cache.move_to_end(key)
            d = self._cache[key]
        else:
            imgs, ids = self._images_for(label)
            mode = {"bbELS": "interior", "ELS": "valid" if self.dictionary == "valid" else "circular"}[self.kind]
            d = build_nested_dictionary(imgs, ks, image_ids=ids, mode=mode)
            self._cache[key] = d
            self._evict_over_half_budget()
        self._materialize_within_budget(d)
        return d

    def _mean_centre(self, x, a, b, k, label, diagnostics, norms=False, t=None):
        B, C, H, W = x.shape
        imgs, ids = self._images_for(label)
        if self.kind == "IS":
            return _ideal_mean(imgs, ids, x, a, b, diagnostics, norms)
        scale = None
        if self.supports is not None:
            k, weights = self.supports.window(t, k)               # erf-area may widen the window
            scale = column_scale(weights, C, x.dtype, x.device)
        dic = self._dictionary(k, label)
        r = k // 2
        if dic.mode == "zeros":
            q = F.unfold(x, k, padding=r)                                              # (B, Ckk, HW)
        else:
            q = F.unfold(_circular_pad(x, r), k)                                        # (B, Ckk, HW)
        res = grouped_softmax_average(dic, q, a, b, diagnostics=diagnostics, log_norm=norms, col_scale=scale,
                                      tile_elems=self._tile_elems(x))
        mean = res.mean_centre.reshape(B, C, H, W)
        norm = res.log2_norm.reshape(B, H, W) if norms else None
        if not diagnostics:
            return mean, None, norm
        src = res.winner_source.reshape(B, H, W, 3)
        diag = ScoreDiagnostics(src[..., 0], src[..., 1], src[..., 2],
                                res.winner_weight.reshape(B, H, W),
                                res.winner_count.reshape(B, H, W), res.entropy.reshape(B, H, W))
        return mean, diag, norm

    def _tile_elems(self, x) -> int:
        """The engine's tile size here (:func:`._device.engine_tile_elems`)."""
        return engine_tile_elems(self.device, x.dtype, self.memory_budget)

    def _images_for(self, label):
        if label is None:
            return self.images, torch.arange(self.images.shape[0], device=self.device)
        ids = (self.labels == label).nonzero().flatten()
        return self.images[ids], ids

    def _dictionary(self, k: int, label: Optional[int], interior: bool = True) -> PatchDictionary:
        """The cached dictionary for (k, label), built on first use (bbELS with
        ``interior=False``: without the interior group, see :meth:`_edge_means`).

        Memory policy (``memory_budget``): dictionaries' bookkeeping stays within half the
        budget (least recently used dictionaries are dropped); on top of that the
        dictionary in use materialises its keys (:meth:`PatchDictionary.materialize`)
        up to three quarters of the budget in all, releasing older dictionaries'
        materialised keys first.  The rest of the budget is the kernel's working memory.
        """
        key = (k, label) if interior else ("edges", k, label)
        if key in self._cache:
            self._cache.move_to_end(key)
            d = self._cache[key]
        else:
            imgs, ids = self._images_for(label)
            mode = {"LS": "zeros", "bbELS": "zeros"}.get(self.kind) or (
                "circular" if self.dictionary == "periodic" else "valid")
            d = build_dictionary(self.kind, imgs, k, mode=mode, image_ids=ids,
                                 dedup_budget=self.memory_budget // 2, interior=interior)
            self._cache[key] = d
            self._evict_over_half_budget()
        # NB: edge groups (bbELS sweeps) only use the budget that is free: the nested tree's
        # kept rows serve every interior pixel and are worth more than theirs
        self._materialize_within_budget(d, release_others=interior)
        return d

    def _evict_over_half_budget(self) -> None:
        """Bring the cache within half the budget: drop older dictionaries' kept (materialised)
        rows first, which cost only a gather to bring back, then the least recently used
        dictionaries themselves (a rebuild)."""
        def over() -> bool:
            return sum(v.nbytes() for v in self._cache.values()) > self.memory_budget // 2
        for other in list(self._cache.values())[:-1]:                        # oldest first
            if not over():
                return
            other.release()
        while len(self._cache) > 1 and over():
            self._cache.popitem(last=False)

    def _materialize_within_budget(self, d, release_others: bool = True) -> None:
        """Materialise d's keys up to 3/4 of the budget, releasing older dictionaries' first
        (unless ``release_others`` is False: then only into the free part of it)."""
        if d.materialized_fraction >= 1:
            return
        limit = self.memory_budget * 3 // 4
        need = d.unmaterialized_bytes()
        for other in list(self._cache.values())[:-1] if release_others else []:   # oldest first
            if sum(v.nbytes() for v in self._cache.values()) + need <= limit:
                break
            other.release()
        d.materialize(limit - sum(v.nbytes() for v in self._cache.values()))

    def _resolve_k(self, k):
        if self.kind == "IS":
            return None
        k = self.default_k if k is None else k
        if k is None:
            raise ValueError(f"{self.kind} needs a patch size: pass k= to score() or build_machine()")
        _check_k(k)
        return int(k)

    def _check_x(self, x):
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"x must be a (B, C, H, W) tensor; got {getattr(x, 'shape', type(x))}")
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x has shape (C, H, W) = {tuple(x.shape[1:])} but the dictionary images are "
                             f"{self.image_shape}; resize the input or build the machine on matching data")
        if x.dtype != self.images.dtype:
            raise ValueError(f"x is {x.dtype} but the machine's images are {self.images.dtype}; convert one")
        if not torch.all(torch.isfinite(x)):
            raise ValueError("x contains NaN or infinite values")
        return x

    @staticmethod
    def _check_t(t, B, dtype):
        t = torch.as_tensor(t, dtype=dtype, device="cpu")
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must be a float or a ({B},) tensor; got shape {tuple(t.shape)}")
        return t

    def check_label(self, label, B: int, present: bool = True) -> Optional[torch.Tensor]:
        """None, an int for every item, or one label per item -> (B,) long tensor or None.

        Raises ValueError when the machine has no labels or (``present``) a label has no
        training images.
        """
        if label is None:
            return None
        if self.labels is None:
            raise ValueError("a label was given but the machine was built without labels; pass labels= to build_machine")
        lab = torch.as_tensor(label, dtype=torch.long, device=self.device)
        if lab.ndim == 0:
            lab = lab.expand(B)
        if lab.shape != (B,):
            raise ValueError(f"label must be an int or a ({B},) tensor; got shape {tuple(lab.shape)}")
        have = self.labels_present
        missing = sorted(set(lab.tolist()) - have) if present else []
        if missing:
            raise ValueError(f"no training images with label(s) {missing}; labels present: {sorted(have)}")
        return lab


def build_machine(kind: str, images: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                  schedule: Union[str, NoiseSchedule] = "cosine-legacy", dictionary: str = "periodic",
                  k: Optional[int] = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                  supports: Optional[SupportSchedule] = None,
                  device: Union[None, str, torch.device] = None) -> ScoreMachine:
    """Build a closed-form score machine over training images.

    Args:
        kind: "IS" (ideal score), "LS" (local score), "ELS" (equivariant local score) or
            "bbELS" (boundary-broken ELS); see docs/theory.md section 2.
        images: (N, C, H, W) training images, usually in [-1, 1]; float32 or float64 (the
            computation runs in this dtype).
        labels: optional (N,) integer class labels, enabling ``label=`` in ``score``.
        schedule: noise schedule name or object giving (a_t, b_t).
        dictionary: ELS only: "periodic" (every patch at every location with wrap-around,
            the theory) or "valid" (interior patches only, the authors' public code).
        k: default odd patch size for ``score`` (not used by IS).
        memory_budget: bytes; cached dictionaries are evicted beyond half of it and the
            kernel's tiles are small, so memory is bounded whatever N, H, W and k are.
        supports: shaped supports per step (:mod:`.supports`; LS, ELS, bbELS), None for the
            square k x k windows of the paper.  The machine then takes one t per call, on
            the supports' step grid, and sweeps run one k at a time.
        device: where the machine keeps its dictionaries and computes (``"cuda"``, a
            ``torch.device``); None: where ``images`` are.  The same exact algorithm runs on
            every device (:mod:`._engine`); ``score`` and the other methods take ``x`` on any
            device and answer on ``x``'s.
    Returns:
        :class:`ScoreMachine`.
    """
    if kind not in MACHINE_KINDS:
        raise ValueError(f"unknown machine kind {kind!r}; choose one of {', '.join(MACHINE_KINDS)}")
    if dictionary not in ("periodic", "valid"):
        raise ValueError(f"dictionary must be 'periodic' or 'valid'; got {dictionary!r}")
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) tensor; got {getattr(images, 'shape', type(images))}")
    if images.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"images must be float32 or float64; got {images.dtype}")
    if not torch.all(torch.isfinite(images)):
        raise ValueError("images contain NaN or infinite values")
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long, device=images.device)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},); got {tuple(labels.shape)}")
    if k is not None:
        _check_k(k)
    check_supports(supports, kind)
    if device is not None:
        images = images.to(torch.device(device))
    if labels is not None:
        labels = labels.to(images.device)
    return ScoreMachine(kind, images.contiguous(), labels, get_schedule(schedule), dictionary, k, memory_budget,
                        supports)


def scale_schedule_eps(machine: ScoreMachine, scales: Sequence[int], steps: int):
    """An ``eps(x, t, label)`` callable that uses ``scales[i-1]`` at grid time ``t_i = i/steps``.

    ``scales`` has one odd patch size per step, index 0 = least noise (t = 1/steps), as in
    docs/theory.md's table.  Drive it with :func:`els_audit.sampler.ddim_sample` on the same
    ``steps``.
    """
    if len(scales) != steps:
        raise ValueError(f"need one scale per step: got {len(scales)} scales for {steps} steps")
    for k in scales:
        _check_k(k)

    def eps(x, t, label=None):
        return machine.eps(x, t, label=label, k=scales[_grid_step(t, steps) - 1])

    return eps


# ---------------------------------------------------------------------------------------
def _grid_step(t, steps: int) -> int:
    """i such that t (a float or tensor; its first entry) is the grid time i / steps, 1 <= i <= steps."""
    t0 = float(torch.as_tensor(t).reshape(-1)[0])
    i = int(round(t0 * steps))
    if not 1 <= i <= steps or abs(t0 * steps - i) > 1e-6:
        raise ValueError(f"t = {t0} is not on the {steps}-step grid")
    return i


def _check_k(k) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0 or k % 2 == 0:
        raise ValueError(f"patch size k must be a positive odd integer; got {k!r}")


def _ideal_mean(imgs, ids, x, a, b, diagnostics, norms=False):
    """IS: one softmax over whole images (the optimum of score matching)."""
    B = x.shape[0]
    flat_d = imgs.reshape(imgs.shape[0], -1)                                              # (N, D)
    flat_x = x.reshape(B, -1)                                                            # (B, D)
    mu = flat_d.mean(0)
    d = flat_d - mu                                                                      # p' = p - mu
    q = flat_x - a[:, None] * mu                                                         # q' = q - a mu
    logits = (a / b**2)[:, None] * (q @ d.t()) - ((a**2) / (2 * b**2))[:, None] * (d * d).sum(1)  # (B, N)
    logz = torch.logsumexp(logits, 1, keepdim=True)
    w = torch.exp(logits - logz)                                                         # (B, N)
    mean = (w @ flat_d).reshape(x.shape)
    _, H, W = x.shape[1:]
    norm = None
    if norms:                                          # absolute, as _engine.log2_norm_of
        q64, b64 = q.to(torch.float64), b.to(torch.float64)
        norm = (LOG2E * (logz[:, 0].to(torch.float64) - (q64 * q64).sum(1) / (2 * b64 * b64)))
        norm = norm[:, None, None].expand(B, H, W).contiguous()
    if not diagnostics:
        return mean, None, norm
    best = w.argmax(1)                                                                   # (B,)
    ent = -(w * torch.log(w.clamp_min(torch.finfo(w.dtype).tiny))).sum(1)
    yy, xx = torch.meshgrid(torch.arange(H, device=x.device), torch.arange(W, device=x.device), indexing="ij")
    full = lambda v: v[:, None, None].expand(B, H, W).clone()  # noqa: E731
    diag = ScoreDiagnostics(full(ids[best]), yy.expand(B, H, W).clone(), xx.expand(B, H, W).clone(),
                            full(w.gather(1, best[:, None])[:, 0]), torch.ones(B, H, W, dtype=torch.long, device=x.device),
                            full(ent))
    return mean, diag, norm


def _merge_diag(parts, B):
    first = parts[0][1]
    fields = {}
    for f in first.__dataclass_fields__:
        ref = getattr(first, f)
        out = torch.zeros((B,) + tuple(ref.shape[1:]), dtype=ref.dtype, device=ref.device)
        for sel, d in parts:
            out[sel] = getattr(d, f)
        fields[f] = out
    return ScoreDiagnostics(**fields)
