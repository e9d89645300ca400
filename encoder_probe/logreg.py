"""Multinomial L2 logistic regression in torch, with scikit-learn's objective and parameters.

The objective is exactly sklearn's ``LogisticRegression(C=C)`` (multinomial, lbfgs), divided by
the sample count as sklearn's lbfgs path does::

    mean_i CE(W x_i + b, y_i) + ||W||^2 / (2 C n)        (the intercept is not penalised)

so a C chosen here means the same thing there. Full-batch L-BFGS with a strong-Wolfe line
search when the features fit in memory (CPU or GPU, float32), mini-batch Adam otherwise; along a
C path each fit starts from the previous solution (warm start), which is most of the speed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class LogisticRegression:
    """sklearn-like estimator: ``fit(X, y)``, ``decision_function``, ``predict``, ``score``, ``objective``."""

    C: float = 1.0
    max_iter: int = 1000
    tol: float = 1e-6  # on the largest gradient entry of the (mean-normalised) objective
    device: str | torch.device | None = None
    batch_size: int | None = None  # None: full-batch L-BFGS; an int: mini-batch Adam
    epochs: int = 30
    n_classes: int | None = None

    coef_: torch.Tensor | None = None  # (K, D)
    intercept_: torch.Tensor | None = None  # (K,)
    n_iter_: int = 0

    def _tensor(self, X) -> torch.Tensor:
        device = torch.device(self.device) if self.device is not None else torch.device("cpu")
        return (X if isinstance(X, torch.Tensor) else torch.from_numpy(np.array(X, np.float32))).to(device, torch.float32)

    def _labels(self, y) -> torch.Tensor:
        device = self.coef_.device if self.coef_ is not None else torch.device(self.device or "cpu")
        return (y if isinstance(y, torch.Tensor) else torch.from_numpy(np.array(y, np.int64))).to(device, torch.int64)

    def objective(self, X, y) -> float:
        """sklearn's objective (mean-normalised) at the current solution."""
        X, y = self._tensor(X), self._labels(y)
        with torch.no_grad():
            return float(_loss(X, y, self.coef_, self.intercept_, 1.0 / (self.C * len(X))))

    def fit(self, X, y, *, init: "LogisticRegression | None" = None) -> "LogisticRegression":
        X, y = self._tensor(X), self._labels(y)
        k = self.n_classes or int(y.max()) + 1
        if init is not None and init.coef_ is not None:
            W, b = init.coef_.detach().clone().to(X.device), init.intercept_.detach().clone().to(X.device)
        else:
            W, b = X.new_zeros(k, X.shape[1]), X.new_zeros(k)
        W.requires_grad_(True)
        b.requires_grad_(True)
        lam = 1.0 / (self.C * len(X))
        if self.batch_size is None:
            self.n_iter_ = _lbfgs(X, y, W, b, lam, self.max_iter, self.tol)
        else:
            self.n_iter_ = _adam(X, y, W, b, lam, self.batch_size, self.epochs)
        self.coef_, self.intercept_ = W.detach(), b.detach()
        return self

    def decision_function(self, X) -> torch.Tensor:
        X = self._tensor(X)
        with torch.no_grad():
            return X @ self.coef_.T + self.intercept_

    def predict(self, X) -> np.ndarray:
        return self.decision_function(X).argmax(1).cpu().numpy()

    def score(self, X, y) -> float:
        return float((self.predict(X) == np.asarray(y)).mean())


def _loss(X, y, W, b, lam):
    return F.cross_entropy(X @ W.T + b, y) + 0.5 * lam * (W * W).sum()


def _lbfgs(X, y, W, b, lam, max_iter, tol) -> int:
    optimizer = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=tol,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = _loss(X, y, W, b, lam)
        loss.backward()
        return loss

    optimizer.step(closure)
    return optimizer.state[optimizer._params[0]]["n_iter"]


def _adam(X, y, W, b, lam, batch_size, epochs) -> int:
    """Mini-batch Adam with a cosine schedule; each batch's loss carries the full penalty."""
    optimizer = torch.optim.Adam([W, b], lr=1e-2)
    steps = epochs * max(1, -(-len(X) // batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for rows in torch.randperm(len(X), generator=generator).split(batch_size):
            rows = rows.to(X.device)
            optimizer.zero_grad()
            _loss(X[rows], y[rows], W, b, lam).backward()
            optimizer.step()
            schedule.step()
    return steps


def fit_path(X, y, Cs, **params) -> list[LogisticRegression]:
    """One fit per C, ascending, each warm-started from the previous solution."""
    models, previous = [], None
    for C in sorted(Cs):
        previous = LogisticRegression(C=float(C), **params).fit(X, y, init=previous)
        models.append(previous)
    return models
