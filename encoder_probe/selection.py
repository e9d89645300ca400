"""Choose a hyperparameter on a held-out part of train, refit on all of train, score once.

The one protocol every trained probe follows (DESIGN: "the test split is touched once"): the
linear probe chooses its C this way, the segmentation head its learning rate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .errors import DataError


def held_out(n_or_labels, fraction: float, seed: int, *, where: str = "train split") -> tuple[np.ndarray, np.ndarray]:
    """Row indices (fit, held out). Given labels: ``fraction`` of every class, at least one of each
    class with two or more rows (stratified); given a count: a seeded ``fraction`` of the rows, at
    least one. Needs two rows or more."""
    rng = np.random.default_rng(seed)
    if np.ndim(n_or_labels) == 0:
        n = int(n_or_labels)
        if n < 2:
            raise DataError(f"{where} has {n} item(s); holding some out to choose a hyperparameter needs 2")
        held = rng.choice(n, max(1, int(round(fraction * n))), replace=False)
    else:
        y = np.asarray(n_or_labels)
        n = len(y)
        if n < 2:
            raise DataError(f"{where} has {n} item(s); holding some out to choose a hyperparameter needs 2")
        held = []
        for c in np.unique(y):
            rows = np.flatnonzero(y == c)
            size = max(1, int(round(fraction * len(rows)))) if len(rows) > 1 else 0
            held += rng.choice(rows, size, replace=False).tolist()  # drawn for every class: one stream
        held = np.asarray(held, dtype=int)
    held = np.sort(held.astype(int))
    return np.setdiff1d(np.arange(n), held), held


def best_index(scores: Sequence[float]) -> int:
    """The first best score (candidates are listed from the most regularised: ties keep the stronger
    regularisation); NaN never wins unless every score is NaN."""
    values = np.asarray(scores, dtype=float)
    if np.isnan(values).all():
        return 0
    return int(np.nanargmax(values))


def curve_turned(scores: Sequence, patience: int, candidates: Sequence, n_scored: int | None = None) -> str | None:
    """Why a sweep over candidates in order may stop now (None: go on): the last ``patience`` scores
    all fell clearly below the best one. Scores are proportions over ``n_scored`` held-out items (top-1):
    "clearly" is by more than the best one's standard error (at least one item), so that a dip of a
    few items on a small held-out set does not end the sweep; a plateau never does. CLIP_benchmark's
    search narrows on the same premise (one peak)."""
    best = best_index(scores)
    if not patience or len(scores) - 1 - best < patience or len(scores) == len(candidates):
        return None
    top = float(scores[best])
    margin = max(np.sqrt(top * (1 - top) / n_scored), 1 / n_scored) if n_scored else 0.0
    tail = np.asarray(scores[len(scores) - patience:], dtype=float)
    if not (tail < top - margin).all():
        return None
    return (f"stopped after {candidates[len(scores) - 1]:g}: the {patience} larger values fell below "
            f"{candidates[best]:g}'s by more than {margin:.3g}")


@dataclass
class Selection:
    """The sweep on held-out train (one dict of scores per candidate), the chosen candidate index
    per selection key, and what the refit returned."""

    curve: list[dict]
    chosen: dict[str, int]
    final: object
    fit_rows: np.ndarray
    held_rows: np.ndarray


def select_and_refit(n_or_labels, *, fraction: float, seed: int, sweep: Callable, keys: Sequence[str],
                     refit: Callable, where: str = "train split") -> Selection:
    """Hold out ``fraction`` of train (stratified when labels are given), ``sweep(fit_rows, held_rows)``
    -> one dict of held-out scores per candidate, pick the best candidate of each key in ``keys``,
    ``refit(chosen: {key: index})`` on all of train. Scoring on val happens once, after this."""
    fit_rows, held_rows = held_out(n_or_labels, fraction, seed, where=where)
    curve = list(sweep(fit_rows, held_rows))
    chosen = {key: best_index([c[key] for c in curve]) for key in keys}
    return Selection(curve, chosen, refit(chosen), fit_rows, held_rows)
