"""Real cached features for the linear-probe benchmark: built-in ImageNet encoders on Fashion-MNIST.

The toolkit's own ``extract()`` writes them to the feature cache (``--work``, default
``.cache/bench-real``); it is cached and resumable, so a killed run picks up its finished chunks
and a finished one only stats the files. Fashion-MNIST is Debian's dataset-fashion-mnist
(/usr/share/datasets/fashion-mnist); a class-balanced seeded subsample of it (``per_class``).

    .venv/bin/python benchmarks/real_features.py                       # mobilenet_v2, 12,000 train / 3,000 val
    .venv/bin/python benchmarks/real_features.py --encoder lite0       # timm tf_efficientnet_lite0 too
    nohup .venv/bin/python benchmarks/real_features.py > /tmp/realfeat.log 2>&1 &   # start it early

Extraction takes several minutes on 2 CPU cores (224 px, batch 64).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

# short name -> encoder spec (both ship with the toolkit's offline assets)
ENCODERS = {"mobilenet_v2": "torchvision:mobilenet_v2@imagenet",
            "lite0": "timm:tf_efficientnet_lite0@imagenet"}
TRAIN_PER_CLASS, VAL_PER_CLASS = 1200, 300  # 12,000 train, 3,000 val (10 classes)
DEFAULT_WORK = ".cache/bench-real"


def real_features(encoder: str = "mobilenet_v2", *, train_per_class: int = TRAIN_PER_CLASS,
                  val_per_class: int = VAL_PER_CLASS, work: str | Path = DEFAULT_WORK, dataset: str = "fashion-mnist",
                  batch_size: int = 64, progress: bool = True):
    """(x, y, xv, yv): pooled (mean) float32 features and int64 labels of train and val, from the cache.

    encoder: a key of ENCODERS or any spec ``load_encoder`` takes."""
    from encoder_probe.data import open_dataset
    from encoder_probe.features import extract
    spec = ENCODERS.get(encoder, encoder)
    arrays = []
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        data = open_dataset(dataset, split=split, per_class=per_class)
        found = extract(spec, data, out=Path(work), pool="mean", batch_size=batch_size, progress=progress)
        arrays += [np.ascontiguousarray(found.pooled("mean"), dtype=np.float32),
                   np.asarray(found.labels, dtype=np.int64)]
    return tuple(arrays)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="mobilenet_v2", help=f"{', '.join(ENCODERS)}, 'all', or a spec")
    parser.add_argument("--train-per-class", type=int, default=TRAIN_PER_CLASS)
    parser.add_argument("--val-per-class", type=int, default=VAL_PER_CLASS)
    parser.add_argument("--work", default=DEFAULT_WORK)
    args = parser.parse_args()
    import torch
    torch.set_num_threads(2)
    for name in (ENCODERS if args.encoder == "all" else [args.encoder]):
        start = time.perf_counter()
        x, y, xv, yv = real_features(name, train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                                     work=args.work)
        print(f"{name}: train {x.shape} val {xv.shape}, classes {len(np.unique(y))}, "
              f"{time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
