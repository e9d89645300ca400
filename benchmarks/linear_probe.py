"""Linear probe: encoder-probe against the peers researchers would otherwise use, side by side in one run.

Every solver gets the same feature arrays (train x, y; val xv, yv) and runs its whole protocol:
choose the regularisation on a held-out part of train, fit on all of train, score val once.

- ``ours``: ``probes.linear.run_protocol(x, y, xv, yv, LinearConfig(), seed=0)`` (the default solver:
  13-point C grid logspace(-3, 3) on a seeded 10% of train, refit, standardised features).
- ``ours-seq-tight``: the same protocol with the tight sequential sweep
  ``LinearConfig(sweep="sequential", sweep_tol=1e-5, patience=0)`` (the reference the fast sweep must
  match: same chosen C, top-1 within 0.3 pt).
- ``sklearn``: ``LinearConfig(solver="sklearn")``: the CLIP recipe (LogisticRegression, lbfgs,
  max_iter 1000, each C from scratch) through the same protocol, grid and holdout.
- ``clip_benchmark``: CLIP_benchmark 1.6.2's own linear probe (``clip_benchmark.metrics.linear_probe``):
  its ``evaluate`` flow replayed on our arrays with its own functions: a ``random_split`` of train
  (``--cb-val-proportion``, default 0.1 like ours), its FeatureDataset and DataLoaders (batch 64,
  shuffled), its ``find_peak`` weight-decay search (7-point init over logspace(-6, 2, 97), then a
  binary refinement), its ``train`` (nn.Linear, AdamW, lr 0.1, cosine, 10 epochs: the CLI's
  defaults) on train+val at the chosen weight decay, its ``infer`` and ``accuracy`` on val. It gets
  what its own Featurizer hands it (``normalize=True``): L2-normalised features. Off CUDA its
  hard-coded ``.cuda()`` calls are made no-ops for the call (nothing else is patched), and amp is
  off (its amp is CUDA fp16; on CPU autocast would be bfloat16, another numeric). Its ``accuracy``
  fails under numpy >= 2.4 (``float()`` of a 1-element array): a copy with a 0-d sum stands in for it.

Cases: ``real`` (ImageNet MobileNetV2 pooled features of Fashion-MNIST, 12,000 x 1280 train,
3,000 val, 10 classes; benchmarks/real_features.py, cached), ``real-lite0`` (EfficientNet-Lite0,
same images), ``synthetic`` (cached Gaussian classes, 10,000 x 1152, 1000 classes, 2,000 val),
``synthetic-a`` (50,000 x 768, 100 classes). Rounds are interleaved: each round runs every solver
once, in a round-robin order rotated by one each round; the table gives medians.

    .venv/bin/python benchmarks/linear_probe.py                          # real + synthetic, 3 rounds
    .venv/bin/python benchmarks/linear_probe.py --quick                  # a fifth of the rows, 1 round
    .venv/bin/python benchmarks/linear_probe.py --cases real,real-lite0 --solvers ours,clip_benchmark
    .venv/bin/python benchmarks/linear_probe.py --cases synthetic --passes   # where the time goes: passes per C
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # real_features, run as a script or imported

# synthetic: rows, dim, classes, spread of the class means (set so that top-1 lands mid-range, not at chance)
SYNTHETIC = {"synthetic": (10_000, 1152, 1000, 8.0), "synthetic-a": (50_000, 768, 100, 3.0)}
REAL = {"real": "mobilenet_v2", "real-lite0": "lite0"}
CASES = (*REAL, *SYNTHETIC)
SOLVERS = ("ours", "ours-seq-tight", "sklearn", "clip_benchmark")
DEFAULT_WORK = ".cache/bench-linear"


def features(root: Path, n: int, d: int, k: int, spread: float, seed: int = 0):
    """Cached train/val features: Gaussian classes whose means overlap (top-1 well below 100%)."""
    path = Path(root) / f"gauss-{n}x{d}-{k}-{spread:g}.npz"
    if not path.is_file():
        rng = np.random.default_rng(seed)
        means = rng.normal(size=(k, d)).astype(np.float32) * (spread / np.sqrt(d))
        y, yv = rng.integers(0, k, n), rng.integers(0, k, n // 5)
        x = means[y] + rng.normal(size=(n, d)).astype(np.float32)
        xv = means[yv] + rng.normal(size=(len(yv), d)).astype(np.float32)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=x, y=y, xv=xv, yv=yv)
    data = np.load(path)  # float32 (the class means used to be float64: ``spread / np.sqrt(d)`` promotes)
    return data["x"].astype(np.float32), data["y"], data["xv"].astype(np.float32), data["yv"]


def balanced_subset(y: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted row indices: a seeded ``fraction`` of each class (at least one row per class)."""
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(y == c))[:max(1, round(fraction * np.sum(y == c)))] for c in np.unique(y)]
    return np.sort(np.concatenate(keep))


