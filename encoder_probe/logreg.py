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

:class:`LogisticRegressionGrid` fits every C of a grid at once on the same objective, the heads
stacked into one matrix, each head to the tolerance its rank needs (see its docstring): what the
linear probe's sweep runs, and (one C, from the sweep's solution) its refit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .selection import curve_turned

CHECK_EVERY = 5  # L-BFGS iterations between convergence checks (its history carries over; a check is one norm)


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
        device = torch.device(self.device or "cpu")
        # full batch: the features on the device; mini-batch: on the host, each batch copied over
        X = self._tensor(X) if self.batch_size is None else _host(X, device)
        self.classes_ = np.unique(np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y))
        if len(self.classes_) < 2:
            raise ValueError(f"needs at least two classes, got {self.classes_.tolist()}")
        t = self._targets(y, X.device)
        rows = 1 if self.binary else len(self.classes_)
        if init is not None and init.coef_ is not None and np.array_equal(init.classes_, self.classes_):
            W, b = init.coef_.detach().clone().to(device), init.intercept_.detach().clone().to(device)
        else:
            W, b = torch.zeros(rows, X.shape[1], device=device), torch.zeros(rows, device=device)
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
        x, y = X[rows].to(W.device, non_blocking=True), t[rows].to(W.device, non_blocking=True)
        (_per_sample(x, y, W, b, binary).sum() / len(X)).backward()
    (0.5 * lam * (W * W).sum()).backward()
    return torch.cat([W.grad.flatten(), b.grad])


def _host(X, device: torch.device) -> torch.Tensor:
    """The features as a float32 host tensor, pinned when batches go to a GPU (asynchronous copies)."""
    X = (X if isinstance(X, torch.Tensor) else torch.from_numpy(np.asarray(X))).to("cpu", torch.float32)
    return X.pin_memory() if device.type == "cuda" else X


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
            x, y = X[rows].to(W.device, non_blocking=True), t[rows].to(W.device, non_blocking=True)
            optimizer.zero_grad()
            _objective(x, y, W, b, lam, binary).backward()
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


# -- every C of a grid at once ------------------------------------------------------------------
CHUNK_BYTES = 64 << 20  # logits of one row chunk (all stacked heads): bounds the work memory
PRECONDITION_MAX_DIM = 8192  # eigendecompose E[x x^T] up to this feature dimension (8192: ~1 min on 2 cores)
NOISE = 1e-6  # relative change of the objective that float32 logits cannot resolve (measured ~1e-7; CG_DESCENT's 1e-6)
WOLFE_DELTA = 0.1  # approximate Wolfe: a step is accepted while phi'(step) <= 0.8 |phi'(0)|
# The sweep only ranks C: a head whose relative gradient is below RANK_TOL is scored on held-out, and if it is
# clearly below the best (rank_margin) it stops there: it cannot win. How far a head's held-out top-1 still
# moves between there and its optimum grows with the relative gradient (W is within about that fraction of
# its optimum) and with how many held-out items sit near the decision boundary. Measured against each head's
# score at 1e-4: at most 0.017 x the relative gradient on Fashion-MNIST MobileNetV2 features (89% top-1,
# 1,200 held out), 0.054 x on a 10-class Gaussian set at 48% (1,000 held out). RANK_SLOPE is twice the larger.
RANK_TOL = 0.3
RANK_SLOPE = 0.1


def rank_margin(n_scored: int, relative: float) -> float:
    """How far below the best a held-out proportion over ``n_scored`` items, of a fit at this relative gradient,
    must be for it to be out of the running: RANK_SLOPE x the gradient, and at least three items."""
    return max(3.0 / n_scored, RANK_SLOPE * min(relative, RANK_TOL))


