"""Permutation null of the align probe: prepared state re-indexed vs the metric recomputed per shuffle.

    .venv/bin/python benchmarks/alignment.py            # --n 1000 2000 --dx 768 --dy 1152 --repeats 100

The peer is the plain way to build a null: call the metric on (x, y[perm]) for every shuffle, i.e.
recompute neighbour lists / Gram matrices from the features each time. Ours prepares each side
once and only re-indexes the prepared state. Both get the same permutations; the table checks
that their null values agree and prints seconds and the ratio for each metric.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from encoder_probe.alignment import LinearCKA, MutualKNN, permutation_null


def features(n: int, dx: int, dy: int, seed: int = 0):
    """Two related representations: y is a random linear map of x plus noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dx)).astype(np.float32)
    y = (x @ rng.normal(size=(dx, dy)) / np.sqrt(dx) + rng.normal(size=(n, dy))).astype(np.float32)
    return x, y


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--dx", type=int, default=768)
    parser.add_argument("--dy", type=int, default=1152)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    print("| images | metric | ours s | recompute s | speed-up | max abs diff of null values | z |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in args.n:
        x, y = features(n, args.dx, args.dy)
        for metric in (MutualKNN(10, args.device), LinearCKA(False, args.device), LinearCKA(True, args.device)):
            ours, t_ours = timed(lambda: permutation_null(metric, x, y, args.repeats, seed=0))
            peer, t_peer = timed(lambda: permutation_null(lambda a, b: metric(a, b), x, y, args.repeats, seed=0))
            diff = float(np.abs(ours.values - peer.values).max())
            print(f"| {n} | {metric.name} | {t_ours:.2f} | {t_peer:.2f} | {t_peer / t_ours:.1f}x | {diff:.1e} "
                  f"| {ours.z:.1f} |", flush=True)


if __name__ == "__main__":
    main()
