"""`imagenet` (alias `linear`): multinomial logistic regression on frozen pooled features.

Protocol (leak-free, :func:`encoder_probe.selection.select_and_refit`): the regularisation C is
chosen on a seeded, stratified ``holdout`` fraction of the *train* split (fit on the rest); the winner
is refit on the whole train split, tightly (``tol``) from the sweep's solution, and scored once on val.
The sweep only ranks C values, so it is cheap: every C of the grid is solved together
(:class:`encoder_probe.logreg.LogisticRegressionGrid`, one pass over the features per step for all
heads; with many classes, where a pass is compute-bound, one C after the other, warm-started) to a
loose ``sweep_tol``, and it stops once the held-out curve has clearly turned: ``patience`` larger C
values all below the best by more than its standard error. In the stacked sweep a fit already clearly
below the best at ``rank_tol`` cannot win and stops there (:func:`encoder_probe.logreg.rank_margin`);
the contenders go on to ``sweep_tol``. The sequential sweep fits every C to ``sweep_tol``: each
solution is the next C's warm start, and a loose one there cost more than it saved (``sweep="sequential",
sweep_tol=1e-5, patience=0`` is the tight one-C-at-a-time reference).
The features are moved to the fitting device once; where they do not fit, mini-batch Adam reads
them from host memory. Features
are standardised (or L2-normalised) with statistics of the rows being fit, never of held-out or
val rows. ``solver="sklearn"`` runs the CLIP recipe (sklearn LogisticRegression, lbfgs,
max_iter 1000) on the same grid, for parity checks; a C is sklearn's C for every class count (two
classes: sklearn's binomial model, in both solvers).

Each val image's outcome is kept (hit at top-1 / top-5, prediction, rank of its true class), so
the runner's bootstrap puts a CI over the val images on every metric. ``seeds > 1`` reruns what
is stochastic in training per seed: the held-out split and, with ``per_class``, the train
subsample (val is the same images for every seed); a metric is the mean over seeds.

Every fit's convergence (iterations, gradient, converged) is recorded; a refit that did not
converge is named in the result's ``warnings``, which the report shows. top-5 is left out
when there are 5 classes or fewer (it would be 1.0 by construction). The seed-0 refit head is
handed to probes that need it (gradcam) as ``outputs["head"]`` and saved as
``imagenet/head.safetensors``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from encoder_probe.features import POOLS
from encoder_probe.items import Items, stack_seeds
import torch

from encoder_probe.logreg import RANK_TOL, LogisticRegression, LogisticRegressionGrid, fits_in_memory, linear_head
from encoder_probe.normalize import NORMALIZE, Normalizer
from encoder_probe.probe import Needs, Probe, ProbeResult, last_layers, over_seeds, protocol, runtime, topk_defined
from encoder_probe.selection import curve_turned, select_and_refit

SOLVERS = ("torch", "sklearn")
SWEEPS = ("auto", "stacked", "sequential")
# Up to this many logit columns (C values x classes) a pass over the features is bound by reading them, so
# stacking the grid's heads costs about one head's pass; past it the GEMM is compute-bound, stacking saves
# nothing and warm starts along the C path (sequential) save iterations. (2 CPU cores: 13 heads x 10
# classes cost 3.5x one head; 1000 classes, 13 heads, 14x.)
STACK_COLUMNS = 1024
# Below this many feature values a pass costs less than the stacked solver's per-step bookkeeping, and the
# warm starts of the sequential path win (few-shot and demo-sized sets).
STACK_MIN_VALUES = 1 << 22
MINIBATCH = 4096  # rows per Adam step when the features do not fit on the device
# each metric and how the bootstrap recomputes it from the per-item columns (encoder_probe.bootstrap)
METRICS = {"top1": {"name": "mean", "column": "top1"}, "top5": {"name": "mean", "column": "top5"},
              "mean_per_class_recall": {"name": "class_recall", "pred": "pred", "label": "label"}}


@dataclass
class LinearConfig:
    pool: str = protocol("mean", choices=POOLS)
    last_layers: int = protocol(1, min=1, help="> 1: concatenate the last K blocks' pooled features (DINOv2)")
    normalize: str = protocol("standardize", choices=NORMALIZE, help="statistics of the rows being fit")
    Cs: list[float] = protocol(np.logspace(-3, 3, 13).tolist(), gt=0, help="the C grid swept on held-out train")
    holdout: float = protocol(0.1, gt=0, lt=1, help="fraction of train (per class) the sweep scores on")
    solver: str = protocol("torch", choices=SOLVERS, help="sklearn: the CLIP recipe, for parity checks")
    per_class: int | None = protocol(None, min=1, help="K train/val images per class (default: all)")
    max_iter: int = protocol(1000, min=1)
    sweep: str = protocol("auto", choices=SWEEPS,
                          help="stacked: every C solved together, one pass over the features per step for all; "
                               "sequential: one C after the other, warm-started; auto: stacked up to "
                               f"{STACK_COLUMNS} logit columns (C values x classes) on 4M feature values or more")
    patience: int = protocol(3, min=0, help="stop the sweep once this many larger C all fell clearly below the "
                                            "best (0: the whole grid)")
    sweep_tol: float = protocol(1e-3, gt=0, help="the sweep only ranks C: relative gradient of each fit that "
                                                 "could win")
    rank_tol: float = protocol(RANK_TOL, gt=0, help="stacked sweep: a fit this close to its optimum whose held-out "
                                                   "top-1 is clearly below the best stops there, it cannot win "
                                                   "(at or below sweep_tol: no such stop)")
    tol: float = protocol(1e-3, gt=0, help="of the final refit: W within ~tol of the optimum")
    seeds: int = runtime(1, min=1, help="reruns of the held-out split and (per_class) the train subsample")
    batch_size: int = runtime(64, min=1, help="extraction batch")
    device: str | None = runtime(None, help="where the heads fit (default: the encoder's device)")

    def check(self):
        if not self.Cs:
            raise ValueError("Cs must hold at least one C")


def true_class_rank(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n,) rank of each row's true class, 0 = top; ties go to the lower class index, as argmax."""
    y = np.asarray(y)
    true = scores[np.arange(len(y)), y][:, None]
    before = np.arange(scores.shape[1])[None] < y[:, None]
    return ((scores > true) | ((scores == true) & before)).sum(1)