@dataclass
class LogisticRegressionGrid:
    """Every C of a grid fitted together, the heads stacked: one GEMM per pass over the features.

    With few classes a single fit is memory-bound (the features are read to multiply a (D, K)
    matrix), so stacking the grid's heads into one (D, heads x K) matrix costs about one fit's
    pass for all of them (DINOv2 trains its many linear heads on one forward the same way). Each
    head runs its own L-BFGS (own history, own Armijo step) on the same objective as
    :class:`LogisticRegression` and stops at its own ``tol``; a head that is done leaves the
    stack. With a ``scorer`` (a fitted model -> held-out score, higher is better) the sweep stops
    once ``patience`` successive larger C values have not beaten the best one: the heads still
    running then are dropped (``models_`` holds None for them, ``scores_`` NaN).

    The sweep only has to rank C values, so with ``rank_tol`` (and a scorer) a head is scored once its
    relative gradient is below ``rank_tol``, and stops there if it is clearly below the best score so far
    (:func:`rank_margin`): it cannot win, and its held-out score is already known to within about an item.
    The others (the contenders) go on to ``tol``; a head stopped this way that ends up within the margin of
    the final best is resumed to ``tol``, so every head that could win is fitted to ``tol``. ``ranked_``
    lists the heads left at ``rank_tol``. The chosen C is refit tightly by the caller.
    """

    Cs: list
    tol: float = 1e-2
    max_iter: int = 1000
    patience: int = 0  # 0: fit every C
    n_scored: int | None = None  # held-out items the scorer's proportion is over (the turn's margin)
    device: str | torch.device | None = None
    n_classes: int | None = None
    history: int = 10
    rank_tol: float | None = None  # None: every head to tol

    models_: list | None = None
    scores_: np.ndarray | None = None
    n_passes_: int = 0  # evaluations of the stacked objective (each one pass over the features)
    stopped_: str | None = None
    ranked_: list | None = None  # heads left at rank_tol, clearly below the best
    probes_: np.ndarray | None = None  # each head's held-out score at its latest check below rank_tol (NaN: none)

    def fit(self, X, y, scorer=None, init: "LogisticRegression | None" = None) -> "LogisticRegressionGrid":
        """``init``: a fitted model (same classes) every head starts from (the refit starts from the
        sweep's solution); else zeros."""
        Cs = [float(c) for c in self.Cs]
        if any(b <= a for a, b in zip(Cs, Cs[1:])):
            raise ValueError(f"Cs must be strictly ascending, got {Cs}")
        template = LogisticRegression(C=Cs[0], device=self.device, n_classes=self.n_classes)
        X = template._tensor(X)
        template.classes_ = np.unique(np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y))
        if len(template.classes_) < 2:
            raise ValueError(f"needs at least two classes, got {template.classes_.tolist()}")
        lam = torch.tensor([1.0 / (C * len(X)) for C in Cs], dtype=torch.float64, device=X.device)
        H = len(Cs)
        self.models_, self.scores_, self.stopped_, self.ranked_ = [None] * H, np.full(H, np.nan), None, []
        rows = 1 if template.binary else len(template.classes_)
        theta = torch.zeros(H, rows * (X.shape[1] + 1), device=X.device)
        warm = init is not None and np.array_equal(init.classes_, template.classes_)
        if warm:
            theta[:] = torch.cat([init.coef_.flatten(), init.intercept_]).to(X.device)
        problem = _Stacked(X, template._targets(y, X.device), template.binary, len(template.classes_),
                           at=theta if warm else None, lam=lam)

        racing = self.rank_tol is not None and self.rank_tol > self.tol and scorer is not None and self.n_scored
        self.probes_, ranked = np.full(H, np.nan), {}  # ranked: the heads left at rank_tol, with their margins
        probes = self.probes_

        def model(h, theta_h, gradient, n_iter):  # a head left at rank_tol is judged by that tolerance
            fitted = LogisticRegression(C=Cs[h], max_iter=self.max_iter, tol=self.tol, device=self.device,
                                        n_classes=self.n_classes)
            fitted.classes_ = template.classes_
            coef, intercept = problem.split(theta_h[None])
            fitted.coef_, fitted.intercept_ = coef[0].clone(), intercept[0].clone()
            fitted.n_iter_, fitted.grad_norm_ = int(n_iter), float(gradient.norm())
            fitted.relative_gradient_ = float(gradient.norm() / max(float(lam[h]) * float(fitted.coef_.norm()), 1e-30))
            if h in ranked:  # judged by the tolerance it stopped at
                fitted.tol = max(fitted.relative_gradient_, self.tol)
            fitted.converged_ = fitted.relative_gradient_ <= fitted.tol
            return fitted

        def finish(h, theta_h, gradient, n_iter):
            self.models_[h] = model(h, theta_h, gradient, n_iter)
            if scorer is not None:
                self.scores_[h] = float(scorer(self.models_[h]))

        def out_of_the_running(h, theta_h, gradient, n_iter) -> bool:
            fitted = model(h, theta_h, gradient, n_iter)
            probes[h] = float(scorer(fitted))
            margin = rank_margin(self.n_scored, fitted.relative_gradient_)
            if probes[h] < np.nanmax(np.concatenate([probes, self.scores_])) - margin:
                ranked[h] = margin
                return True
            return False

        should_stop = self._turned if scorer is not None and self.patience else None
        self.n_passes_ = _lbfgs_stacked(problem, lam, theta, self.tol, self.max_iter, self.history, finish,
                                        should_stop=should_stop, rank_tol=self.rank_tol if racing else None,
                                        out_of_the_running=out_of_the_running)
        if racing:
            self._resume_contenders(problem, lam, finish, ranked)
        return self

    def _resume_contenders(self, problem, lam, finish, ranked: dict):
        """Fit to tol every head left at rank_tol that ended up within the margin of the final best (each
        at most once: resuming one may lower the best and bring others back)."""
        while True:
            best = np.nanmax(self.scores_)
            resume = sorted(h for h in ranked if self.scores_[h] >= best - ranked[h])
            if not resume:
                self.ranked_ = sorted(ranked)
                return
            for h in resume:
                del ranked[h]
            theta = torch.stack([torch.cat([self.models_[h].coef_.flatten(), self.models_[h].intercept_])
                                 for h in resume])
            done = {h: self.models_[h].n_iter_ for h in resume}
            self.n_passes_ += _lbfgs_stacked(
                problem, lam[resume], theta, self.tol, max(1, self.max_iter - max(done.values())), self.history,
                lambda j, theta_h, gradient, n_iter: finish(resume[j], theta_h, gradient, done[resume[j]] + n_iter),
                heads=resume)

    def _turned(self) -> int | None:
        """The first head to drop once the curve over the smallest Cs has turned, else None. A head still
        fitting counts with its latest held-out score below rank_tol (the contenders near the best)."""
        scores = np.where(np.isnan(self.scores_), self.probes_, self.scores_)
        done = 0
        while done < len(scores) and not np.isnan(scores[done]):
            done += 1
        self.stopped_ = curve_turned(scores[:done].tolist(), self.patience, self.Cs, self.n_scored) if done else None
        return done if self.stopped_ is not None else None


