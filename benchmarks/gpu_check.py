"""GPU figures of issue 20 in one short run: extraction at the bf16 forward, and the linear probe at ImageNet size.

(a) Extraction: ViT-B/16 (timm vit_base_patch16_224, random init: speed does not depend on the
    weights) at batch 256 under bf16 autocast, JPEGs decoded on the device
    (``extract(..., device=DEV, autocast="bf16", decode="device")``), against the model's raw
    forward (``forward_tokens`` + ``pool`` under the same autocast) on pre-made tensors already on
    the device, measured before and after the extraction and averaged. The JPEGs are 500x375
    ImageNet-like images made by benchmarks/extraction.py's ``make_dataset``. A first extraction
    warms up (CUDA context, kernels, nvjpeg, the file-hash memo); the timed one rebuilds the same
    cache entry from scratch (the entry is deleted, the memo kept; the weight fingerprint is
    computed before timing). Target: >= 0.9 of the raw forward.
(b) Linear probe: synthetic Gaussian classes at ImageNet-1k size (1.28M x 1152 float32 train,
    50k val, 1000 classes; generated on the device, handed over as numpy arrays like cached
    features), ``run_protocol(x, y, xv, yv, LinearConfig(), seed=0, n_classes=1000, device=DEV)``:
    the whole protocol (C sweep on a held-out 10% of train, refit, val scored once), wall time.
    Target: <= 180 s on one H200.

    benchmarks/gpu_check.sh                                   # on a lent GPU machine (< 5 minutes)
    .venv/bin/python benchmarks/gpu_check.py --device cpu --model timm:vit_tiny_patch16_224 \\
        --images 8 --batch 4 --rows 2000 --dim 32 --classes 10 --val-rows 200   # CPU smoke, same code path

Prints one markdown table (rows stream out as they finish, so a run stopped by its timeout still
shows what it measured); with ``--out FILE`` the table is written there too.
"""
from __future__ import annotations

import argparse
import inspect
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # extraction.make_dataset

EXTRACT_ARGS = ("device", "autocast", "decode")
HEADER = "| figure | ours | reference | ratio | target | notes |\n| --- | --- | --- | --- | --- | --- |"


def require_extract_args():
    """extract() must take device=, autocast= and decode= (the GPU path of issue 20)."""
    from encoder_probe.features import extract
    missing = [a for a in EXTRACT_ARGS if a not in inspect.signature(extract).parameters]
    if missing:
        raise SystemExit(f"encoder_probe.features.extract has no {', '.join(missing)} argument: the GPU extraction "
                         f"path (bf16 autocast, device decode) is not in this tree; signature is "
                         f"{inspect.signature(extract)}")


def _sync(device):
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _autocast(device, autocast):
    import contextlib
    import torch
    if autocast is None:
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}[autocast]
    return torch.autocast(torch.device(device).type, dtype=dtype)


