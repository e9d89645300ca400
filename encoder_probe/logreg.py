"""L2 logistic regression in torch with scikit-learn's model, objective and parameters.

The model is sklearn's ``LogisticRegression(C=C)`` (lbfgs) for every class count: multinomial
over the classes present in ``y`` when there are three or more, and sklearn's *binomial* model
(one weight vector, logits (0, w.x + b)) when there are two, so a C means the same in both
(a two-row softmax penalising both rows would be the binomial model at 2C). The objective,
divided by the sample count as sklearn's lbfgs path does::

    mean_i loss(W x_i + b, y_i) + ||W||^2 / (2 C n)        (the intercept is not penalised)

Per-sample losses are evaluated as ``softplus(logsumexp_{j != y}(z_j - z_y))``, which keeps
their relative precision in float32 at large margins (``logsumexp(z) - z_y`` cancels to noise
there, and L-BFGS then stalls far from the optimum at large C).

Convergence is judged by a tolerance that holds: the objective is ``lam = 1/(C n)``-strongly
convex in W, so ``||grad|| / (lam ||W||)`` bounds the relative distance of W to the optimum;
``tol`` is that bound. Each fit records ``n_iter_``, ``grad_norm_``, ``relative_gradient_`` and
``converged_``. Full-batch L-BFGS (strong-Wolfe) when the features fit in memory (CPU or GPU,
float32; a fit that stalls short of ``tol`` at float32's resolution of the objective is polished
in float64 when that copy fits), mini-batch Adam otherwise; along a C path each fit starts from
the previous solution.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CHECK_EVERY = 20  # L-BFGS iterations between convergence checks (its history carries over)


@dataclass
class LogisticRegression:
    """sklearn-like estimator: ``fit(X, y)``, ``decision_function``, ``predict``, ``score``, ``objective``.

    ``classes_``, ``coef_`` ((1, D) for two classes, else (K, D)) and ``intercept_`` follow sklearn;
    ``decision_function`` is 1-D for two classes, as sklearn's. ``head(n_classes)`` gives the
    equivalent full-width linear head (absent classes score -1e9).
    """

    C: float = 1.0
    max_iter: int = 1000
    tol: float = 1e-3  # bound on the relative distance of W to the optimum, ||grad|| / (lam ||W||)
    device: str | torch.device | None = None
    batch_size: int | None = None  # None: full-batch L-BFGS; an int: mini-batch Adam
    epochs: int = 30
    n_classes: int | None = None  # width of ``head()``; default max(y) + 1

    classes_: np.ndarray | None = None
    coef_: torch.Tensor | None = None
    intercept_: torch.Tensor | None = None
    n_iter_: int = 0
    grad_norm_: float = float("nan")
    relative_gradient_: float = float("nan")
    converged_: bool = False

    @classmethod
    def from_sklearn(cls, model) -> "LogisticRegression":
        """The same solution as a fitted sklearn ``LogisticRegression`` (to evaluate its objective here)."""
        ours = cls(C=float(model.C))
        ours.classes_ = np.asarray(model.classes_)
        ours.coef_ = torch.tensor(model.coef_, dtype=torch.float32)
        ours.intercept_ = torch.tensor(model.intercept_, dtype=torch.float32)
        return ours

    def _tensor(self, X) -> torch.Tensor:
        device = self.coef_.device if self.coef_ is not None else torch.device(self.device or "cpu")
        return (X if isinstance(X, torch.Tensor) else torch.from_numpy(np.array(X, np.float32))).to(device, torch.float32)

    def _targets(self, y, device) -> torch.Tensor:
        """Labels as indices into ``classes_``."""
        y = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)
        index = np.searchsorted(self.classes_, y)
        if (index >= len(self.classes_)).any() or (self.classes_[np.minimum(index, len(self.classes_) - 1)] != y).any():
            raise ValueError(f"labels {sorted(set(y.tolist()) - set(self.classes_.tolist()))[:5]} were not seen in fit")
        return torch.from_numpy(index).to(device)

    @property
    def binary(self) -> bool:
        return len(self.classes_) == 2

    def objective(self, X, y) -> float:
        """sklearn's objective (mean-normalised) at the current solution."""
        X = self._tensor(X)
        with torch.no_grad():
            return float(_objective(X, self._targets(y, X.device), self.coef_, self.intercept_,
                                    1.0 / (self.C * len(X)), self.binary))

    def fit(self, X, y, *, init: "LogisticRegression | None" = None) -> "LogisticRegression":
        X = self._tensor(X)
        self.classes_ = np.unique(np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y))
        if len(self.classes_) < 2:
            raise ValueError(f"needs at least two classes, got {self.classes_.tolist()}")
        t = self._targets(y, X.device)
        rows = 1 if self.binary else len(self.classes_)
        if init is not None and init.coef_ is not None and np.array_equal(init.classes_, self.classes_):
            W, b = init.coef_.detach().clone().to(X.device), init.intercept_.detach().clone().to(X.device)
        else:
            W, b = X.new_zeros(rows, X.shape[1]), X.new_zeros(rows)
        W.requires_grad_(True)
        b.requires_grad_(True)
        lam = 1.0 / (self.C * len(X))
        if self.batch_size is None:
            self.n_iter_ = _lbfgs(X, t, W, b, lam, self.binary, self.max_iter, self.tol)
        else:
            self.n_iter_ = _adam(X, t, W, b, lam, self.binary, self.batch_size, self.epochs)
        gradient = _gradient(X, t, W, b, lam, self.binary, self.batch_size)
        if (self.batch_size is None and _relative(gradient, W.detach(), lam) > self.tol and self.n_iter_ < self.max_iter
                and _fits(X, itemsize=8)):
            # stopped short of tol because float32 cannot resolve the objective any finer: polish in float64
            X64 = X.double()
            W, b = W.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
            self.n_iter_ += _lbfgs(X64, t, W, b, lam, self.binary, self.max_iter - self.n_iter_, self.tol)
            gradient = _gradient(X64, t, W, b, lam, self.binary)
            del X64
        self.grad_norm_ = float(gradient.norm())
        self.relative_gradient_ = _relative(gradient, W.detach(), lam)  # of the solution before it is rounded
        self.converged_ = self.relative_gradient_ <= self.tol
        self.coef_, self.intercept_ = W.detach().float(), b.detach().float()
        return self

    def convergence(self) -> dict:
        """What results.json records of this fit."""
        return {"C": self.C, "n_iter": int(self.n_iter_), "grad_norm": self.grad_norm_,
                "relative_gradient": self.relative_gradient_, "tol": self.tol, "converged": bool(self.converged_)}

    def decision_function(self, X) -> torch.Tensor:
        X = self._tensor(X)
        with torch.no_grad():
            scores = X @ self.coef_.T + self.intercept_
        return scores[:, 0] if self.binary else scores

    def predict(self, X) -> np.ndarray:
        scores = self.decision_function(X)
        index = (scores > 0).long() if self.binary else scores.argmax(1)
        return self.classes_[index.cpu().numpy()]

    def score(self, X, y) -> float:
        return float((self.predict(X) == np.asarray(y)).mean())

    def head(self, n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        return linear_head(self.classes_, self.coef_.cpu().numpy(), self.intercept_.cpu().numpy(),
                           n_classes or self.n_classes or int(self.classes_.max()) + 1)


def linear_head(classes: np.ndarray, coef: np.ndarray, intercept: np.ndarray, n_classes: int):
    """(weight (n_classes, D), bias) whose argmax is the model's prediction, for sklearn's or our
    model: two classes become logits (0, w.x + b); classes absent from the fit get bias -1e9."""
    coef, intercept = np.asarray(coef, np.float64), np.asarray(intercept, np.float64)
    if len(classes) == 2:
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    weight, bias = np.zeros((n_classes, coef.shape[1])), np.full(n_classes, -1e9)
    weight[classes], bias[classes] = coef, intercept
    return weight, bias


def _per_sample(X, t, W, b, binary) -> torch.Tensor:
    z = X @ W.T + b
    if binary:  # sklearn's binomial loss log(1 + exp(-s z)), s = +-1
        return F.softplus(torch.where(t == 1, -z[:, 0], z[:, 0]))
    others = (z - z.gather(1, t[:, None])).masked_fill(F.one_hot(t, z.shape[1]).bool(), float("-inf"))
    return F.softplus(torch.logsumexp(others, 1))  # = logsumexp(z) - z_y, without the cancellation


def _objective(X, t, W, b, lam, binary):
    """Summed in float64: the line search compares values that differ in their 7th digit near the optimum."""
    return _per_sample(X, t, W, b, binary).double().mean() + 0.5 * lam * W.double().square().sum()


def _gradient(X, t, W, b, lam, binary, batch_size=None) -> torch.Tensor:
    """The full objective's gradient (W and b flattened), in batches when the fit was mini-batch."""
    W, b = W.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    step = batch_size or len(X)
    for start in range(0, len(X), step):
        rows = slice(start, start + step)
        (_per_sample(X[rows], t[rows], W, b, binary).sum() / len(X)).backward()
    (0.5 * lam * (W * W).sum()).backward()
    return torch.cat([W.grad.flatten(), b.grad])


def fits_in_memory(nbytes: int, device=None) -> bool:
    """Whether ``nbytes`` fit in the free memory of ``device`` (a CUDA device, else this machine's RAM)."""
    import os
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return nbytes < torch.cuda.mem_get_info(device)[0]
    return nbytes < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _fits(X: torch.Tensor, itemsize: int) -> bool:
    """A copy of X at ``itemsize`` bytes per value, and as much again for the work, on X's device."""
    return X.device.type in ("cpu", "cuda") and fits_in_memory(3 * X.numel() * itemsize, X.device)


def _relative(gradient: torch.Tensor, W: torch.Tensor, lam: float) -> float:
    return float(gradient.norm() / max(lam * float(W.norm()), 1e-30))


def _lbfgs(X, t, W, b, lam, binary, max_iter, tol) -> int:
    """L-BFGS until the relative gradient is below ``tol``, it stops making progress, or max_iter."""
    optimizer = torch.optim.LBFGS([W, b], lr=1, max_iter=CHECK_EVERY, max_eval=CHECK_EVERY * 20, history_size=20,
                                  tolerance_grad=0.0, tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = _objective(X, t, W, b, lam, binary)
        loss.backward()
        return loss

    done = 0
    while done < max_iter:
        optimizer.param_groups[0]["max_iter"] = min(CHECK_EVERY, max_iter - done)
        optimizer.step(closure)
        n_iter = optimizer.state[optimizer._params[0]]["n_iter"]
        stalled = n_iter - done < optimizer.param_groups[0]["max_iter"]  # the line search found no decrease
        done = n_iter
        gradient = torch.cat([W.grad.flatten(), b.grad])
        if stalled or _relative(gradient, W.detach(), lam) <= tol:
            break
    return done


def _adam(X, t, W, b, lam, binary, batch_size, epochs) -> int:
    """Mini-batch Adam with a cosine schedule; each batch's loss carries the full penalty."""
    optimizer = torch.optim.Adam([W, b], lr=1e-2)
    steps = epochs * max(1, -(-len(X) // batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for rows in torch.randperm(len(X), generator=generator).split(batch_size):
            rows = rows.to(X.device)
            optimizer.zero_grad()
            _objective(X[rows], t[rows], W, b, lam, binary).backward()
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
