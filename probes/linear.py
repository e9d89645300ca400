"""`imagenet` (alias `linear`): multinomial logistic regression on frozen pooled features.

Protocol (leak-free): the regularisation C is chosen on a seeded, stratified 10% of the *train*
split (fit on the other 90%, warm-started along the C path); the winner is refit on the whole
train split and scored once on val. Features are standardised (or L2-normalised) with
statistics of the rows being fit, never of held-out or val rows. ``seeds > 1`` reruns split and
fit per seed; metrics are mean and 95% CI. ``solver="sklearn"`` runs the CLIP recipe
(sklearn LogisticRegression, lbfgs, max_iter 1000) on the same grid, for parity checks; a C
is sklearn's C for every class count (two classes: sklearn's binomial model, in both solvers).

Every fit's convergence (iterations, gradient, converged) is recorded; a refit that did not
converge is named in the result's ``warnings``, which the report shows. top-5 is left out
when there are 5 classes or fewer (it would be 1.0 by construction).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from encoder_probe.errors import SpecError
from encoder_probe.logreg import LogisticRegression, fit_path, fits_in_memory, linear_head
from encoder_probe.probe import artifact_dir, config_from, config_hash, labelled_arrays, last_layers, summarize

NORMALIZE = ("standardize", "l2")
SOLVERS = ("torch", "sklearn")


@dataclass
class LinearConfig:
    pool: str = "mean"
    last_layers: int = 1  # > 1: concatenate the last K blocks' pooled features (DINOv2)
    normalize: str = "standardize"
    Cs: list = field(default_factory=lambda: np.logspace(-3, 3, 13).tolist())
    holdout: float = 0.1
    seeds: int = 1
    solver: str = "torch"
    per_class: int | None = None
    batch_size: int = 64
    max_iter: int = 1000
    sweep_tol: float = 1e-2  # the sweep only ranks C: relative gradient ||g|| / (lam ||W||) of each fit
    tol: float = 1e-3  # of the final refit: W within ~0.1% of the optimum
    device: str | None = None

    @classmethod
    def from_options(cls, options: dict | None) -> "LinearConfig":
        config = config_from(cls, options)
        if config.normalize not in NORMALIZE:
            raise SpecError(f"linear probe: normalize must be one of {NORMALIZE}, got {config.normalize!r}")
        if config.solver not in SOLVERS:
            raise SpecError(f"linear probe: solver must be one of {SOLVERS}, got {config.solver!r}")
        if not 0 < config.holdout < 1 or config.seeds < 1 or config.last_layers < 1 or not config.Cs:
            raise SpecError("linear probe: need 0 < holdout < 1, seeds >= 1, last_layers >= 1 and a non-empty Cs")
        return config


def stratified_holdout(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (fit, held out): ``fraction`` of every class (at least one, if it has two)."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        n = int(round(fraction * len(rows))) if len(rows) > 1 else 0
        held += rng.choice(rows, max(n, 1 if len(rows) > 1 else 0), replace=False).tolist()
    held = np.sort(np.asarray(held, dtype=int))
    return np.setdiff1d(np.arange(len(y)), held), held


class Normalizer:
    """Standardise or L2-normalise with statistics of the rows it was fit on."""

    def __init__(self, how: str, x: np.ndarray):
        self.how = how
        if how == "standardize":
            self.mean, self.std = x.mean(0), x.std(0) + 1e-6

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.how == "standardize":
            return (x - self.mean) / self.std
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def topk(scores: np.ndarray, y: np.ndarray, k: int) -> float:
    k = min(k, scores.shape[1])
    return float((np.argsort(-scores, axis=1)[:, :k] == y[:, None]).any(1).mean())


def mean_per_class_recall(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


def fits_on_device(x: np.ndarray, device) -> bool:
    """Full-batch L-BFGS needs the features (and as much again for the work) on the device."""
    return fits_in_memory(3 * x.nbytes, device)


def _fit(x, y, Cs, config, n_classes, init=None):
    """Models for each C (ascending): torch path with warm starts, or sklearn's CLIP recipe."""
    if config.solver == "sklearn":
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression as SkLogisticRegression
        with warnings.catch_warnings():  # recorded per fit instead (converged: false)
            warnings.simplefilter("ignore", ConvergenceWarning)
            return [_SkModel(SkLogisticRegression(C=C, max_iter=config.max_iter).fit(x, y), n_classes)
                    for C in sorted(Cs)]
    batch = None if fits_on_device(x, config.device) else 4096  # else mini-batch Adam
    if init is not None:
        return [LogisticRegression(C=Cs[0], max_iter=config.max_iter, tol=config.tol, device=config.device,
                                   n_classes=n_classes, batch_size=batch).fit(x, y, init=init)]
    return fit_path(x, y, Cs, max_iter=config.max_iter, tol=config.sweep_tol, device=config.device,
                    n_classes=n_classes, batch_size=batch)


