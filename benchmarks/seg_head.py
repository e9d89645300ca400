"""Segmentation-head training throughput: patch tokens from the cache vs re-encoding every epoch.

The same head training (`probes.seg.train_heads`: one pixel head with bilinear upsampling + CE
and one patch head, same batches, same epochs) is fed two ways:

- cached: float16 patch tokens read from the extraction cache (what `seg` does);
- re-encode: every batch decodes the images and runs the frozen encoder again (what a head
  trainer without a feature cache does each epoch).

Figures: patch tokens per second through the head (B x h*w per step) and peak RSS (VmHWM of a
fresh process per mode), on the demo ADE20K scenes. The one-off extraction is timed separately.

    .venv/bin/python benchmarks/seg_head.py                         # ViT-S/16 at 224, 2 epochs
    .venv/bin/python benchmarks/seg_head.py --encoder torchvision:mobilenet_v2@imagenet
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ReencodedTokens:
    """The same interface as probes.seg.CachedTokens, but every batch runs the encoder again."""

    def __init__(self, encoder, dataset, layers, device):
        self.encoder, self.dataset, self.layers, self.device = encoder, dataset.with_transform(encoder.preprocess), \
            layers, device
        first = self.dataset[0]
        with torch.inference_mode():
            tokens = encoder.forward_tokens(first["pixels"][None], layers)
        self.grid, self.dim = tokens[0].grid, sum(t.patches.shape[2] for t in tokens)

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, rows):
        items = [self.dataset[int(i)] for i in np.sort(rows)]
        pixels = torch.stack([item["pixels"] for item in items])
        with torch.inference_mode():
            tokens = self.encoder.forward_tokens(pixels, self.layers)
        x = torch.cat([t.patches.float() for t in tokens], dim=2).to(self.device).clone()
        return x, torch.stack([item["mask"] for item in items]).to(self.device).long()


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def one_mode(args) -> dict:
    from encoder_probe import load_encoder
    from encoder_probe.data import open_dataset
    from encoder_probe.features import extract
    from probes.seg import CachedTokens, SegConfig, train_heads
    torch.set_num_threads(os.cpu_count())
    encoder = load_encoder(args.encoder)
    dataset = open_dataset("ade20k", None, "train")
    config = SegConfig(epochs=args.epochs, head_batch=args.batch, lrs=[1e-2])
    device = torch.device(args.device)
    if args.mode == "cached":
        features = extract(encoder, dataset, out=args.cache, pool="mean", tokens=True, progress=False)
        source = CachedTokens(features, features.layers, device)
    else:
        source = ReencodedTokens(encoder, dataset, [encoder.layer], device)
    num_classes = dataset.num_classes
    start = time.perf_counter()
    train_heads(source, np.arange(len(source)), config.lrs, config, num_classes, seed=0, desc=args.mode)
    seconds = time.perf_counter() - start
    tokens = args.epochs * len(source) * source.grid[0] * source.grid[1]
    return {"mode": args.mode, "seconds": seconds, "tokens_per_s": tokens / seconds, "peak_rss_mb": peak_rss_mb(),
            "grid": list(source.grid), "dim": source.dim, "images": len(source)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="timm:vit_small_patch16_224")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", default=".cache/bench-seg")
    parser.add_argument("--mode", choices=["cached", "reencode"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(one_mode(args)))
        return
    from encoder_probe import load_encoder
    from encoder_probe.data import open_dataset
    from encoder_probe.features import extract
    start = time.perf_counter()  # the one-off extraction, so the cached mode's process only reads
    extract(load_encoder(args.encoder), open_dataset("ade20k", None, "train"), out=args.cache, pool="mean",
            tokens=True, progress=True)
    extraction = time.perf_counter() - start
    rows = {}
    for mode in ("cached", "reencode"):
        cmd = [sys.executable, __file__, "--mode", mode, "--encoder", args.encoder, "--epochs", str(args.epochs),
               "--batch", str(args.batch), "--device", args.device, "--cache", args.cache]
        rows[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    cached, again = rows["cached"], rows["reencode"]
    print(f"{args.encoder}: {cached['images']} demo ADE20K train images, grid {cached['grid']}, dim {cached['dim']}, "
          f"{args.epochs} epochs, batch {args.batch}, {args.device}; one-off extraction {extraction:.1f} s")
    print(f"{'mode':10} {'tokens/s':>10} {'seconds':>8} {'peak RSS MB':>12}")
    for row in (cached, again):
        print(f"{row['mode']:10} {row['tokens_per_s']:10.0f} {row['seconds']:8.1f} {row['peak_rss_mb']:12.0f}")
    print(f"cached / re-encode: {cached['tokens_per_s'] / again['tokens_per_s']:.1f}x tokens/s, "
          f"peak RSS {cached['peak_rss_mb'] / again['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
