"""The paper's published numbers as data, and a lookup of the closest published setting.

References:
- M. Kamb and S. Ganguli, "An analytic theory of creativity in convolutional diffusion
  models", ICML 2025 (arXiv 2412.20292); public code github.com/Kambm/convolutional_diffusion.
- docs/theory.md section 3 (the per-step scales the authors calibrated for their own networks,
  20 steps, index 0 = least noise, as published with their code) and section 4 (median r
  over 100 seeds; networks sampled with 150 DDIM steps, machines with 20).

NB: the published scales were calibrated with the paper's cosine criterion, and the public
code applies the scale calibrated for step i+1 at step i (docs/theory.md section 3).  The table
is reproduced as published, without correcting that shift.

Usage::

    from els_audit.published import closest_published
    m = closest_published("mnist5k", "ResNet", "zeros", conditional=False)
    m.r.els, m.r.is_   # 0.94, 0.61
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

__all__ = [
    "PublishedScales",
    "PublishedR",
    "PublishedMatch",
    "PUBLISHED_SCALES",
    "PUBLISHED_R",
    "R_PROTOCOL",
    "ARCHITECTURES",
    "PADDINGS",
    "normalize_dataset",
    "normalize_arch",
    "normalize_padding",
    "closest_published",
]

ARCHITECTURES = ("ResNet", "UNet", "UNet+attention")
PADDINGS = ("zeros", "circular")

R_PROTOCOL = {
    "statistic": "median over 100 seeds of the Pearson r between the network's and the machine's final samples",
    "network_steps": 150,
    "machine_steps": 20,
    "note": "with the networks sampled at 20 steps the ELS column drops by up to .10",
}


@dataclass(frozen=True)
class PublishedScales:
    """One row of docs/theory.md section 3: per-step patch sizes, index 0 = least noise."""

    dataset: str
    arch: str
    padding: str
    conditional: bool
    scales: tuple[int, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scales"] = list(self.scales)
        return d


@dataclass(frozen=True)
class PublishedR:
    """One row of docs/theory.md section 4: median r of each machine vs the network.

    ``els_net20``: the ELS median when the network is also sampled with 20 steps, where
    docs/theory.md quotes it (else ``None``).
    """

    dataset: str
    arch: str
    padding: str
    conditional: bool
    els: float
    ls: float
    is_: float
    els_net20: Optional[float] = None

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "arch": self.arch, "padding": self.padding,
                "conditional": self.conditional, "els": self.els, "ls": self.ls, "is": self.is_,
                "els_net20": self.els_net20}


def _sc(dataset, arch, padding, cond, text):
    return PublishedScales(dataset, arch, padding, cond, tuple(int(v) for v in text.split()))


PUBLISHED_SCALES: tuple[PublishedScales, ...] = (
    _sc("CIFAR10", "ResNet", "circular", True, "3 3 3 3 5 5 5 5 7 7 7 9 9 11 11 13 13 15 15 15"),
    _sc("CIFAR10", "ResNet", "zeros", True, "3 3 3 3 5 5 5 7 7 7 7 9 9 11 11 13 15 17 17 17"),
    _sc("CIFAR10", "UNet", "zeros", True, "3 3 3 3 5 5 5 5 7 7 7 7 9 9 11 13 13 15 17 25"),
    _sc("CelebA", "ResNet", "zeros", False, "3 3 3 5 5 5 5 5 7 7 9 9 9 11 11 11 13 15 19 19"),
    _sc("CelebA", "UNet", "zeros", False, "3 3 3 3 3 3 3 5 5 5 5 5 7 7 9 9 9 13 19 27"),
    _sc("FashionMNIST", "ResNet", "zeros", True, "3 3 5 5 7 7 9 9 9 11 11 11 13 13 13 15 15 15 17 17"),
    _sc("FashionMNIST", "UNet", "zeros", True, "3 3 5 5 7 7 7 9 11 11 11 13 15 15 21 23 25 25 25 25"),
    _sc("MNIST", "ResNet", "circular", False, "3 3 5 5 5 7 7 9 9 9 11 11 11 11 9 9 7 7 3 3"),
    _sc("MNIST", "ResNet", "zeros", False, "3 3 5 5 5 7 7 7 9 9 11 11 11 11 13 15 15 15 15 15"),
    _sc("MNIST", "UNet", "zeros", False, "3 3 3 5 5 7 7 7 9 9 9 11 13 15 17 21 23 23 25 27"),
)

PUBLISHED_R: tuple[PublishedR, ...] = (
    PublishedR("MNIST", "UNet", "zeros", False, 0.89, 0.88, 0.70),
    PublishedR("CIFAR10", "UNet", "zeros", True, 0.90, 0.87, 0.41, els_net20=0.82),
    PublishedR("FashionMNIST", "UNet", "zeros", True, 0.93, 0.93, 0.80),
    PublishedR("CelebA", "UNet", "zeros", False, 0.85, 0.90, 0.55, els_net20=0.75),
    PublishedR("MNIST", "ResNet", "zeros", False, 0.94, 0.82, 0.61),
    PublishedR("MNIST", "ResNet", "circular", False, 0.77, 0.36, 0.15),
    PublishedR("CIFAR10", "ResNet", "zeros", True, 0.95, 0.90, 0.42),
    PublishedR("CIFAR10", "ResNet", "circular", True, 0.94, 0.83, 0.35),
    PublishedR("FashionMNIST", "ResNet", "zeros", True, 0.94, 0.88, 0.68),
    PublishedR("CelebA", "ResNet", "zeros", False, 0.96, 0.90, 0.47),
    PublishedR("CIFAR10", "UNet+attention", "zeros", True, 0.77, 0.77, 0.48),
)

_DATASET_ALIASES = {  # keys pass through _key() below
    "mnist": "MNIST", "mnist5k": "MNIST",
    "fashionmnist": "FashionMNIST", "fmnist": "FashionMNIST",
    "cifar10": "CIFAR10", "cifar": "CIFAR10",
    "celeba": "CelebA",
}
_ARCH_ALIASES = {
    "resnet": "ResNet", "unet": "UNet",
    "unet+attention": "UNet+attention", "UNet + self-attention": "UNet+attention",
    "unet-attention": "UNet+attention", "unet+attn": "UNet+attention", "attention": "UNet+attention",
}
_PADDING_ALIASES = {"zeros": "zeros", "zero": "zeros", "circular": "circular", "periodic": "circular"}


def _key(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum() or ch == "+")


_DATASET_ALIASES = {_key(k): v for k, v in _DATASET_ALIASES.items()}
_ARCH_ALIASES = {_key(k): v for k, v in _ARCH_ALIASES.items()}
_PADDING_ALIASES = {_key(k): v for k, v in _PADDING_ALIASES.items()}


def normalize_dataset(name: Optional[str]) -> Optional[str]:
    """The published data set a name refers to, or ``None`` if it is none of them.

    Case, dashes, underscores and spaces are ignored, and a spec's options are dropped:
    ``"mnist5k:size=32"``, ``"MNIST"`` -> ``"MNIST"``; ``"fashion-mnist"`` ->
    ``"FashionMNIST"``; ``"cifar-10"`` -> ``"CIFAR10"``; ``"my_faces"`` -> ``None``.
    """
    if name is None:
        return None
    return _DATASET_ALIASES.get(_key(str(name).split(":", 1)[0]))


def normalize_arch(arch: Optional[str]) -> Optional[str]:
    """``"resnet"`` -> ``"ResNet"``, ``"UNet"`` -> ``"UNet"``, ``"unet+attention"`` ->
    ``"UNet+attention"``; ``None`` stays ``None`` (unknown).  Anything else raises."""
    if arch is None:
        return None
    got = _ARCH_ALIASES.get(_key(str(arch)))
    if got is None:
        raise ValueError(f"unknown architecture family {arch!r}; use one of {', '.join(ARCHITECTURES)} or None")
    return got


def normalize_padding(padding: Optional[str]) -> Optional[str]:
    """``"zeros"``/``"zero"`` -> ``"zeros"``, ``"circular"``/``"periodic"`` -> ``"circular"``;
    ``None`` stays ``None`` (unknown, or mixed).  Anything else raises."""
    if padding is None:
        return None
    got = _PADDING_ALIASES.get(_key(str(padding)))
    if got is None:
        raise ValueError(f"unknown padding {padding!r}; use one of {', '.join(PADDINGS)} or None")
    return got


@dataclass(frozen=True)
class PublishedMatch:
    """The closest published rows to a setting, with the fields in which they differ.

    ``r``: the closest row of :data:`PUBLISHED_R`; ``r_differs``: the names of the fields
    (``dataset``, ``arch``, ``padding``, ``conditional``) where it does not match the query
    (an unknown query field counts as a difference).  ``scales`` / ``scales_differs``: the
    same for :data:`PUBLISHED_SCALES`.  ``exact``: the r row matches on every field.
    """

    query: dict
    r: PublishedR
    r_differs: tuple[str, ...]
    scales: PublishedScales
    scales_differs: tuple[str, ...]

    @property
    def exact(self) -> bool:
        return not self.r_differs

    def to_dict(self) -> dict:
        return {"query": dict(self.query), "r": self.r.to_dict(), "r_differs": list(self.r_differs),
                "scales": self.scales.to_dict(), "scales_differs": list(self.scales_differs),
                "exact": self.exact, "protocol": dict(R_PROTOCOL)}


# NB: "closest" is a lexicographic preference, our choice: architecture family first (it
# decides locality: ResNet vs UNet vs attention), then padding (it decides ELS vs bbELS),
# then data set, then conditioning.  A UNet and a UNet+attention share half the
# architecture weight (still listed as differing in "arch").  Ties go to the first row in
# table order.
_WEIGHTS = (("arch", 8), ("padding", 4), ("dataset", 2), ("conditional", 1))


def _closest(rows, q):
    best, best_score, best_diff = None, -1, ()
    for row in rows:
        score, diff = 0, []
        for field, w in _WEIGHTS:
            if q[field] is not None and getattr(row, field) == q[field]:
                score += w
                continue
            diff.append(field)
            if field == "arch" and q[field] is not None and {row.arch, q[field]} == {"UNet", "UNet+attention"}:
                score += w // 2
        if score > best_score:
            best, best_score, best_diff = row, score, tuple(diff)
    return best, best_diff


def closest_published(dataset: Optional[str], arch: Optional[str], padding: Optional[str],
                      conditional: Optional[bool]) -> PublishedMatch:
    """The published setting closest to ours, to print the paper's numbers beside ours.

    Args:
        dataset: data set name or spec (see :func:`normalize_dataset`); an unknown one
            matches no row on this field.
        arch: architecture family (see :func:`normalize_arch`) or ``None`` if unknown.
        padding: ``"zeros"``, ``"circular"`` or ``None`` if unknown.
        conditional: class-conditional model, or ``None`` if unknown.
    Returns:
        :class:`PublishedMatch`.
    Raises:
        ValueError: an architecture or padding name that is not recognised.
    """
    if conditional is not None and not isinstance(conditional, bool):
        raise ValueError(f"conditional must be True, False or None; got {conditional!r}")
    q = {"dataset": normalize_dataset(dataset), "arch": normalize_arch(arch),
         "padding": normalize_padding(padding), "conditional": conditional}
    r, r_diff = _closest(PUBLISHED_R, q)
    s, s_diff = _closest(PUBLISHED_SCALES, q)
    query = dict(q, dataset_given=None if dataset is None else str(dataset))
    return PublishedMatch(query=query, r=r, r_differs=r_diff, scales=s, scales_differs=s_diff)
