"""Confidence intervals over evaluation items, and paired differences of two encoders.

The noise that matters most in a probe's number is which evaluation images were drawn, so every
metric is recomputed on bootstrap resamples of its items. A resample is a row of *count weights*
(how often each item was drawn), and a statistic is a weighted function of the per-item outcomes:
``fn(weights (B, n), items, **params) -> (B,)``; a row of ones gives the plain metric. Resampling
is then a matrix product per chunk of rows, never a loop over images, and two encoders scored on
the same images get the same rows (the paired bootstrap of their difference).

A metric names its statistic as ``{"name": "mean", "column": "top1"}`` (the name and its params);
:func:`statistic_value` recomputes the reported value from the items. With S seeds (columns
(S, n, ...)) a statistic is the mean over seeds of the per-seed statistic, each seed on the same
resampled items.
"""
from __future__ import annotations

import inspect
import weakref
from functools import partial
from typing import Callable

import numpy as np

from .errors import DataError, SpecError
from .items import Items

STATISTICS: dict[str, Callable] = {}
CHUNK_ELEMENTS = 1 << 21  # weights held at once (rows x items): ~16 MiB of float64 whatever n and B


def register_statistic(name: str, fn: Callable | None = None):
    """Register ``fn(weights (B, n), items, **params) -> (B,)`` as ``name``; usable as a decorator."""
    if fn is None:
        return partial(register_statistic, name)
    STATISTICS[name] = fn
    return fn


# -- reading columns ------------------------------------------------------------------------------
def _column(items: Items, name: str, ndim: int) -> np.ndarray:
    """A dense column as (S, n, ...) (a column without the seed axis gets S = 1)."""
    if name not in items.columns:
        raise DataError(f"per-item outcomes have no column {name!r} (columns: {', '.join(items.columns) or 'none'})")
    value = items.columns[name]
    if value.ndim == ndim - 1:
        value = value[None]
    if value.ndim != ndim or value.shape[1] != len(items):
        raise DataError(f"per-item column {name!r} has shape {value.shape}; expected (seeds, {len(items)}"
                        f"{', ...' if ndim > 2 else ''}) with {ndim} axes")
    return value


_PREPARED: dict[tuple, object] = {}


def _prepared(array: np.ndarray, what: str, build: Callable):
    """``build(array)`` memoised while ``array`` lives: the chunks of one bootstrap call a statistic
    on the same items many times, and converting a big column each time would cost more than the sums."""
    key = (id(array), what)
    if key not in _PREPARED:
        _PREPARED[key] = build(array)
        weakref.finalize(array, _PREPARED.pop, key, None)
    return _PREPARED[key]


def _contributions(counts: np.ndarray):
    """(n, K) float64 per-item contributions: scipy.sparse when mostly zero (an image holds few classes)."""
    from scipy import sparse
    counts = counts.reshape(len(counts), -1)
    if np.count_nonzero(counts) < 0.25 * counts.size:
        return sparse.csr_matrix(counts.astype(np.float64))
    return counts.astype(np.float64)


def _weighted_sums(weights: np.ndarray, matrix) -> np.ndarray:
    """(B, K): weights (B, n) times a dense or scipy.sparse (n, K) matrix of per-item contributions."""
    if isinstance(matrix, np.ndarray):
        return weights @ matrix
    return np.asarray((matrix.T @ weights.T).T)


