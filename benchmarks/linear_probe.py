"""Linear probe: the torch solver vs the sklearn CLIP recipe, same features, same C grid.

Both run the probe's whole protocol (probes/linear.py: sweep C on a seeded 10% of train, refit
on all of train, score val once); only the solver differs: ``torch`` (full-batch L-BFGS, warm
start along the C path) vs ``sklearn`` (LogisticRegression, lbfgs, max_iter 1000, each C from
scratch). Features are cached .npy files of overlapping Gaussian classes at the issue's shapes
(a real 50k-image extraction takes hours on this CPU), standardised by the protocol.

    .venv/bin/python benchmarks/linear_probe.py                 # (a) 50k x 768, 100 classes; (b) 10k x 1152, 1000
    .venv/bin/python benchmarks/linear_probe.py --scale 0.2     # both at a fifth of the rows
    .venv/bin/python benchmarks/linear_probe.py --cases a --passes   # where the time goes: passes per C
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

# rows, dim, classes, spread of the class means (set so that top-1 lands mid-range, not at chance)
CASES = {"a": (50_000, 768, 100, 3.0), "b": (10_000, 1152, 1000, 8.0)}


def features(root: Path, n: int, d: int, k: int, spread: float, seed: int = 0):
    """Cached train/val features: Gaussian classes whose means overlap (top-1 well below 100%)."""
    path = root / f"gauss-{n}x{d}-{k}-{spread:g}.npz"
    if not path.is_file():
        rng = np.random.default_rng(seed)
        means = rng.normal(size=(k, d)).astype(np.float32) * (spread / np.sqrt(d))
        y, yv = rng.integers(0, k, n), rng.integers(0, k, n // 5)
        x = means[y] + rng.normal(size=(n, d)).astype(np.float32)
        xv = means[yv] + rng.normal(size=(len(yv), d)).astype(np.float32)
        root.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=x, y=y, xv=xv, yv=yv)
    data = np.load(path)
    return data["x"], data["y"], data["xv"], data["yv"]


def passes(x, y, k, Cs):
    """Per C of the sweep: sklearn's lbfgs iterations (from scratch) and the torch path's loss
    evaluations (warm start), with the cost of one pass over the data for each."""
    import torch
    from sklearn.linear_model import LogisticRegression as SkLogisticRegression
    from encoder_probe import logreg
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    sk_iters, start = [], time.perf_counter()
    for C in Cs:
        sk_iters.append(int(SkLogisticRegression(C=C, max_iter=1000).fit(x, y).n_iter_[0]))
    sk_s = time.perf_counter() - start
    evals, loss = [0], logreg._objective
    def counted(*args):
        evals[0] += 1
        return loss(*args)
    logreg._objective = counted
    start = time.perf_counter()
    models = logreg.fit_path(torch.from_numpy(x), torch.from_numpy(y), Cs, tol=1e-2, n_classes=k)
    torch_s = time.perf_counter() - start
    logreg._objective = loss
    print(f"sklearn: {sk_s:.1f} s, iterations per C {sk_iters} (total {sum(sk_iters)}, {sk_s / sum(sk_iters):.3f} s each)")
    print(f"torch:   {torch_s:.1f} s, iterations per C {[m.n_iter_ for m in models]}, {evals[0]} loss+grad "
          f"evaluations ({torch_s / evals[0]:.3f} s each)")
    print(f"a 30x speed-up leaves {sk_s / 30:.2f} s = {sk_s / 30 / (torch_s / evals[0]):.0f} evaluations for {len(Cs)} Cs")


def main():
    from probes.linear import LinearConfig, run_protocol
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="a,b")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the rows (for a quick look)")
    parser.add_argument("--Cs", default=None, help="comma-separated C grid both solvers sweep (default: the probe's)")
    parser.add_argument("--work", default=".cache/bench-linear")
    parser.add_argument("--passes", action="store_true", help="count passes per C on the sweep rows instead")
    args = parser.parse_args()
    Cs = [float(c) for c in args.Cs.split(",")] if args.Cs else LinearConfig().Cs
    if args.passes:
        for case in args.cases.split(","):
            n, d, k, spread = CASES[case]
            x, y, _, _ = features(Path(args.work), int(n * args.scale), d, k, spread)
            rows = int(0.9 * len(x))  # the sweep's share of train
            print(f"case {case}: {rows} x {d}, {k} classes")
            passes(x[:rows], y[:rows], k, Cs)
        return
    print("| case | rows x dim, classes | torch s | sklearn s | speed-up | torch top-1 | sklearn top-1 | diff (pt) | C torch / sklearn |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for case in args.cases.split(","):
        n, d, k, spread = CASES[case]
        n = int(n * args.scale)
        x, y, xv, yv = features(Path(args.work), n, d, k, spread)
        runs = {}
        for solver in ("torch", "sklearn"):
            start = time.perf_counter()
            result = run_protocol(x, y, xv, yv, LinearConfig(Cs=Cs, solver=solver), seed=0, n_classes=k)
            runs[solver] = time.perf_counter() - start, result
        (t, r), (ts, rs) = runs["torch"], runs["sklearn"]
        print(f"| {case} | {n} x {d}, {k} | {t:.1f} | {ts:.1f} | {ts / t:.1f}x | {100 * r['top1']:.2f} | "
              f"{100 * rs['top1']:.2f} | {100 * (r['top1'] - rs['top1']):+.2f} | {r['C']} / {rs['C']} |", flush=True)


if __name__ == "__main__":
    main()
