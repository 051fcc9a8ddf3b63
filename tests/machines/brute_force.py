"""Brute-force reference machines: explicit loops over pixels and dictionary entries.

Written straight from docs/theory.md section 2, independently of the engine (no grouping, no
deduplication, no dot-product rewriting): for every query pixel p, enumerate the entries
that compete there, compute ||Omega_p(x) - a patch||^2 directly, softmax, average centres.
Only for tiny sizes.
"""


import torch


def window(img, y, x, k, mode):
    """(C, k, k) window of img (C, H, W) centred at (y, x); mode 'zeros' or 'circular'."""
    C, H, W = img.shape
    r = k // 2
    out = torch.zeros(C, k, k, dtype=img.dtype)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            yy, xx = y + dy, x + dx
            if mode == "circular":
                out[:, dy + r, dx + r] = img[:, yy % H, xx % W]
            elif 0 <= yy < H and 0 <= xx < W:
                out[:, dy + r, dx + r] = img[:, yy, xx]
    return out


def pad_pattern(y, x, H, W, r):
    """Zero-padding pattern of the window at (y, x): zero rows/cols on each side."""
    return (max(0, r - y), max(0, y + r - (H - 1)), max(0, r - x), max(0, x + r - (W - 1)))


def entries(kind, images, y, x, k, dictionary):
    """List of (image index, qy, qx, padding mode) competing at pixel (y, x)."""
    N, C, H, W = images.shape
    r = k // 2
    out = []
    for j in range(N):
        if kind == "LS":
            out.append((j, y, x, "zeros"))
        elif kind == "ELS" and dictionary == "periodic":
            out += [(j, qy, qx, "circular") for qy in range(H) for qx in range(W)]
        elif kind == "ELS" and dictionary == "valid":
            out += [(j, qy, qx, "zeros") for qy in range(r, H - r) for qx in range(r, W - r)]
        elif kind == "bbELS":
            pat = pad_pattern(y, x, H, W, r)
            out += [(j, qy, qx, "zeros") for qy in range(H) for qx in range(W)
                    if pad_pattern(qy, qx, H, W, r) == pat]
    return out


def brute_score(kind, images, x, t_a_b, k=None, dictionary="periodic", diagnostics=False, weights=None):
    """Score (B, C, H, W) of the machine at x; t_a_b = list of (a, b) per batch item;
    weights: optional (k, k) per-offset weights of the distance (a shaped support),
    ``sum_o w_o ||q_o - a patch_o||^2`` over channels."""
    w_o = 1.0 if weights is None else weights.to(x.dtype)
    B, C, H, W = x.shape
    s = torch.zeros_like(x)
    diag = []
    for bi in range(B):
        a, b = t_a_b[bi]
        if kind == "IS":
            d2 = torch.stack([((x[bi] - a * images[j]) ** 2).sum() for j in range(images.shape[0])])
            w = torch.softmax(-d2 / (2 * b * b), 0)
            mean = (w[:, None, None, None] * images).sum(0)
            s[bi] = -(x[bi] - a * mean) / b**2
            diag.append(w)
            continue
        qmode = "circular" if kind == "ELS" else "zeros"
        per_pix = {}
        for y in range(H):
            for xx in range(W):
                q = window(x[bi], y, xx, k, qmode)
                ents = entries(kind, images, y, xx, k, dictionary)
                d2 = torch.stack([(w_o * (q - a * window(images[j], qy, qx, k, m)) ** 2).sum()
                                  for j, qy, qx, m in ents])
                logit = -d2 / (2 * b * b)
                w = torch.softmax(logit, 0)
                cen = torch.stack([images[j, :, qy, qx] for j, qy, qx, _ in ents])          # (E, C)
                mean = (w[:, None] * cen).sum(0)
                s[bi, :, y, xx] = -(x[bi, :, y, xx] - a * mean) / b**2
                per_pix[(y, xx)] = (ents, w)
        diag.append(per_pix)
    return (s, diag) if diagnostics else s


def brute_winner(ents, w):
    """The diagnostics' winner of one pixel's brute-force entries: ((image, y, x) of the first
    entry of largest weight, how many entries tie with it, that weight)."""
    wmax = w.max()
    first = next(i for i in range(len(ents)) if w[i] >= wmax * (1 - 1e-9))
    j, qy, qx, _ = ents[first]
    return (j, qy, qx), int((w >= wmax * (1 - 1e-9)).sum()), wmax


def brute_log2_norm(kind, images, x, t_a_b, k=None, dictionary="periodic"):
    """(B, H, W) log2 of the softmax normaliser sum_j exp(-||Omega_p(x) - a patch_j||^2 / (2 b^2))
    over every entry competing at each pixel (duplicates counted), straight from the loops."""
    B, C, H, W = x.shape
    out = torch.zeros(B, H, W, dtype=torch.float64)
    ln2 = torch.log(torch.tensor(2.0, dtype=torch.float64))
    for bi in range(B):
        a, b = t_a_b[bi]
        if kind == "IS":
            d2 = torch.stack([((x[bi] - a * images[j]) ** 2).sum() for j in range(images.shape[0])])
            out[bi] = torch.logsumexp(-d2.double() / (2 * b * b), 0) / ln2
            continue
        qmode = "circular" if kind == "ELS" else "zeros"
        for y in range(H):
            for xx in range(W):
                q = window(x[bi], y, xx, k, qmode)
                ents = entries(kind, images, y, xx, k, dictionary)
                d2 = torch.stack([((q - a * window(images[j], qy, qx, k, m)) ** 2).sum() for j, qy, qx, m in ents])
                out[bi, y, xx] = torch.logsumexp(-d2.double() / (2 * b * b), 0) / ln2
    return out