class _SkModel:
    """sklearn's fitted model with the torch estimator's ``head`` and ``convergence``."""

    def __init__(self, model, n_classes):
        self.model, self.n_classes = model, n_classes

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        return linear_head(self.model.classes_, self.model.coef_, self.model.intercept_, self.n_classes)

    def convergence(self) -> dict:
        n_iter = int(np.max(self.model.n_iter_))
        return {"C": self.model.C, "n_iter": n_iter, "tol": self.model.tol, "converged": n_iter < self.model.max_iter}


def _scores(model, x) -> np.ndarray:
    """Scores over every class of the dataset (classes the fit never saw score -1e9)."""
    weight, bias = model.head()
    return np.asarray(x, np.float32) @ weight.T.astype(np.float32) + bias.astype(np.float32)


def topk_defined(n_classes: int, k: int) -> bool:
    """top-k says something only with more than k classes (else it is 1.0 by construction)."""
    return n_classes > k


def run_protocol(x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, config: LinearConfig,
                 seed: int, n_classes: int) -> dict:
    """Sweep C on a held-out part of train, refit on all of train, score once on val."""
    fit_rows, held_rows = stratified_holdout(y, config.holdout, seed)
    norm = Normalizer(config.normalize, x[fit_rows])
    Cs = sorted(config.Cs)
    path = _fit(norm(x[fit_rows]), y[fit_rows], Cs, config, n_classes)
    held = norm(x[held_rows])
    sweep = [{"C": C, "heldout_top1": topk(_scores(m, held), y[held_rows], 1)} for C, m in zip(Cs, path)]
    best = max(range(len(Cs)), key=lambda i: (sweep[i]["heldout_top1"], -i))  # ties: stronger regularisation
    norm = Normalizer(config.normalize, x)
    init = path[best] if config.solver == "torch" else None
    model = _fit(norm(x), y, [Cs[best]], config, n_classes, init=init)[0]
    scores = _scores(model, norm(xv))  # the only time val is touched
    weight, bias = model.head()
    metrics = {"top1": topk(scores, yv, 1), "mean_per_class_recall": mean_per_class_recall(scores.argmax(1), yv)}
    if topk_defined(n_classes, 5):
        metrics["top5"] = topk(scores, yv, 5)
    return {"C": Cs[best], "sweep": sweep, **metrics,
            "convergence": {"sweep": [m.convergence() for m in path], "refit": model.convergence()},
            "head": {"weight": weight, "bias": bias, **({"mean": norm.mean, "std": norm.std}
                                                        if config.normalize == "standardize" else {})}}


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
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in head.items()}
    meta = {"pool": pool, "layer": json.dumps(layer), "root": root, "class_names": json.dumps(class_names)}
    if view != "base":  # pooled over every view's tokens of each image
        meta["view"] = view
    atomic_write_bytes(path, save(arrays, metadata=meta))


class LinearProbe:
    name = "imagenet"
    needs = ("labels",)

    def run(self, encoder, data, options=None, context=None) -> dict:
        start = time.perf_counter()
        config = LinearConfig.from_options(options)
        x, y, xv, yv, train = labelled_arrays(encoder, data, config, context or {},
                                              last_layers(encoder, config.last_layers))
        resolved = train.layers
        runs = [run_protocol(x, y, xv, yv, config, seed, train.meta["data"]["num_classes"])
                for seed in range(config.seeds)]
        used = {**asdict(config), "layers": resolved, **_view(encoder)}
        result = {
            "metrics": {m: summarize([r[m] for r in runs]) for m in ("top1", "top5", "mean_per_class_recall")
                        if m in runs[0]},
            "chosen_C": [r["C"] for r in runs], "sweep": [r["sweep"] for r in runs],
            "convergence": [r["convergence"] for r in runs], "warnings": convergence_warnings(runs),
            "view": getattr(encoder, "view", "base"),
            "data": {"train": len(y), "val": len(yv), "classes": train.meta["data"]["num_classes"],
                     "root": train.meta["data"]["root"]},
            "config": used, "config_hash": config_hash(used), "wall_s": round(time.perf_counter() - start, 3),
        }
        n_classes = train.meta["data"]["num_classes"]
        if not topk_defined(n_classes, 5):
            result["undefined_metrics"] = {"top5": f"top-5 of {n_classes} classes is 1.0 by construction"}
        out = artifact_dir(encoder, context, self.name)
        if out is not None and len(resolved) == 1 and "mean" in runs[0]["head"]:  # a linear map of pooled tokens
            save_head(out / "head.safetensors", runs[0]["head"], pool=config.pool, layer=resolved[0],
                      root=train.meta["data"]["root"], class_names=train.class_names,
                      view=getattr(encoder, "view", "base"))
            result["artifacts"] = {"head": f"{out.name}/head.safetensors"}
        return result


def _view(encoder) -> dict:
    """The encoder view in the probe config when it is not the default (base configs keep their hash);
    view full pools over the whole token sequence of each image (base view and tiles alike)."""
    view = getattr(encoder, "view", "base")
    return {} if view == "base" else {"view": view}