def mean_per_class_recall(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


def fits_on_device(x: np.ndarray, device) -> bool:
    """Full-batch L-BFGS needs the features (and as much again for the work) on the device."""
    return fits_in_memory(3 * x.nbytes, device)


def _on_device(x: np.ndarray, device) -> torch.Tensor:
    """The features as one float32 tensor where the heads fit: moved once, read by every C."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device or "cpu")


def _sklearn_path(x, y, Cs, config, n_classes) -> list:
    """The CLIP recipe: sklearn LogisticRegression (lbfgs) per C, each from scratch."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression as SkLogisticRegression
    with warnings.catch_warnings():  # recorded per fit instead (converged: false)
        warnings.simplefilter("ignore", ConvergenceWarning)
        return [_SkModel(SkLogisticRegression(C=C, max_iter=config.max_iter).fit(x, y), n_classes) for C in Cs]


def sweep_path(x, y, x_held, y_held, Cs, config, n_classes, device=None) -> tuple[list, list, str | None]:
    """Fit every C of the (ascending) grid on ``x`` and score each on the held-out rows: (models, held-out
    top-1 per C, why the sweep stopped early or None). A C the sweep stopped before has model and score None.

    torch: the stacked grid solver (every C at once) when the features fit on the device and the sweep
    asks for it (``auto``: few enough classes), else one C after the other, warm-started (mini-batch Adam
    where the features do not fit); both stop once the held-out curve has turned
    (:func:`~encoder_probe.selection.curve_turned`). sklearn: every C, as the CLIP recipe does.
    """
    if config.solver == "sklearn":
        models = _sklearn_path(x, y, Cs, config, n_classes)
        return models, [m.score(x_held, y_held) for m in models], None
    full_batch = fits_on_device(x, device)
    X = _on_device(x, device) if full_batch else x
    held = _on_device(x_held, device)
    score = lambda model: model.score(held, y_held)  # noqa: E731
    columns = len(Cs) * (1 if len(np.unique(y)) == 2 else n_classes)
    stack = columns <= STACK_COLUMNS and x.size >= STACK_MIN_VALUES
    if full_batch and (config.sweep == "stacked" or (config.sweep == "auto" and stack)):
        grid = LogisticRegressionGrid(Cs, tol=config.sweep_tol, max_iter=config.max_iter, patience=config.patience,
                                      n_scored=len(y_held), device=device, n_classes=n_classes,
                                      rank_tol=config.rank_tol).fit(X, y, scorer=score)
        return grid.models_, [None if np.isnan(v) else float(v) for v in grid.scores_], grid.stopped_
    models, scores, stopped = [], [], None
    for C in Cs:  # warm starts carry each solution to the next C: every fit goes to sweep_tol, no racing
        if stopped is None:
            models.append(LogisticRegression(C=C, max_iter=config.max_iter, tol=config.sweep_tol, device=device,
                                             n_classes=n_classes, batch_size=None if full_batch else MINIBATCH)
                          .fit(X, y, init=models[-1] if models else None))
            scores.append(score(models[-1]))
            stopped = curve_turned(scores, config.patience, Cs, len(y_held))
        else:
            models.append(None)
            scores.append(None)
    return models, scores, stopped


class _SkModel:
    """sklearn's fitted model with the torch estimator's ``head``, ``score`` and ``convergence``."""

    def __init__(self, model, n_classes):
        self.model, self.n_classes = model, n_classes

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        return linear_head(self.model.classes_, self.model.coef_, self.model.intercept_, self.n_classes)

    def score(self, x, y) -> float:
        return float(self.model.score(x, y))

    def convergence(self) -> dict:
        n_iter = int(np.max(self.model.n_iter_))
        return {"C": self.model.C, "n_iter": n_iter, "tol": self.model.tol, "converged": n_iter < self.model.max_iter}


def _scores(model, x) -> np.ndarray:
    """Scores over every class of the dataset (classes the fit never saw score -1e9)."""
    weight, bias = model.head()
    return np.asarray(x, np.float32) @ weight.T.astype(np.float32) + bias.astype(np.float32)


def run_protocol(x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, config: LinearConfig,
                 seed: int, n_classes: int, device=None) -> dict:
    """Sweep C on a held-out part of train, refit on all of train, score once on val: the chosen C,
    the sweep, convergence, the seed's metrics, each val row's outcome and the refit head."""
    device = device if device is not None else config.device
    Cs = sorted(config.Cs)
    path, stopped = [], []

    def sweep(fit_rows, held_rows):
        norm = Normalizer(config.normalize, x[fit_rows])
        models, scores, why = sweep_path(norm(x[fit_rows]), y[fit_rows], norm(x[held_rows]), y[held_rows], Cs,
                                         config, n_classes, device)
        path[:], stopped[:] = models, [why]
        return [{"C": C, "heldout_top1": s} for C, s in zip(Cs, scores)]

    def refit(chosen):  # ties in the sweep keep the stronger regularisation (the smaller C)
        norm = Normalizer(config.normalize, x)
        C = Cs[chosen["heldout_top1"]]
        if config.solver == "sklearn":
            return norm, _sklearn_path(norm(x), y, [C], config, n_classes)[0]
        full_batch = fits_on_device(x, device)
        X = _on_device(norm(x), device) if full_batch else norm(x)
        start = path[chosen["heldout_top1"]]
        if full_batch:  # preconditioned first (fast to float32's resolution), then L-BFGS to tol if need be
            start = LogisticRegressionGrid([C], tol=config.tol, max_iter=config.max_iter, device=device,
                                           n_classes=n_classes).fit(X, y, init=start).models_[0]
            if start.converged_:
                return norm, start
        model = LogisticRegression(C=C, max_iter=config.max_iter, tol=config.tol, device=device, n_classes=n_classes,
                                   batch_size=None if full_batch else MINIBATCH)
        return norm, model.fit(X, y, init=start)

    selection = select_and_refit(y, fraction=config.holdout, seed=seed, sweep=sweep, keys=["heldout_top1"],
                                 refit=refit)
    norm, model = selection.final
    scores = _scores(model, norm(xv))  # the only time val is touched
    rank, pred = true_class_rank(scores, yv), scores.argmax(1)
    weight, bias = model.head()
    items = {"top1": (rank == 0).astype(np.float64), "pred": pred, "label": np.asarray(yv), "rank": rank}
    if topk_defined(n_classes, 5):
        items["top5"] = (rank < 5).astype(np.float64)
    metrics = {name: float(items[name].mean()) for name in ("top1", "top5") if name in items}
    return {"C": Cs[selection.chosen["heldout_top1"]], "sweep": selection.curve, **metrics,
            "mean_per_class_recall": mean_per_class_recall(pred, yv), "items": items,
            "convergence": {"sweep": [m.convergence() if m is not None else {"C": C, "skipped": stopped[0]}
                                      for C, m in zip(Cs, path)],
                            "refit": model.convergence(), "stopped": stopped[0]},
            "head": {"weight": weight, "bias": bias, **norm.statistics}}


def convergence_warnings(runs: list[dict]) -> list[str]:
    """One line per seed whose refit did not converge (the reported numbers come from that fit)."""
    out = []
    for seed, run in enumerate(runs):
        refit = run["convergence"]["refit"]
        if not refit["converged"]:
            gradient = (f", relative gradient {refit['relative_gradient']:.2g} > tol {refit['tol']:g}"
                        if "relative_gradient" in refit else "")
            out.append(f"linear probe refit at C={refit['C']:g} (seed {seed}) did not converge in "
                       f"{refit['n_iter']} iterations{gradient}")
    return out


def save_head(path, head: dict, *, pool: str, layer, root: str, class_names: list[str], view: str = "base") -> None:
    """The refit head (seed 0) as safetensors, with its feature standardisation folded in beside it, so
    the gradcam probe can explain the very classifier this probe scored."""
    import json

    from safetensors.numpy import save

    from encoder_probe.cache import atomic_write_bytes
    arrays = {k: np.ascontiguousarray(head[k], dtype=np.float32) for k in ("weight", "bias", "mean", "std")}
    meta = {"pool": pool, "layer": json.dumps(layer), "root": root, "class_names": json.dumps(class_names)}
    if view != "base":  # pooled over every view's tokens of each image
        meta["view"] = view
    atomic_write_bytes(path, save(arrays, metadata=meta))


def head_unavailable(cfg: LinearConfig, layers: list) -> str | None:
    """Why the refit head is not a linear map of one layer's standardised pooled tokens (None: it is)."""
    if len(layers) > 1:
        return f"the head reads {len(layers)} layers side by side (last_layers={cfg.last_layers})"
    if cfg.normalize != "standardize":
        return f"the head reads {cfg.normalize}-normalised features (normalize={cfg.normalize})"
    return None


class LinearProbe(Probe):
    name = "imagenet"
    needs = Needs(data=("classification",))
    Config = LinearConfig

    def run(self, ctx, cfg: LinearConfig) -> ProbeResult:
        layers = last_layers(ctx.encoder, cfg.last_layers)
        device = ctx.device_for(cfg)
        runs, data = [], None
        for seed in range(cfg.seeds):
            if data is None or cfg.per_class:  # a train subsample per seed; val stays the same images
                data = ctx.labelled(cfg, layers, seed=seed)
            runs.append(run_protocol(data.x, data.y, data.xv, data.yv, cfg, seed, data.num_classes, device))
        n_classes, train = data.num_classes, data.train  # classes, sizes and val alike for every seed
        resolved = train.layers
        metrics = {m: over_seeds([r[m] for r in runs], statistic=stat) for m, stat in METRICS.items() if m in runs[0]}
        columns = {c: stack_seeds([r["items"][c] for r in runs]) for c in runs[0]["items"]}
        undefined = {} if "top5" in metrics else {"top5": f"top-5 of {n_classes} classes is 1.0 by construction"}
        result = ProbeResult(
            metrics=metrics, items=Items(data.val_ids, columns, {"num_classes": n_classes}),
            details={"chosen_C": [r["C"] for r in runs], "sweep": [r["sweep"] for r in runs],
                     "convergence": [r["convergence"] for r in runs], "layers": resolved,
                     "data": {"train": len(data.y), "val": len(data.yv), "classes": n_classes, "root": train.root}},
            warnings=convergence_warnings(runs), undefined=undefined)
        why = head_unavailable(cfg, resolved)
        if why is not None:
            result.outputs["head_unavailable"] = why
            return result
        head = {**runs[0]["head"], "pool": cfg.pool, "layer": resolved[0], "class_names": train.class_names,
                "root": train.root, "C": float(runs[0]["C"])}
        result.outputs["head"] = head
        if ctx.out is not None:
            path = ctx.out / "head.safetensors"
            save_head(path, head, pool=cfg.pool, layer=resolved[0], root=train.root, class_names=train.class_names,
                      view=getattr(ctx.encoder, "view", "base"))
            result.artifacts["head"] = path
        return result