def raw_forward(encoder, batch: int, images: int, device, autocast="bf16") -> float:
    """images/s of forward_tokens + pool under ``autocast`` on a pre-made batch already on ``device``."""
    import torch
    pixels = torch.randn(batch, 3, *encoder.preprocess.size, device=device)
    steps = max(1, images // batch)
    with torch.inference_mode(), _autocast(device, autocast):
        for _ in range(2):  # warm-up (kernel selection)
            encoder.pool(encoder.forward_tokens(pixels), "mean").float()
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            pooled = encoder.pool(encoder.forward_tokens(pixels), "mean").float()
        _sync(device)
        seconds = time.perf_counter() - start
    del pooled
    return steps * batch / seconds


def extraction_check(model: str = "timm:vit_base_patch16_224", *, images: int = 8192, batch: int = 256,
                     device: str = "cuda", autocast: str = "bf16", decode: str = "device", workers: int | None = None,
                     work: str | Path = ".cache/gpu-check") -> dict:
    """End-to-end extract() images/s (device decode, autocast) against the raw forward on device tensors."""
    require_extract_args()
    from extraction import make_dataset
    from encoder_probe import load_encoder
    from encoder_probe.data import ImageFolder
    from encoder_probe.features import extract
    work = Path(work)
    root = make_dataset(work / f"jpegs-{images}", images)
    encoder = load_encoder(model)
    encoder.fingerprint  # of the weights as loaded (cached on the encoder): not part of the timing
    encoder.to(device=device)
    raw_images = max(4 * batch, min(images, 16 * batch))
    raw_before = raw_forward(encoder, batch, raw_images, device, autocast)
    out = work / "runs"
    shutil.rmtree(out, ignore_errors=True)
    options = dict(out=out, batch_size=batch, device=device, autocast=autocast, decode=decode, num_workers=workers,
                   progress=False)
    warm = extract(encoder, ImageFolder(root, "train"), **options)  # warm-up; hashes the files into the memo
    shutil.rmtree(warm.path)
    _sync(device)
    start = time.perf_counter()
    found = extract(encoder, ImageFolder(root, "train"), **options)
    _sync(device)
    seconds = time.perf_counter() - start
    raw_after = raw_forward(encoder, batch, raw_images, device, autocast)
    n = len(found)
    pooled = found.pooled("mean")
    if not np.isfinite(pooled).all():
        raise SystemExit(f"extract({model}, autocast={autocast}, decode={decode}) wrote non-finite features")
    ours, raw = n / seconds, (raw_before + raw_after) / 2
    return {"images": n, "seconds": seconds, "ours": ours, "raw": raw, "raw_before": raw_before,
            "raw_after": raw_after, "ratio": ours / raw, "dim": pooled.shape[1]}


def synthetic_features(n: int, d: int, k: int, n_val: int, *, spread: float = 5.0, device: str = "cuda",
                       seed: int = 0, chunk: int = 131072):
    """(x, y, xv, yv) numpy float32 / int64: Gaussian classes (means of norm ``spread``, unit noise),
    generated on ``device`` in chunks and copied to host arrays, as cached features would arrive."""
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    means = torch.randn(k, d, device=device, generator=g) * (spread / np.sqrt(d))

    def rows(m):
        x, y = np.empty((m, d), dtype=np.float32), np.empty(m, dtype=np.int64)
        for lo in range(0, m, chunk):
            hi = min(m, lo + chunk)
            labels = torch.randint(0, k, (hi - lo,), device=device, generator=g)
            x[lo:hi] = (means[labels] + torch.randn(hi - lo, d, device=device, generator=g)).cpu().numpy()
            y[lo:hi] = labels.cpu().numpy()
        return x, y
    x, y = rows(n)
    xv, yv = rows(n_val)
    return x, y, xv, yv


def probe_check(rows: int = 1_281_167, dim: int = 1152, classes: int = 1000, val_rows: int = 50_000, *,
                device: str = "cuda", spread: float = 5.0, config=None) -> dict:
    """Wall time of run_protocol's whole protocol (sweep + refit + val) on ``device``."""
    import torch
    from probes.linear import LinearConfig, run_protocol
    start = time.perf_counter()
    x, y, xv, yv = synthetic_features(rows, dim, classes, val_rows, spread=spread, device=device)
    made = time.perf_counter() - start
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    config = config if config is not None else LinearConfig()
    _sync(device)
    start = time.perf_counter()
    result = run_protocol(x, y, xv, yv, config, seed=0, n_classes=classes, device=device)
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return {"seconds": seconds, "top1": float(result["top1"]), "C": result["C"], "generate_s": made,
            "peak_gib": peak, "features_gib": x.nbytes / 2**30, "sweep_points": len(result.get("sweep") or [])}


def extraction_row(model, batch, autocast, decode, r) -> str:
    return (f"| extract() images/s, {model}, batch {batch}, autocast {autocast}, decode {decode}, {r['images']} JPEGs "
            f"500x375 | {r['ours']:.0f} | raw forward {r['raw']:.0f} (before {r['raw_before']:.0f}, after "
            f"{r['raw_after']:.0f}) | {r['ratio']:.2f} | >= 0.9 | {r['seconds']:.1f} s timed run, {r['dim']}-d mean pool |")


def probe_row(rows, dim, classes, val_rows, r) -> str:
    return (f"| linear probe sweep + refit s, {rows} x {dim} float32, {classes} classes, {val_rows} val | "
            f"{r['seconds']:.1f} | - | - | <= 180 s | top-1 {100 * r['top1']:.2f}, C {r['C']:.3g}, "
            f"{r['sweep_points']} sweep points, features {r['features_gib']:.1f} GiB, peak GPU memory "
            f"{r['peak_gib']:.1f} GiB (features generated in {r['generate_s']:.1f} s, untimed) |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--parts", default="extract,probe", help="comma-separated: extract, probe")
    parser.add_argument("--model", default="timm:vit_base_patch16_224")
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--autocast", default="bf16")
    parser.add_argument("--decode", default="device")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: extract's own)")
    parser.add_argument("--rows", type=int, default=1_281_167, help="probe train rows (ImageNet-1k: 1,281,167)")
    parser.add_argument("--dim", type=int, default=1152)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--val-rows", type=int, default=50_000)
    parser.add_argument("--spread", type=float, default=5.0, help="norm of the class means (noise has unit variance)")
    parser.add_argument("--work", default=".cache/gpu-check")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    import torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device (torch.cuda.is_available() is False)")
    parts = args.parts.split(",")
    if "extract" in parts:
        require_extract_args()  # fail before any work
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {os.cpu_count()} cores"
    lines = [f"device {args.device} ({where}), torch {torch.__version__}", HEADER]
    print("\n".join(lines), flush=True)

    def emit(line):
        lines.append(line)
        print(line, flush=True)
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")
    if "extract" in parts:
        r = extraction_check(args.model, images=args.images, batch=args.batch, device=args.device,
                             autocast=args.autocast, decode=args.decode, workers=args.workers, work=args.work)
        emit(extraction_row(args.model, args.batch, args.autocast, args.decode, r))
    if "probe" in parts:
        r = probe_check(args.rows, args.dim, args.classes, args.val_rows, device=args.device, spread=args.spread)
        emit(probe_row(args.rows, args.dim, args.classes, args.val_rows, r))
    return lines


if __name__ == "__main__":
    main()