class _Stacked:
    """The summed objective of stacked heads (each its own lam) with its gradient, in row chunks.

    theta is (heads, rows * D + rows): each head's W (rows x D, flattened) then its intercepts;
    rows is 1 for two classes (sklearn's binomial model), else the class count.
    """

    def __init__(self, X, t, binary, n_classes, at=None, lam=None):
        """``at`` (heads, size) with their ``lam``: precondition each head with the curvature at that point
        (a warm start next to its optimum) instead of the uniform one."""
        self.X, self.t, self.binary = X, t, binary
        self.rows, self.D = (1 if binary else n_classes), X.shape[1]
        self.basis = self.inverses = None
        # softmax curvature at the start (p = 1/K: p(1 - p)); logistic: 1/4
        self.curvature = 0.25 if binary else (1 / n_classes) * (1 - 1 / n_classes)
        if self.D > PRECONDITION_MAX_DIM:
            return
        if at is not None:
            self.inverses, self.intercept_curvature = self._curvature_inverses(at, lam)
            return
        values, self.basis = torch.linalg.eigh(self._moments().double() / len(X))  # eigendecomposed once
        self.basis, self.values = self.basis.float(), values.clamp_min(0)

    def _moments(self, weight=None) -> torch.Tensor:
        """sum_i w_i x_i x_i^T (w = 1 without ``weight``), in row chunks."""
        X, moments = self.X, torch.zeros(self.D, self.D, device=self.X.device)
        for start in range(0, len(X), 65536):
            x = X[start:start + 65536]
            moments.addmm_((x if weight is None else x * weight[start:start + 65536, None]).T, x)
        return moments

    def _curvature_inverses(self, theta, lam):
        """Per head: the inverse of E[w x x^T] + lam (float32, from its Cholesky factor), w each sample's
        softmax curvature at theta ((1 - sum_k p_k^2) / K, p(1 - p) for the logistic model: the mean of the
        Hessian's class-block diagonal), and the intercept's curvature E[w]: next to the optimum, the
        Hessian up to how the curvature is shared between classes. On the real-feature refit this takes
        about 30% fewer iterations than the uniform curvature (a class-block-diagonal one, K such
        matrices, 45% fewer, at K times the cost)."""
        inverses, intercept = [], []
        step = max(1, CHUNK_BYTES // (4 * self.rows))
        for h in range(len(theta)):
            W, b = self.split(theta[h:h + 1])
            weight = torch.empty(len(self.X), device=self.X.device)
            for start in range(0, len(self.X), step):  # the logits a chunk of rows at a time
                z = torch.addmm(b[0], self.X[start:start + step], W[0].T)
                if self.binary:
                    p = torch.sigmoid(z[:, 0])
                    weight[start:start + step] = p * (1 - p)
                else:
                    weight[start:start + step] = (1 - torch.softmax(z, 1).square().sum(1)) / self.rows
            eye = torch.eye(self.D, dtype=torch.float64, device=self.X.device)
            factor = torch.linalg.cholesky(self._moments(weight).double() / len(self.X) + float(lam[h]) * eye)
            inverses.append(torch.cholesky_inverse(factor).float())  # one GEMM per use, not two triangular solves
            intercept.append(float(weight.mean()))
        return torch.stack(inverses), torch.tensor(intercept, device=self.X.device)

    @property
    def preconditioned(self) -> bool:
        return self.basis is not None or self.inverses is not None

    def precondition(self, q, lam, heads):
        """q times the inverse of each head's approximate Hessian (per class row). Uniform: c * E[x x^T] + lam,
        c the softmax curvature at p = 1/K, computed in the eigenbasis of E[x x^T]: exact for the penalty,
        the data part's shape from the features, its scale left to L-BFGS's gamma. From a warm start: each
        head's own curvature-weighted moments (:meth:`_curvature_inverses`). ``heads``: which heads q's rows are."""
        A, R, D = len(q), self.rows, self.D
        W, b = q[:, :R * D].reshape(A, R, D), q[:, R * D:]
        if self.inverses is not None:
            W = torch.bmm(W, self.inverses[heads])  # the inverses are symmetric
            return torch.cat([W.reshape(A, R * D), b / self.intercept_curvature[heads, None]], 1)
        if self.basis is None:
            return q
        scale = 1.0 / (self.curvature * self.values[None] + lam[:, None])  # (A, D), float64
        W = (W.reshape(A * R, D) @ self.basis).view(A, R, D) * scale.float()[:, None, :]
        W = W.reshape(A * R, D) @ self.basis.T
        return torch.cat([W.reshape(A, R * D), b / self.curvature], 1)

    @property
    def size(self) -> int:
        return self.rows * (self.D + 1)

    def split(self, theta):
        A = len(theta)
        return theta[:, :self.rows * self.D].reshape(A, self.rows, self.D), theta[:, self.rows * self.D:]

    def __call__(self, theta, lam):
        """(objective (A,) float64, gradient (A, size)) at each head's theta."""
        X, n, A, R = self.X, len(self.X), len(theta), self.rows
        W, b = self.split(theta)
        Wt, bias = W.reshape(A * R, self.D).T, b.reshape(A * R)
        loss = torch.zeros(A, dtype=torch.float64, device=X.device)
        gW, gb = torch.zeros(A * R, self.D, device=X.device), torch.zeros(A, R, device=X.device)
        step = max(1, CHUNK_BYTES // (4 * A * R))
        for start in range(0, n, step):
            x, t = X[start:start + step], self.t[start:start + step]
            z = torch.addmm(bias, x, Wt).view(len(x), A, R)
            if self.binary:  # softplus(-s z), s = +-1; d/dz = -s sigmoid(-s z)
                sign = torch.where(t == 1, -1.0, 1.0)[:, None, None]
                margin = z * sign
                loss += F.softplus(margin).sum((0, 2), dtype=torch.float64)
                g = torch.sigmoid(margin) * sign
            else:  # softplus(logsumexp_{j != y}(z_j - z_y)), the cancellation-free form of _per_sample
                index = t[:, None, None].expand(len(x), A, 1)
                others = (z - z.gather(2, index)).scatter_(2, index, float("-inf"))
                lse = torch.logsumexp(others, 2, keepdim=True)
                loss += F.softplus(lse).sum((0, 2), dtype=torch.float64)
                g = others.sub_(F.softplus(lse)).exp_().scatter_(2, index, -torch.sigmoid(lse))  # p - onehot
            g = g.view(len(x), A * R)
            gW.addmm_(g.T, x, alpha=1.0 / n)
            gb += g.sum(0).view(A, R) / n
        penalty = W.double().square().sum((1, 2))
        gradient = torch.cat([(gW.view(A, R, self.D) + lam.float()[:, None, None] * W).reshape(A, -1), gb], 1)
        return loss / n + 0.5 * lam * penalty, gradient


def _lbfgs_stacked(problem, lam, theta, tol, max_iter, history, finish, should_stop=None, rank_tol=None,
                   out_of_the_running=None, heads=None) -> int:
    """Per-head L-BFGS with backtracking (Armijo) line searches, all heads evaluated together.

    The objective is strongly convex, so s.y > 0 holds for every step and no Wolfe curvature
    search is needed. Where float32 no longer resolves the objective's decrease, a step is accepted
    on its directional derivative (approximate Wolfe), so each head reaches its ``tol``; a head that
    finds no acceptable step within 12 halvings is done. The initial inverse Hessian of each head
    is ``problem.precondition`` (see :class:`_Stacked`), scaled per head as L-BFGS scales the
    identity (s.y / y.H0.y); on real features (correlated dimensions) this cuts the iterations
    several-fold. ``finish(h, theta, gradient, n_iter)`` is called as each head stops;
    ``should_stop()`` may then name the first head index to drop (all larger ones with it). A head whose
    relative gradient is below ``rank_tol`` also stops where ``out_of_the_running(h, theta, gradient,
    n_iter)`` says so. ``heads``: the problem's head index of each row of theta (default: in order).
    Returns the number of stacked evaluations.
    """
    H, device = len(lam), lam.device
    active = torch.arange(H, device=device)
    heads = active if heads is None else torch.as_tensor(heads, device=device)
    f, g = problem(theta, lam)
    passes, n_iter = 1, torch.zeros(H, dtype=torch.long, device=device)
    S = torch.zeros(H, history, problem.size, device=device)
    Y = torch.zeros_like(S)
    rho = torch.zeros(H, history, dtype=torch.float64, device=device)
    gamma = torch.ones(H, device=device)
    first = True

    def relative(theta, g, lam_a):
        W, _ = problem.split(theta)
        return g.double().norm(dim=1) / (lam_a * W.double().flatten(1).norm(dim=1)).clamp_min(1e-30)

    k = 0
    while len(active):
        lam_a = lam[active]
        rel = relative(theta, g, lam_a)
        done = (rel <= tol) | (n_iter[active] >= max_iter)
        if rank_tol is not None:
            for j in (~done & (rel <= rank_tol)).nonzero()[:, 0].tolist():
                done[j] = out_of_the_running(int(active[j]), theta[j], g[j], int(n_iter[active[j]]))
        # the two-loop recursion over each head's own history (slots in ring order, newest first)
        order = [(k - 1 - i) % history for i in range(min(k, history))]
        q, alphas = -g.clone(), {}
        for i in order:
            alphas[i] = rho[:, i] * (S[:, i].double() * q.double()).sum(1)
            q -= alphas[i].float()[:, None] * Y[:, i]
        q = problem.precondition(q, lam_a, heads[active]) * gamma[:, None]
        for i in reversed(order):
            beta = rho[:, i] * (Y[:, i].double() * q.double()).sum(1)
            q += (alphas[i] - beta).float()[:, None] * S[:, i]
        d = q
        slope = (g.double() * d.double()).sum(1)
        uphill = slope >= 0
        if uphill.any():  # lost descent (rounding): restart that head from the steepest descent
            d[uphill], slope[uphill] = -g[uphill], -(g[uphill].double().square().sum(1))
        step = torch.ones(len(active), dtype=torch.float64, device=device)
        if first and not problem.preconditioned:
            step = torch.clamp(1.0 / g.abs().sum(1).double(), max=1.0)
        first = False
        # Armijo backtracking: heads that fail retry at a smaller step, evaluated together. Near the optimum
        # float32 logits cannot resolve the objective's decrease (~NOISE relative): there a step is also
        # accepted on its directional derivative (Hager-Zhang's approximate Wolfe condition,
        # phi'(step) <= (2 delta - 1) phi'(0)), which the gradient still resolves
        f_new, g_new = f.clone(), g.clone()
        pending = ~done
        accepted = torch.zeros(len(active), dtype=torch.bool, device=device)
        for _ in range(12):
            if not pending.any():
                break
            rows = pending.nonzero()[:, 0]
            trial = theta[rows] + step[rows].float()[:, None] * d[rows]
            f_try, g_try = problem(trial, lam_a[rows])
            passes += 1
            ok = f_try <= f[rows] + 1e-4 * step[rows] * slope[rows]
            unresolved = f_try <= f[rows] + NOISE * f[rows].abs()
            ok |= unresolved & ((g_try.double() * d[rows].double()).sum(1) <= -(1 - 2 * WOLFE_DELTA) * slope[rows])
            good = rows[ok]
            f_new[good], g_new[good] = f_try[ok], g_try[ok]
            accepted[good] = True
            pending[good] = False
            step[rows[~ok]] *= 0.5
        stalled = ~done & ~accepted  # no acceptable step within 2^-12 of the L-BFGS one
        new_theta = theta.clone()
        moved = accepted.nonzero()[:, 0]
        if len(moved):
            s = step[moved].float()[:, None] * d[moved]
            yv = g_new[moved] - g[moved]
            sy = (s.double() * yv.double()).sum(1)
            slot = k % history
            valid = sy > 1e-10 * s.double().norm(dim=1) * yv.double().norm(dim=1)
            S[moved, slot], Y[moved, slot] = s, yv
            rho[moved, slot] = torch.where(valid, 1.0 / sy.clamp_min(1e-300), torch.zeros_like(sy))
            yHy = (yv.double() * problem.precondition(yv, lam_a[moved], heads[active[moved]]).double()).sum(1)
            gamma[moved[valid]] = (sy[valid] / yHy[valid].clamp_min(1e-300)).float()
            new_theta[moved] = theta[moved] + s
            n_iter[active[moved]] += 1
        theta, f, g = new_theta, f_new, g_new
        k += 1
        stop = done | stalled
        if stop.any():
            for j in stop.nonzero()[:, 0].tolist():
                finish(int(active[j]), theta[j], g[j], int(n_iter[active[j]]))
            keep = ~stop
            if should_stop is not None:
                first_dropped = should_stop()
                if first_dropped is not None:
                    keep &= active < first_dropped
            active, theta, f, g = active[keep], theta[keep], f[keep], g[keep]
            S, Y, rho, gamma = S[keep], Y[keep], rho[keep], gamma[keep]  # each head's state stays compact
    return passes
