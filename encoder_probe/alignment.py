"""Representation alignment between two encoders on the same images, and how far weights moved.

- Mutual k-NN (Huh et al. 2024, "The Platonic Representation Hypothesis"): rows L2-normalised,
  each image's k nearest neighbours (cosine, itself excluded) in both spaces; the score is the
  mean fraction of neighbours the two spaces share.
- Linear CKA: biased (Kornblith et al. 2019, HSIC_0 of centred Gram matrices) and unbiased
  (HSIC_1 of Song et al. 2012, as Nguyen et al. 2021 use it): the biased estimate of two
  *independent* representations grows with width / n, the unbiased one stays near 0.
- A permutation null (one side's rows shuffled across images) turns any score into a z-value
  and a calibrated difference, because raw scores also grow with width and depth.
- Weight drift: per-block relative change ||b - a|| / ||a|| of two checkpoints of one architecture.

Every metric prepares each side once (neighbour lists, a Gram matrix); a permutation then only
re-indexes the prepared state, so R null repeats cost R * O(n^2) instead of R feature passes.
Work runs in float64 on any torch device.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import numpy as np
import torch

from .errors import DataError, SpecError


def as_rows(x, device=None) -> torch.Tensor:
    """(n, d) float64 tensor on ``device``; anything else is a one-line error."""
    t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
    if t.ndim != 2:
        raise DataError(f"alignment needs (images, features) arrays, got shape {tuple(t.shape)}")
    t = t.to(device=device or t.device, dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise DataError(f"alignment: {int((~torch.isfinite(t)).any(1).sum())} of {len(t)} feature rows "
                        "contain NaN or inf")
    return t


def check_pair(x, y) -> None:
    """The two sides must be the same images in the same order."""
    if len(x) != len(y):
        raise DataError(f"alignment needs the same images on both sides: {len(x)} rows vs {len(y)} rows")


# -- mutual k-NN --------------------------------------------------------------------------------
def knn_indices(x, k: int, device=None) -> torch.Tensor:
    """(n, k) indices of each row's k most cosine-similar other rows (most similar first)."""
    x = as_rows(x, device)
    n = len(x)
    if not 1 <= k < n:
        raise DataError(f"mutual k-NN needs 1 <= k < number of images, got k={k} for {n} images")
    x = torch.nn.functional.normalize(x, dim=1)
    sims = x @ x.T
    sims.fill_diagonal_(-torch.inf)  # an image is not its own neighbour
    return sims.topk(k, dim=1).indices