def load_case(case: str, *, scale: float = 1.0, work: str | Path = DEFAULT_WORK, real_work: str | Path | None = None):
    """(x, y, xv, yv, n_classes) of a case; ``scale`` < 1 keeps a class-balanced fraction of the rows."""
    if case in REAL:
        from real_features import DEFAULT_WORK as REAL_WORK, real_features
        x, y, xv, yv = real_features(REAL[case], work=real_work or REAL_WORK, progress=True)
        if scale < 1:
            rows, vrows = balanced_subset(y, scale), balanced_subset(yv, scale)
            x, y, xv, yv = x[rows], y[rows], xv[vrows], yv[vrows]
    elif case in SYNTHETIC:
        n, d, k, spread = SYNTHETIC[case]
        x, y, xv, yv = features(Path(work), int(n * scale), d, k, spread)
    else:
        raise SystemExit(f"unknown case {case!r}; choose from {', '.join(CASES)}")
    return x.astype(np.float32, copy=False), y.astype(np.int64), xv.astype(np.float32, copy=False), yv.astype(np.int64), \
        int(max(y.max(), yv.max()) + 1)


# ---------------------------------------------------------------- encoder-probe (ours) and sklearn

def tight_sequential_config(**overrides):
    """The tight sequential reference: one C after the other, every C, each to 1e-5."""
    from probes.linear import LinearConfig
    return LinearConfig(sweep="sequential", sweep_tol=1e-5, patience=0, **overrides)


def run_ours(x, y, xv, yv, k, *, config=None, seed=0, device=None) -> dict:
    from probes.linear import LinearConfig, run_protocol
    result = run_protocol(x, y, xv, yv, config if config is not None else LinearConfig(), seed=seed, n_classes=k,
                          device=device)
    return {"top1": float(result["top1"]), "chosen": f"C={result['C']:.3g}"}


# ---------------------------------------------------------------- CLIP_benchmark's linear probe

@contextlib.contextmanager
def _cuda_calls_as_noops():
    """CLIP_benchmark's ``train`` calls ``model.cuda()`` and ``x.cuda()`` unconditionally; off CUDA they
    become identities for the duration of the call (restored after)."""
    import torch
    saved = torch.nn.Module.cuda, torch.Tensor.cuda
    torch.nn.Module.cuda = lambda self, *a, **kw: self
    torch.Tensor.cuda = lambda self, *a, **kw: self
    try:
        yield
    finally:
        torch.nn.Module.cuda, torch.Tensor.cuda = saved


