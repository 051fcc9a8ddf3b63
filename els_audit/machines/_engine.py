"""The exact grouped-softmax kernel shared by every local machine.

References:
- Kamb & Ganguli, ICML 2025 (arXiv 2412.20292): the machines' score
  ``s(x)[p] = -(x[p] - a * sum_j w_j(p) centre_j) / b^2`` with
  ``w_j(p) = softmax_j(-||Omega_p(x) - a patch_j||^2 / (2 b^2))`` (theory.md section 2).
- Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"; Dao et al. 2022
  (FlashAttention): tiled online log-sum-exp.

The logit is computed as dot-product attention.  With ``q' = q - a*mu`` and
``p' = p - mu`` for the group's mean patch mu (so ``q - a p = q' - a p'``):

    -||q - a p||^2 / (2b^2) = -||q'||^2/(2b^2) + (a/b^2) q'.p' - (a^2/(2b^2)) ||p'||^2

The first term is constant per query and cancels in the softmax.  The other two are one
GEMM of ``[q' * a/b^2, -a^2/(2b^2)]`` against ``[p', ||p'||^2]``, plus the per-key bias
``log(count)`` of merged duplicate keys.  Subtracting mu changes nothing in exact
arithmetic and keeps float32 logits small (MNIST keys are mostly the -1 background).

The softmax is normalised over the whole key set of a group with an online log-sum-exp over
key chunks (never per batch): memory is O(tile), whatever the dictionary size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ._dictionary import PatchDictionary

__all__ = ["GroupedResult", "grouped_softmax_average"]


@dataclass
class GroupedResult:
    """Per query pixel: the softmax average of key centres, plus optional diagnostics.

    Shapes (B queries, C channels, HW pixels):
      mean_centre: (B, C, HW)
      winner_source: (B, HW, 3) long (image index, y, x) of the highest-weight entry
      winner_weight: (B, HW) weight of that single entry (duplicates share weight equally)
      winner_count: (B, HW) long, how many identical entries share that weight
      entropy: (B, HW) softmax entropy in nats over the full (non-merged) dictionary
    """

    mean_centre: torch.Tensor
    winner_source: Optional[torch.Tensor] = None
    winner_weight: Optional[torch.Tensor] = None
    winner_count: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None


def grouped_softmax_average(
    dic: PatchDictionary,
    queries: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    diagnostics: bool = False,
    tile_elems: int = 1 << 18,
) -> GroupedResult:
    """Softmax-weighted average of key centres for every query pixel.

    Args:
        dic: the machine's patch dictionary at one k.
        queries: (B, K, HW) query patches (``F.unfold`` layout, padded as the machine needs).
        a, b: (B,) schedule coefficients per query image.
        diagnostics: also return the winning entry, its weight and the entropy.
        tile_elems: logits per (query tile x key chunk) tile; bounds the working memory.
    Returns:
        :class:`GroupedResult`.
    """
    B, K, HW = queries.shape
    C = dic.image_shape[0]
    dtype = queries.dtype
    out = torch.empty(B, C, HW, dtype=dtype)
    if diagnostics:
        w_src = torch.empty(B, HW, 3, dtype=torch.long)
        w_wt = torch.empty(B, HW, dtype=dtype)
        w_cnt = torch.empty(B, HW, dtype=torch.long)
        ent = torch.empty(B, HW, dtype=dtype)
    underflow = -87.0 if dtype == torch.float32 else -700.0
    coef_lin = a / b**2                                                                # (B,)
    coef_sq = -(a**2) / (2 * b**2)                                                    # (B,)
    for g in dic.groups:
        P = g.query_pixels.numel()
        q = queries[:, :, g.query_pixels].permute(0, 2, 1)                              # (B, P, K)
        q = q - a[:, None, None] * g.mean                                              # q' = q - a mu
        qa = torch.cat([q * coef_lin[:, None, None],
                        coef_sq[:, None, None].expand(B, P, 1)], dim=2).reshape(B * P, K + 1)
        R = B * P
        M = g.n_keys
        ncol = C + 2 if diagnostics else C + 1                                          # centre, 1, [log count]
        acc = torch.zeros(R, ncol, dtype=dtype)
        m = torch.full((R,), float("-inf"), dtype=dtype)
        if diagnostics:
            t1 = torch.zeros(R, dtype=dtype)
            best = torch.full((R,), float("-inf"), dtype=dtype)
            best_i = torch.zeros(R, dtype=torch.long)
        # tile shape: Rt query rows x Mc keys
        Mc = max(64, min(M, tile_elems // max(1, min(R, 256))))
        buf = None
        for ch in g.chunks(Mc):
            mc = ch.kaug.shape[0]
            Rt = max(1, min(R, tile_elems // mc))
            if buf is None or buf.numel() < Rt * mc:
                buf = torch.empty(Rt * mc, dtype=dtype)
            kaug_t = ch.kaug.t()                                                        # (K+1, mc)
            bias = ch.log_count                                                         # (mc,) or None
            cols = [ch.centre.t(), torch.ones(1, mc, dtype=dtype)]
            if diagnostics:
                cols.append(torch.zeros(1, mc, dtype=dtype) if bias is None else bias[None, :])
            vals_t = torch.cat(cols, 0).t()                                             # (mc, ncol), column-major
            for rs in range(0, R, Rt):
                re = min(R, rs + Rt)
                L = buf[: (re - rs) * mc].view(re - rs, mc)
                if bias is None:
                    torch.mm(qa[rs:re], kaug_t, out=L)                                  # (rt, mc) logits
                else:
                    torch.addmm(bias, qa[rs:re], kaug_t, out=L)
                m_old = m[rs:re]
                m_new = torch.maximum(m_old, L.amax(1))
                if diagnostics:
                    ent_logit = L if bias is None else L - bias                         # per-entry logits
                    bv, bi = ent_logit.max(1)
                    upd = bv > best[rs:re]
                    best[rs:re] = torch.where(upd, bv, best[rs:re])
                    best_i[rs:re] = torch.where(upd, bi + ch.start, best_i[rs:re])
                scale = torch.exp(m_old - m_new)                                        # (rt,) 0 at start
                L.sub_(m_new[:, None])
                if diagnostics:
                    z_old = acc[rs:re, C]
                    shift = torch.where(z_old > 0, (m_old - m_new) * z_old, torch.zeros_like(z_old))
                    t1_chunk = (L.exp() * L).sum(1)
                    t1[rs:re] = scale * (t1[rs:re] + shift) + t1_chunk
                # NB: exp of arguments below ~-87 (float32 underflow) takes a slow scalar path,
                # about 13x slower; clamping there changes each such weight by < 1e-37
                # relative to the largest (which is exp(0) = 1): far below float precision.
                L.clamp_(min=underflow).exp_()
                acc[rs:re].mul_(scale[:, None]).add_(torch.mm(L, vals_t))
                m[rs:re] = m_new
        z = acc[:, C]                                                                   # (R,)
        mean_c = (acc[:, :C] / z[:, None]).reshape(B, P, C).permute(0, 2, 1)
        out[:, :, g.query_pixels] = mean_c
        if diagnostics:
            # entropy over entries: H = log Z - T1/Z + T2/Z  (see module docstring of machines)
            h = torch.log(z) - t1 / z + acc[:, C + 1] / z
            ent[:, g.query_pixels] = h.reshape(B, P)
            w = torch.exp(best - m) / z                                                 # single-entry weight
            w_wt[:, g.query_pixels] = w.reshape(B, P)
            w_src[:, g.query_pixels] = g.source(best_i).reshape(B, P, 3)
            w_cnt[:, g.query_pixels] = g.multiplicity(best_i).reshape(B, P)
    if diagnostics:
        return GroupedResult(out, w_src, w_wt, w_cnt, ent)
    return GroupedResult(out)