def knn_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of |a_i ∩ b_i| / k for (n, k) neighbour lists (no repeats within a row)."""
    shared = (a[:, :, None] == b[:, None, :]).any(-1).sum(1)
    return float(shared.double().mean() / a.shape[1])


class MutualKNN:
    """Mutual k-NN alignment; ``prepare`` keeps each side's neighbour lists."""

    higher_is_better = True

    def __init__(self, k: int = 10, device=None):
        self.k, self.device = k, device
        self.name = "mutual_knn"

    def prepare(self, x) -> torch.Tensor:
        return knn_indices(x, self.k, self.device)

    def score(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return knn_overlap(a, b)

    @staticmethod
    def permute(b: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """Neighbour lists of the rows ``y[perm]``: row i is old row perm[i], renamed by perm's inverse."""
        return torch.argsort(perm)[b[perm]]

    def __call__(self, x, y) -> float:
        check_pair(x, y)
        return self.score(self.prepare(x), self.prepare(y))


def mutual_knn_alignment(x, y, k: int = 10, device=None) -> float:
    """Mean fraction of shared k nearest neighbours (cosine, self excluded); 1 = same neighbourhoods."""
    return MutualKNN(k, device)(x, y)


# -- CKA ----------------------------------------------------------------------------------------
def _hsic(a: torch.Tensor, b: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """HSIC up to a factor that cancels in CKA; ``a``, ``b`` are prepared Gram matrices
    (centred for the biased estimate, zero diagonal for the unbiased one)."""
    if not unbiased:
        return (a * b).sum()
    n = len(a)
    ones_a, ones_b = a.sum(0), b.sum(0)
    return ((a * b).sum() + ones_a.sum() * ones_b.sum() / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (ones_a @ ones_b)) / (n * (n - 3))


class LinearCKA:
    """Linear CKA, biased (Kornblith 2019) or unbiased (HSIC_1); ``prepare`` keeps the Gram matrix."""

    higher_is_better = True

    def __init__(self, unbiased: bool = False, device=None):
        self.unbiased, self.device = unbiased, device
        self.name = "cka_unbiased" if unbiased else "cka_linear"

    def prepare(self, x) -> tuple[torch.Tensor, float]:
        x = as_rows(x, self.device)
        n = len(x)
        if self.unbiased and n < 4:
            raise DataError(f"unbiased CKA needs at least 4 images, got {n}")
        gram = x @ x.T
        if self.unbiased:
            gram.fill_diagonal_(0)
        else:  # H K H: permuting rows and centring commute, so permutations keep it centred
            gram = gram - gram.mean(0, keepdim=True) - gram.mean(1, keepdim=True) + gram.mean()
        self_hsic = float(_hsic(gram, gram, self.unbiased))
        if not self_hsic > 0:
            raise DataError(f"{self.name}: the features do not vary across the {n} images (HSIC {self_hsic:.3g}; "
                            "constant features, or too few images)")
        return gram, self_hsic

    def score(self, a, b) -> float:
        return float(_hsic(a[0], b[0], self.unbiased)) / np.sqrt(a[1] * b[1])

    @staticmethod
    def permute(b, perm: torch.Tensor):
        return b[0][perm[:, None], perm[None, :]], b[1]  # one gather of the n x n matrix

    def __call__(self, x, y) -> float:
        check_pair(x, y)
        return self.score(self.prepare(x), self.prepare(y))


def linear_cka(x, y, unbiased: bool = False, device=None) -> float:
    """Linear CKA of two (n, d) feature arrays of the same images; 1 = equal up to rotation and scale."""
    return LinearCKA(unbiased, device)(x, y)


# -- permutation null ---------------------------------------------------------------------------
@dataclass
class Null:
    """A score beside its permutation null: the score of ``repeats`` random image pairings."""

    score: float
    values: np.ndarray

    @property
    def mean(self) -> float:
        return float(self.values.mean())

    @property
    def std(self) -> float:
        return float(self.values.std(ddof=1)) if len(self.values) > 1 else 0.0

    @property
    def z(self) -> float | None:
        """(score - null mean) / null std; None when the null has no spread."""
        return (self.score - self.mean) / self.std if self.std > 0 else None

    @property
    def calibrated(self) -> float:
        """score - null mean: what the pairing of the images adds over chance."""
        return self.score - self.mean

    @property
    def p_value(self) -> float:
        """One-sided permutation p-value, (1 + #null >= score) / (1 + repeats)."""
        return float((1 + (self.values >= self.score).sum()) / (1 + len(self.values)))

    def as_dict(self) -> dict:
        q05, q50, q95 = np.quantile(self.values, [0.05, 0.5, 0.95]).tolist()
        return {"score": self.score, "mean": self.mean, "std": self.std, "q05": q05, "q50": q50, "q95": q95,
                "z": self.z, "calibrated": self.calibrated, "p_value": self.p_value, "repeats": len(self.values)}


def permutations(n: int, repeats: int, seed: int):
    """The same ``repeats`` permutations of n rows for a seed, on every device."""
    rng = np.random.default_rng(seed)
    for _ in range(repeats):
        yield torch.from_numpy(rng.permutation(n))


def permutation_null(metric, x, y, repeats: int = 100, seed: int = 0, progress: bool = False, prepared=None,
                     label: str | None = None) -> Null:
    """Score ``metric(x, y)`` and its null: ``y``'s rows shuffled across images ``repeats`` times.

    ``metric`` is a MutualKNN / LinearCKA (each side prepared once, permutations re-index the
    prepared state) or any callable ``(x, y) -> float`` (recomputed on every shuffle).
    ``prepared``: (state of x, state of y) when the caller already has them. ``progress``: a bar
    on stderr, ``align [LABEL] null METRIC`` (``label``: the encoders compared, e.g.
    ``timm:vit_small@dpo… vs timm:vit_small@sft…``), one step per shuffle.
    """
    from tqdm.auto import tqdm
    if repeats < 2:
        raise SpecError(f"a permutation null needs repeats >= 2, got {repeats}")
    check_pair(x, y)
    name = f"align [{label}]" if label else "align"
    shuffles = tqdm(permutations(len(y), repeats, seed), total=repeats, disable=not progress, file=sys.stderr,
                    desc=f"{name} null {getattr(metric, 'name', 'metric')} (seed {seed})", unit="shuffle")
    if hasattr(metric, "prepare"):
        a, b = prepared or (metric.prepare(x), metric.prepare(y))
        index = (b[0] if isinstance(b, tuple) else b).device
        score = metric.score(a, b)
        values = [metric.score(a, metric.permute(b, perm.to(index))) for perm in shuffles]
    else:
        score = float(metric(x, y))
        values = [float(metric(x, y[perm.numpy()] if isinstance(y, np.ndarray) else y[perm])) for perm in shuffles]
    return Null(float(score), np.asarray(values, dtype=np.float64))


# -- weight drift -------------------------------------------------------------------------------
_NUMBERED = re.compile(r"^(.*?\.(\d+))\.")


def parameter_group(key: str) -> tuple[str, int | None]:
    """(group, block number) of a state-dict key: up to its first numbered module ('blocks.3',
    'encoder.layers.3' -> block 3), else the module that holds it ('patch_embed.proj', 'norm')."""
    m = _NUMBERED.match(key)
    if m:
        return m.group(1), int(m.group(2))
    return key.rpartition(".")[0] or key, None


def same_architecture(a: dict, b: dict) -> bool:
    """Same keys with the same shapes."""
    return a.keys() == b.keys() and all(tuple(a[k].shape) == tuple(b[k].shape) for k in a)


def weight_drift(state_a: dict, state_b: dict) -> list[dict]:
    """Per parameter group, in state-dict order: relative change ||b - a|| / ||a|| (L2 over all
    its floating tensors), absolute change, and size. ``block`` is the group's number (timm
    'blocks.k' / HF 'layers.k', whose output is layer k + 1), None for embeddings and norms."""
    if not same_architecture(state_a, state_b):
        only = sorted(state_a.keys() ^ state_b.keys())[:3]
        shapes = [k for k in state_a.keys() & state_b.keys() if tuple(state_a[k].shape) != tuple(state_b[k].shape)]
        raise SpecError(f"weight drift needs one architecture: keys {only or shapes[:3]} differ")
    groups: dict[str, dict] = {}
    for key, a in state_a.items():
        if not torch.is_floating_point(a):
            continue  # buffers such as position ids
        a, b = a.detach().to("cpu", torch.float64), state_b[key].detach().to("cpu", torch.float64)
        name, block = parameter_group(key)
        g = groups.setdefault(name, {"group": name, "block": block, "sq_diff": 0.0, "sq_norm": 0.0, "params": 0})
        g["sq_diff"] += float(((b - a) ** 2).sum())
        g["sq_norm"] += float((a ** 2).sum())
        g["params"] += a.numel()
    rows = []
    for g in groups.values():
        diff, norm = np.sqrt(g.pop("sq_diff")), np.sqrt(g.pop("sq_norm"))
        rel = diff / norm if norm > 0 else (0.0 if diff == 0 else None)
        rows.append({**g, "relative_change": None if rel is None else float(rel), "change": float(diff)})
    return rows
