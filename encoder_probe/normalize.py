"""Feature normalisation fitted on the rows being fit, never on held-out or val rows."""
from __future__ import annotations

import numpy as np

from .errors import SpecError

NORMALIZE = ("standardize", "l2")


class Standardizer:
    """Per-dimension standardisation (sklearn's StandardScaler, with 1e-6 added to the std so a
    constant dimension stays finite)."""

    def fit(self, x: np.ndarray) -> "Standardizer":
        x = np.asarray(x)
        self.mean_, self.std_ = x.mean(0), x.std(0) + 1e-6
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x) - self.mean_) / self.std_

    def fit_transform(self, x: np.ndarray) -> np.ndarray:
        return self.fit(x).transform(x)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    x = np.asarray(x)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Normalizer:
    """``standardize`` (statistics of the rows it was fit on) or ``l2`` (per row, nothing fitted)."""

    def __init__(self, how: str, x: np.ndarray):
        if how not in NORMALIZE:
            raise SpecError(f"normalize must be one of {', '.join(NORMALIZE)}, got {how!r}")
        self.how = how
        self.scaler = Standardizer().fit(x) if how == "standardize" else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.scaler.transform(x) if self.scaler is not None else l2_normalize(x)

    @property
    def statistics(self) -> dict:
        """{"mean", "std"} of a standardiser (what a head folds in), {} for l2."""
        return {} if self.scaler is None else {"mean": self.scaler.mean_, "std": self.scaler.std_}
