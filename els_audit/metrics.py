"""Image-agreement metrics: the paper's r, the true R^2, cosine similarity and MSE.

References:
- M. Kamb and S. Ganguli, "An analytic theory of creativity in convolutional diffusion
  models", ICML 2025 (arXiv 2412.20292).  docs/theory.md section 4: the paper's "r^2" is the
  Pearson correlation r between two images: subtract each image's global mean (over all
  pixels and channels), L2-normalise, take the dot product.  It is r, not its square.
- R^2 = 1 - SSE / SST, the coefficient of determination (docs/theory.md section 4).

Every function accepts torch tensors or numpy arrays and computes in float64.  The single
versions treat the whole input as one image (any shape); the ``*_batch`` versions treat dim
0 as the batch and everything after it as one image.  An undefined value (a constant image
has no correlation; a constant target has SST = 0) is ``nan``, never an exception, so that
one flat sample cannot abort an audit; JSON writers turn it into ``null``.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

__all__ = [
    "pearson_r",
    "pearson_r_batch",
    "r_squared",
    "r_squared_batch",
    "cosine_similarity_batch",
    "mse_batch",
]

ArrayLike = Union[torch.Tensor, np.ndarray]


def _as_f64(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    elif isinstance(x, np.ndarray):
        x = x.astype(np.float64, copy=False)
    else:
        raise ValueError(f"{name} must be a torch tensor or a numpy array; got {type(x).__name__}")
    return x


def _pair(a: ArrayLike, b: ArrayLike, batched: bool, names=("a", "b")) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_f64(a, names[0]), _as_f64(b, names[1])
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape; got {a.shape} and {b.shape}")
    if batched and a.ndim < 2:
        raise ValueError(f"batched metrics need shape (B, ...) with at least 2 dims; got {a.shape}")
    if a.size == 0:
        raise ValueError(f"{names[0]} and {names[1]} are empty")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError(f"{names[0]} or {names[1]} contains NaN or infinite values")
    if batched:
        return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)                   # (B, D)
    return a.reshape(1, -1), b.reshape(1, -1)                                          # (1, D)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return out


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ac = a - a.mean(1, keepdims=True)                                                  # (B, D)
    bc = b - b.mean(1, keepdims=True)                                                  # (B, D)
    na, nb = np.linalg.norm(ac, axis=1), np.linalg.norm(bc, axis=1)                    # (B,)
    r = _safe_div((ac * bc).sum(1), na * nb)                                           # (B,)
    return np.clip(r, -1.0, 1.0)


def _r2(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    sse = ((target - pred) ** 2).sum(1)                                                # (B,)
    sst = ((target - target.mean(1, keepdims=True)) ** 2).sum(1)                       # (B,)
    out = np.full(sse.shape, np.nan)
    ok = sst > 0
    out[ok] = 1.0 - sse[ok] / sst[ok]
    return out


def pearson_r(a: ArrayLike, b: ArrayLike) -> float:
    """The paper's r between two images (docs/theory.md section 4).

    Args:
        a, b: two images of the same shape, e.g. (C, H, W); every element counts.
    Returns:
        r in [-1, 1]: ``<a - mean(a), b - mean(b)> / (|a - mean(a)| |b - mean(b)|)`` with
        the means over all pixels and channels; ``nan`` if either image is constant.
        Symmetric in a and b.
    """
    return float(_pearson(*_pair(a, b, False))[0])


def pearson_r_batch(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """:func:`pearson_r` for each pair of a batch.

    Args:
        a, b: (B, ...) images, e.g. (B, C, H, W).
    Returns:
        float64 (B,) array of r (``nan`` where an image is constant).
    """
    return _pearson(*_pair(a, b, True))


def r_squared(pred: ArrayLike, target: ArrayLike) -> float:
    """Coefficient of determination of ``pred`` as a prediction of ``target``.

    Args:
        pred: the prediction, e.g. the machine's sample (C, H, W).
        target: the thing explained, e.g. the network's sample, same shape.  Its own global
            mean is the baseline: ``SST = sum (target - mean(target))^2``.
    Returns:
        ``1 - SSE / SST`` with ``SSE = sum (target - pred)^2``; 1 for a perfect prediction,
        0 for predicting the target's mean, negative when worse; ``nan`` if the target is
        constant.  Not symmetric: only the target's variance normalises.
    """
    return float(_r2(*_pair(pred, target, False, ("pred", "target")))[0])


def r_squared_batch(pred: ArrayLike, target: ArrayLike) -> np.ndarray:
    """:func:`r_squared` for each pair of a batch.

    Args:
        pred, target: (B, ...) predictions and targets.
    Returns:
        float64 (B,) array (``nan`` where a target is constant).
    """
    return _r2(*_pair(pred, target, True, ("pred", "target")))


def cosine_similarity_batch(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Uncentred cosine similarity per pair (the paper's calibration criterion on scores).

    Args:
        a, b: (B, ...) arrays.
    Returns:
        float64 (B,) array ``<a, b> / (|a| |b|)``; ``nan`` where a vector is zero.
    """
    a2, b2 = _pair(a, b, True)
    c = _safe_div((a2 * b2).sum(1), np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1))
    return np.clip(c, -1.0, 1.0)


def mse_batch(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Mean squared difference per pair.

    Args:
        a, b: (B, ...) arrays.
    Returns:
        float64 (B,) array ``mean((a - b)^2)`` over all elements after dim 0.
    """
    a2, b2 = _pair(a, b, True)
    return ((a2 - b2) ** 2).mean(1)
