"""`imagenet` (alias `linear`): multinomial logistic regression on frozen pooled features.

Protocol (leak-free): the regularisation C is chosen on a seeded, stratified 10% of the *train*
split (fit on the other 90%, warm-started along the C path); the winner is refit on the whole
train split and scored once on val. Features are standardised (or L2-normalised) with
statistics of the rows being fit, never of held-out or val rows. ``seeds > 1`` reruns split and
fit per seed; metrics are mean and 95% CI. ``solver="sklearn"`` runs the CLIP recipe
(sklearn LogisticRegression, lbfgs, max_iter 1000) on the same grid, for parity checks.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from encoder_probe.errors import SpecError
from encoder_probe.logreg import LogisticRegression, fit_path
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
    sweep_tol: float = 1e-5  # gradient tolerance of the C sweep (1e-4 biased the choice of C on case b)
    tol: float = 1e-6  # of the final refit
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
    import torch
    if device is not None and torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return 3 * x.nbytes < free
    return 3 * x.nbytes < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _fit(x, y, Cs, config, n_classes, init=None):
    """Models for each C (ascending): torch path with warm starts, or sklearn's CLIP recipe."""
    if config.solver == "sklearn":
        from sklearn.linear_model import LogisticRegression as SkLogisticRegression
        return [_SkModel(SkLogisticRegression(C=C, max_iter=config.max_iter).fit(x, y), n_classes) for C in sorted(Cs)]
    batch = None if fits_on_device(x, config.device) else 4096  # else mini-batch Adam
    if init is not None:
        return [LogisticRegression(C=Cs[0], max_iter=config.max_iter, tol=config.tol, device=config.device,
                                   n_classes=n_classes, batch_size=batch).fit(x, y, init=init)]
    return fit_path(x, y, Cs, max_iter=config.max_iter, tol=config.sweep_tol, device=config.device,
                    n_classes=n_classes, batch_size=batch)


class _SkModel:
    """sklearn's model with scores over all ``n_classes`` columns (absent classes score -inf)."""

    def __init__(self, model, n_classes):
        self.model, self.n_classes = model, n_classes

    def decision_function(self, x):
        scores = np.full((len(x), self.n_classes), -np.inf)
        decision = self.model.decision_function(x)
        if decision.ndim == 1:  # two classes: sklearn's binomial model, i.e. logits (0, d)
            decision = np.stack([np.zeros_like(decision), decision], axis=1)
        scores[:, self.model.classes_] = decision
        return scores

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        """(weight (n_classes, D), bias) giving ``decision_function``'s scores (absent classes: -1e9)."""
        coef, bias = self.model.coef_, self.model.intercept_
        if len(self.model.classes_) == 2:
            coef, bias = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], bias])
        weight = np.zeros((self.n_classes, coef.shape[1]))
        full_bias = np.full(self.n_classes, -1e9)
        weight[self.model.classes_], full_bias[self.model.classes_] = coef, bias
        return weight, full_bias


def _head(model) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(model, _SkModel):
        return model.head()
    return model.coef_.cpu().numpy(), model.intercept_.cpu().numpy()


def _scores(model, x) -> np.ndarray:
    scores = model.decision_function(x)
    return scores.cpu().numpy() if hasattr(scores, "cpu") else np.asarray(scores)


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
    weight, bias = _head(model)
    return {"C": Cs[best], "sweep": sweep, "top1": topk(scores, yv, 1), "top5": topk(scores, yv, 5),
            "mean_per_class_recall": mean_per_class_recall(scores.argmax(1), yv),
            "head": {"weight": weight, "bias": bias, **({"mean": norm.mean, "std": norm.std}
                                                        if config.normalize == "standardize" else {})}}


def save_head(path, head: dict, *, pool: str, layer, root: str, class_names: list[str]) -> None:
    """The refit head (seed 0) as safetensors, with its feature standardisation folded in beside it, so
    the gradcam probe can explain the very classifier this probe scored."""
    import json

    from safetensors.numpy import save

    from encoder_probe.cache import atomic_write_bytes
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in head.items()}
    meta = {"pool": pool, "layer": json.dumps(layer), "root": root, "class_names": json.dumps(class_names)}
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
        used = {**asdict(config), "layers": resolved}
        result = {
            "metrics": {m: summarize([r[m] for r in runs]) for m in ("top1", "top5", "mean_per_class_recall")},
            "chosen_C": [r["C"] for r in runs], "sweep": [r["sweep"] for r in runs],
            "data": {"train": len(y), "val": len(yv), "classes": train.meta["data"]["num_classes"],
                     "root": train.meta["data"]["root"]},
            "config": used, "config_hash": config_hash(used), "wall_s": round(time.perf_counter() - start, 3),
        }
        out = artifact_dir(encoder, context, self.name)
        if out is not None and len(resolved) == 1 and "mean" in runs[0]["head"]:  # a linear map of pooled tokens
            save_head(out / "head.safetensors", runs[0]["head"], pool=config.pool, layer=resolved[0],
                      root=train.meta["data"]["root"], class_names=train.class_names)
            result["artifacts"] = {"head": f"{out.name}/head.safetensors"}
        return result