def _scored_rows(weights: np.ndarray, matrix, score: Callable) -> np.ndarray:
    """(B,): ``score`` (the metric's own code) of each resample's summed contributions, a few rows
    at a time so the (rows, K) sums stay within CHUNK_ELEMENTS however wide K (C*C confusions) is."""
    step = max(1, CHUNK_ELEMENTS // max(1, matrix.shape[1]))
    return np.array([score(row) for start in range(0, len(weights), step)
                     for row in _weighted_sums(weights[start:start + step], matrix)], dtype=np.float64)


# -- built-in statistics --------------------------------------------------------------------------
@register_statistic("mean")
def weighted_mean(weights: np.ndarray, items: Items, column: str) -> np.ndarray:
    """Mean of a per-item outcome (1.0 = correct); NaN items are unscored and left out."""
    x = _column(items, column, 2).astype(np.float64)
    scored = ~np.isnan(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_seed = (weights @ np.where(scored, x, 0.0).T) / (weights @ scored.T.astype(np.float64))
    return per_seed.mean(1)


@register_statistic("class_recall")
def class_recall(weights: np.ndarray, items: Items, pred: str = "pred", label: str = "label") -> np.ndarray:
    """Mean per-class recall over the classes present in the (resampled) labels: balanced accuracy."""
    from scipy import sparse
    p, y = _column(items, pred, 2).astype(np.int64), _column(items, label, 2).astype(np.int64)
    seeds = max(len(p), len(y))
    if min(len(p), len(y)) not in (1, seeds):
        raise DataError(f"per-item columns {pred!r} and {label!r} hold {len(p)} and {len(y)} seeds")
    classes = int(max(p.max(initial=0), y.max(initial=0))) + 1
    n = len(items)
    out = np.zeros(len(weights))
    for s in range(seeds):
        ps, ys = p[s % len(p)], y[s % len(y)]
        onehot = sparse.csr_matrix((np.ones(n), (np.arange(n), ys)), shape=(n, classes))
        hits = sparse.csr_matrix(((ps == ys).astype(np.float64), (np.arange(n), ys)), shape=(n, classes))
        support, correct = _weighted_sums(weights, onehot), _weighted_sums(weights, hits)
        present = support > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            out += np.where(present, correct / np.where(present, support, 1), 0).sum(1) / present.sum(1)
    return out / seeds


def _confusions(items: Items):
    """Per seed, a sparse (n, C*C) matrix of each image's confusion contributions (rows = truth):
    entry k adds conf_count[k] pixels to cell (conf_true[k], conf_pred[k]) of image conf_item[k] in
    seed conf_seed[k]; meta num_classes, and meta seeds where a seed may hold no entry at all."""
    need = ("conf_seed", "conf_item", "conf_true", "conf_pred", "conf_count")
    missing = [c for c in need if c not in items.columns]
    if missing or "num_classes" not in items.meta:
        raise DataError("seg per-item outcomes need columns " + ", ".join(need) + " and meta num_classes; missing "
                        + ", ".join(missing + ([] if "num_classes" in items.meta else ["num_classes"])))
    classes, seeds = int(items.meta["num_classes"]), int(items.meta.get("seeds") or 0)
    return classes, _prepared(items.columns["conf_count"], f"confusion/{classes}/{len(items)}",
                              lambda _: _confusion_matrices(items, classes, seeds))


def _confusion_matrices(items: Items, classes: int, seeds: int) -> list:
    """The sparse (n, C*C) matrices of :func:`_confusions`, checked (seeds 0: as many as conf_seed holds)."""
    from scipy import sparse
    seed, item, true, pred, count = (np.asarray(items.columns[c]).reshape(-1) for c in
                                     ("conf_seed", "conf_item", "conf_true", "conf_pred", "conf_count"))
    n = len(items)
    if not len(seed) == len(item) == len(true) == len(pred) == len(count):
        raise DataError("seg confusion columns conf_* differ in length")
    if len(seed) and (item.min() < 0 or item.max() >= n or min(true.min(), pred.min()) < 0
                      or max(true.max(), pred.max()) >= classes or seed.min() < 0):
        raise DataError(f"seg confusion entries out of range (items 0..{n - 1}, classes 0..{classes - 1})")
    seeds = seeds or (int(seed.max()) + 1 if len(seed) else 1)
    cells = true.astype(np.int64) * classes + pred.astype(np.int64)
    return [sparse.csr_matrix((count[seed == s].astype(np.float64), (item[seed == s], cells[seed == s])),
                              shape=(n, classes * classes)) for s in range(seeds)]


def _pixel_statistic(weights: np.ndarray, items: Items, key: str) -> np.ndarray:
    """segmentation.pixel_scores of each resample's summed confusion (mIoU over classes with a union)."""
    import torch

    from .segmentation import pixel_scores
    classes, per_seed = _confusions(items)
    score = lambda row: pixel_scores(torch.from_numpy(row.reshape(classes, classes)))[key]  # noqa: E731
    return np.mean([_scored_rows(weights, m, score) for m in per_seed], axis=0)


def _patch_statistic(weights: np.ndarray, items: Items, key: str, column: str = "patch_counts") -> np.ndarray:
    """segmentation.patch_scores of each resample's summed per-image patch counts (S, n, 3, C)."""
    import torch

    from .segmentation import patch_scores
    counts = _column(items, column, 4)
    shape = counts.shape[2:]
    per_seed = _prepared(items.columns[column], "patch", lambda _: [_contributions(c) for c in counts])
    score = lambda row: patch_scores(torch.from_numpy(row.reshape(shape)))[key]  # noqa: E731
    return np.mean([_scored_rows(weights, m, score) for m in per_seed], axis=0)


register_statistic("miou", partial(_pixel_statistic, key="mIoU"))
register_statistic("pixel_accuracy", partial(_pixel_statistic, key="pixel_accuracy"))
for _key in ("patch_macro_recall", "patch_macro_precision", "patch_macro_f1"):
    register_statistic(_key, partial(_patch_statistic, key=_key))


# -- evaluating a statistic -----------------------------------------------------------------------
def _resolve(stat: dict) -> tuple[Callable, dict]:
    """(function, params) of a metric's statistic dict, or a one-line SpecError."""
    if not isinstance(stat, dict) or not isinstance(stat.get("name"), str):
        raise SpecError(f"statistic {stat!r}: must be an object with a 'name' (e.g. {{'name': 'mean', "
                        "'column': 'top1'}})")
    fn = STATISTICS.get(stat["name"])
    if fn is None:
        raise SpecError(f"unknown statistic {stat['name']!r} (known: {', '.join(sorted(STATISTICS))})")
    params = {k: v for k, v in stat.items() if k != "name"}
    try:
        inspect.signature(fn).bind(None, None, **params)
    except TypeError as e:
        raise SpecError(f"statistic {stat['name']!r}: {e}") from None
    return fn, params


def evaluate(stat: dict, weights: np.ndarray, items: Items) -> np.ndarray:
    """(B,) values of ``stat`` under count weights (B, n)."""
    fn, params = _resolve(stat)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != len(items):
        raise ValueError(f"weights must be (B, {len(items)}), got {weights.shape}")
    return np.asarray(fn(weights, items, **params), dtype=np.float64).reshape(len(weights))


def statistic_value(stat: dict, items: Items) -> float:
    """The plain metric (every item once): what the probe reports."""
    return float(evaluate(stat, np.ones((1, len(items))), items)[0])


# -- resampling -----------------------------------------------------------------------------------
def iter_weights(n: int, B: int, seed=0):
    """Count weights of ``B`` resamples of ``n`` items in chunks of rows (memory bounded whatever n, B);
    the chunks depend only on (n, B, seed), so any consumer sees the same resamples."""
    if n < 1:
        raise DataError("no evaluation items to resample")
    if B < 1:
        raise SpecError(f"bootstrap B must be >= 1, got {B}")
    rng = np.random.default_rng(seed)
    rows = max(1, CHUNK_ELEMENTS // n)
    for start in range(0, B, rows):
        b = min(rows, B - start)
        draws = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        yield np.bincount(draws.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def resample_weights(n: int, B: int, seed=0) -> np.ndarray:
    """(B, n) counts of n draws with replacement per row (a seeded numpy Generator)."""
    return np.concatenate(list(iter_weights(n, B, seed)))


def replicates(stats: list[dict], items: Items, B: int = 1000, seed=0) -> list[np.ndarray]:
    """(B,) bootstrap replicates of each statistic, all on the same resamples of ``items``."""
    for stat in stats:
        _resolve(stat)  # a bad statistic fails before any resampling
    chunks = [[] for _ in stats]
    for weights in iter_weights(len(items), B, seed):
        for out, stat in zip(chunks, stats):
            out.append(evaluate(stat, weights, items))
    return [np.concatenate(c) for c in chunks]


def percentile_interval(values: np.ndarray) -> list[float] | None:
    """The 95% percentile interval of bootstrap replicates (undefined resamples left out)."""
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def bootstrap_ci(stat: dict, items: Items, B: int = 1000, seed=0) -> list[float] | None:
    """95% percentile CI of ``stat`` over resamples of the items."""
    return percentile_interval(replicates([stat], items, B, seed)[0])


def metric_intervals(metrics: dict, items: Items | None, B: int = 1000, seed: int = 0) -> dict:
    """{metric: {"ci95", "ci"}} for every metric with a statistic (dicts or probe.Metric objects),
    all from one pass over the same resamples; what the runner writes into results.json."""
    stats = {}
    for name, metric in metrics.items():
        stat = metric.get("statistic") if isinstance(metric, dict) else getattr(metric, "statistic", None)
        if stat is not None:
            stats[name] = stat
    if items is None or not stats:
        return {}
    found = replicates(list(stats.values()), items, B, seed)
    block = {"method": "bootstrap", "over": "items", "B": int(B), "n": len(items), "seed": seed}
    return {name: {"ci95": percentile_interval(values), "ci": dict(block)} for name, values in zip(stats, found)}


# -- comparing two encoders -----------------------------------------------------------------------
def alignment(items_a: Items, items_b: Items) -> np.ndarray | None:
    """For each item of b, the index of the same id in a; None unless both hold the same unique ids."""
    a, b = items_a.ids, items_b.ids
    if len(a) != len(b) or len(np.unique(a)) != len(a) or len(np.unique(b)) != len(b):
        return None
    order_a, order_b = np.argsort(a, kind="stable"), np.argsort(b, kind="stable")
    if not np.array_equal(a[order_a], b[order_b]):
        return None
    index = np.empty(len(b), dtype=np.int64)
    index[order_b] = order_a
    return index


def p_value(deltas: np.ndarray) -> float:
    """Two-sided bootstrap p-value of delta = 0: twice the smaller tail, with the +1 of a Monte-Carlo test."""
    deltas = deltas[~np.isnan(deltas)]
    B = len(deltas)
    tail = min((np.count_nonzero(deltas <= 0) + 1) / (B + 1), (np.count_nonzero(deltas >= 0) + 1) / (B + 1))
    return float(min(1.0, 2 * tail))


def compare_items(stat: dict, items_a: Items, items_b: Items, B: int = 1000, seed: int = 0) -> dict:
    """delta = stat(b) - stat(a) (b against the reference a) with its 95% bootstrap CI and p-value.

    Paired when both hold the same items (the same id set; aligned by id): each resample draws the
    same images for both sides, so what the two encoders share cancels. Otherwise each side is
    resampled on its own (paired False). ``n``: the common item count when paired, else [n_a, n_b]."""
    delta = statistic_value(stat, items_b) - statistic_value(stat, items_a)
    index = alignment(items_a, items_b)
    if index is not None:
        chunks = [evaluate(stat, w[:, index], items_b) - evaluate(stat, w, items_a)
                  for w in iter_weights(len(items_a), B, seed)]
        deltas, n = np.concatenate(chunks), len(items_a)
    else:
        seed_a, seed_b = np.random.SeedSequence(seed).spawn(2)
        deltas = replicates([stat], items_b, B, seed_b)[0] - replicates([stat], items_a, B, seed_a)[0]
        n = [len(items_a), len(items_b)]
    return {"delta": float(delta), "ci95": percentile_interval(deltas), "p_value": p_value(deltas),
            "paired": index is not None, "n": n}


def outside_noise(ci95) -> bool:
    """A difference is outside the noise only when its 95% CI excludes 0."""
    return ci95 is not None and (ci95[0] > 0 or ci95[1] < 0)