def _accuracy_numpy2(output, target, topk=(1,)):
    """clip_benchmark.metrics.zeroshot_classification.accuracy with one change: its
    ``float(<1-element 1-d array>)`` is a TypeError since numpy 2.4, so the count is taken as a 0-d sum."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [float(correct[:k].reshape(-1).float().sum().cpu()) / n for k in topk]


@contextlib.contextmanager
def _numpy2_accuracy(cb_module):
    """Its find_peak calls the module-level ``accuracy``: the numpy-2 version for the duration of the call."""
    saved = cb_module.accuracy
    cb_module.accuracy = _accuracy_numpy2
    try:
        yield
    finally:
        cb_module.accuracy = saved


def clip_benchmark_probe(x, y, xv, yv, *, val_proportion: float = 0.1, batch_size: int = 64, lr: float = 0.1,
                         epochs: int = 10, amp: bool | None = None, num_workers: int = 0, seed: int = 0,
                         device: str | None = None, quiet: bool = True) -> dict:
    """CLIP_benchmark 1.6.2's linear probe (``metrics.linear_probe.evaluate`` with fewshot_k=-1 and a
    val_proportion split, as its CLI runs it) on feature arrays, through its own functions.

    Defaults are its CLI's (batch 64, lr 0.1, 10 epochs, seed 0; amp on CUDA only). Features are
    L2-normalised as its Featurizer (normalize=True) would hand them."""
    import warnings
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from clip_benchmark.metrics import linear_probe as cb
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    amp = (device == "cuda") if amp is None else amp
    torch.manual_seed(seed)  # cli.run: set seed, then random_split the train dataset
    n = len(x)
    split_train, split_val = torch.utils.data.random_split(range(n), [1 - val_proportion, val_proportion])
    rows, vrows = np.asarray(list(split_train), dtype=np.int64), np.asarray(list(split_val), dtype=np.int64)
    feats = F.normalize(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), dim=-1)  # Featurizer(normalize=True)
    test_feats = F.normalize(torch.from_numpy(np.ascontiguousarray(xv, dtype=np.float32)), dim=-1)
    y, yv = np.asarray(y, dtype=np.int64), np.asarray(yv, dtype=np.int64)
    features, targets = feats[rows], torch.from_numpy(y[rows])
    features_val, targets_val = feats[vrows], torch.from_numpy(y[vrows])
    targets_test = torch.from_numpy(yv)

    sink = io.StringIO() if quiet else None
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")  # pin_memory without an accelerator, autocast off CUDA
        if sink is not None:  # train() prints every 20 steps, infer() has a tqdm bar
            stack.enter_context(contextlib.redirect_stdout(sink))
            stack.enter_context(contextlib.redirect_stderr(sink))
        if device != "cuda":
            stack.enter_context(_cuda_calls_as_noops())
        stack.enter_context(_numpy2_accuracy(cb))
        accuracy = cb.accuracy
        # evaluate(): fewshot_k = -1 keeps every row, in a random permutation
        perm = torch.randperm(len(features))
        train_features, train_labels = features[perm], targets[perm]
        loader = lambda ds: DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=num_workers, pin_memory=True)
        feature_val_loader = loader(cb.FeatureDataset(features_val, targets_val))
        feature_train_val_loader = loader(cb.FeatureDataset(np.concatenate((train_features, features_val)),
                                                            np.concatenate((train_labels, targets_val))))
        feature_train_loader = loader(cb.FeatureDataset(train_features, train_labels))
        feature_test_loader = loader(cb.FeatureDataset(test_feats, targets_test))
        input_shape, output_shape = features[0].shape[0], targets.max().item() + 1
        wd_list = np.logspace(-6, 2, num=97).tolist()
        wd_list_init = np.logspace(-6, 2, num=7).tolist()
        wd_init_idx = [i for i, val in enumerate(wd_list) if val in wd_list_init]
        common = (feature_train_loader, feature_val_loader, input_shape, output_shape, lr, epochs, amp, device, False, seed)
        peak_idx = cb.find_peak(wd_list, wd_init_idx, *common)
        step_span = 8
        while step_span > 0:
            left, right = max(peak_idx - step_span, 0), min(peak_idx + step_span, len(wd_list) - 1)
            peak_idx = cb.find_peak(wd_list, [left, peak_idx, right], *common)
            step_span //= 2
        best_wd = wd_list[peak_idx]
        final_model = cb.train(feature_train_val_loader, input_shape, output_shape, best_wd, lr, epochs, amp, device, seed)
        logits, target = cb.infer(final_model, feature_test_loader, amp, device)
        acc1, = accuracy(logits.float(), target.float(), topk=(1,))
    return {"top1": float(acc1), "weight_decay": best_wd, "chosen": f"wd={best_wd:.3g}"}


def clip_benchmark_available() -> bool:
    try:
        import clip_benchmark.metrics.linear_probe  # noqa: F401
    except Exception:  # not installed (CI does not install the bench extras), or its imports fail
        return False
    return True


# ---------------------------------------------------------------- the side-by-side run

def solver_fn(name: str, *, cb_options: dict | None = None):
    """A callable (x, y, xv, yv, k) -> {"top1", "chosen"} for a solver name."""
    from probes.linear import LinearConfig
    if name == "ours":
        return lambda x, y, xv, yv, k: run_ours(x, y, xv, yv, k)
    if name == "ours-seq-tight":
        config = tight_sequential_config()
        return lambda x, y, xv, yv, k: run_ours(x, y, xv, yv, k, config=config)
    if name == "sklearn":
        return lambda x, y, xv, yv, k: run_ours(x, y, xv, yv, k, config=LinearConfig(solver="sklearn"))
    if name == "clip_benchmark":
        options = cb_options or {}
        return lambda x, y, xv, yv, k: clip_benchmark_probe(x, y, xv, yv, **options)
    raise SystemExit(f"unknown solver {name!r}; choose from {', '.join(SOLVERS)}")


def bench(data: dict, solvers: dict, rounds: int = 3, log=print) -> list[dict]:
    """Interleaved rounds: each round runs every solver on every case, the solver order rotated by one per
    round. Returns one row per (case, solver): per-round seconds and results, medians."""
    names = list(solvers)
    runs = {(case, s): [] for case in data for s in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for case, (x, y, xv, yv, k) in data.items():
            for s in order:
                start = time.perf_counter()
                out = solvers[s](x, y, xv, yv, k)
                seconds = time.perf_counter() - start
                runs[case, s].append({**out, "seconds": seconds})
                log(f"round {r + 1}/{rounds} {case} {s}: {seconds:.2f} s, top-1 {100 * out['top1']:.2f}, {out['chosen']}")
    rows = []
    for (case, s), results in runs.items():
        x, _, xv, _, k = data[case]
        chosen = sorted({res["chosen"] for res in results})
        rows.append({"case": case, "shape": f"{len(x)} x {x.shape[1]}, {k} classes, {len(xv)} val", "solver": s,
                     "seconds": statistics.median(res["seconds"] for res in results),
                     "rounds": [res["seconds"] for res in results],
                     "top1": statistics.median(res["top1"] for res in results), "chosen": " / ".join(chosen)})
    return rows


def table(rows: list[dict], reference: str = "ours") -> str:
    """One markdown table: ratio = solver seconds / ours seconds, diff = solver top-1 - ours (points)."""
    ref = {row["case"]: row for row in rows if row["solver"] == reference}
    lines = ["| case | solver | seconds (median) | rounds s | top-1 | chosen C / weight decay | ratio vs ours "
             "(peer s / ours s) | top-1 diff vs ours (pt) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        base = ref.get(row["case"])
        ratio = f"{row['seconds'] / base['seconds']:.2f}x" if base else "-"
        diff = f"{100 * (row['top1'] - base['top1']):+.2f}" if base else "-"
        lines.append(f"| {row['case']} ({row['shape']}) | {row['solver']} | {row['seconds']:.2f} | "
                     f"{', '.join(f'{s:.1f}' for s in row['rounds'])} | {100 * row['top1']:.2f} | {row['chosen']} | "
                     f"{ratio} | {diff} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- where the time goes (diagnostic)

def passes(x, y, k, Cs):
    """Per C of the sweep: sklearn's lbfgs iterations (from scratch) and the torch path's loss
    evaluations (warm start), with the cost of one pass over the data for each."""
    import torch
    from sklearn.linear_model import LogisticRegression as SkLogisticRegression
    from encoder_probe import logreg
    if not (hasattr(logreg, "fit_path") and hasattr(logreg, "_objective")):
        raise SystemExit("--passes counts logreg.fit_path's calls of logreg._objective; this logreg has no such pair")
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    sk_iters, start = [], time.perf_counter()
    for C in Cs:
        sk_iters.append(int(SkLogisticRegression(C=C, max_iter=1000).fit(x, y).n_iter_[0]))
    sk_s = time.perf_counter() - start
    evals, loss = [0], logreg._objective
    def counted(*args, **kwargs):
        evals[0] += 1
        return loss(*args, **kwargs)
    logreg._objective = counted
    try:
        start = time.perf_counter()
        models = logreg.fit_path(torch.from_numpy(x), torch.from_numpy(y), Cs, tol=1e-2, n_classes=k)
        torch_s = time.perf_counter() - start
    finally:
        logreg._objective = loss
    print(f"sklearn: {sk_s:.1f} s, iterations per C {sk_iters} (total {sum(sk_iters)}, {sk_s / sum(sk_iters):.3f} s each)")
    print(f"torch:   {torch_s:.1f} s, iterations per C {[getattr(m, 'n_iter_', '?') for m in models]}, {evals[0]} "
          f"loss+grad evaluations ({torch_s / max(evals[0], 1):.3f} s each)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="real,synthetic", help=f"comma-separated: {', '.join(CASES)}")
    parser.add_argument("--solvers", default=",".join(SOLVERS), help=f"comma-separated: {', '.join(SOLVERS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the rows (class-balanced)")
    parser.add_argument("--quick", action="store_true", help="smoke run: a fifth of the rows, 1 round")
    parser.add_argument("--threads", type=int, default=2, help="torch threads and sklearn's BLAS/OpenMP threads")
    parser.add_argument("--cb-val-proportion", type=float, default=0.1,
                        help="CLIP_benchmark's val_proportion (its random_split of train for the wd search)")
    parser.add_argument("--cb-workers", type=int, default=0,
                        help="CLIP_benchmark's DataLoader workers (its CLI default is 4: a process start per epoch)")
    parser.add_argument("--work", default=DEFAULT_WORK)
    parser.add_argument("--real-work", default=None, help="real_features.py's cache (default .cache/bench-real)")
    parser.add_argument("--passes", action="store_true", help="count passes per C on the sweep rows instead")
    args = parser.parse_args(argv)
    if args.quick:
        args.scale, args.rounds = min(args.scale, 0.2), 1
    import torch
    from threadpoolctl import threadpool_limits
    torch.set_num_threads(args.threads)
    cases = args.cases.split(",")
    with threadpool_limits(args.threads):
        data = {case: load_case(case, scale=args.scale, work=args.work, real_work=args.real_work) for case in cases}
        if args.passes:
            from probes.linear import LinearConfig
            for case, (x, y, _, _, k) in data.items():
                rows = int(0.9 * len(x))  # the sweep's share of train
                print(f"case {case}: {rows} x {x.shape[1]}, {k} classes")
                passes(x[:rows], y[:rows], k, LinearConfig().Cs)
            return
        names = args.solvers.split(",")
        if "clip_benchmark" in names and not clip_benchmark_available():
            print("clip_benchmark is not importable (make bench-install): its column is left out", file=sys.stderr)
            names.remove("clip_benchmark")
        solvers = {}
        for name in names:
            try:
                solvers[name] = solver_fn(name, cb_options={"val_proportion": args.cb_val_proportion,
                                                            "num_workers": args.cb_workers})
            except RuntimeError as e:
                print(f"{name} left out: {e}", file=sys.stderr)
        rows = bench(data, solvers, rounds=args.rounds, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"torch {torch.__version__}, {args.threads} threads (torch and sklearn's BLAS), {args.rounds} interleaved "
          f"round(s), scale {args.scale:g}")
    print(table(rows))


if __name__ == "__main__":
    main()
