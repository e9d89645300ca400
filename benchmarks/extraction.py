"""Extraction throughput, warm-cache speed-up and peak memory against dataset size.

Three figures, all with the same model, batch size and dtype:

1. End-to-end ``extract()`` images/s (JPEG decode, the encoder's resize + crop, DataLoader
   workers, forward, pooling, chunk writes, merge) over the raw forward images/s on
   pre-made tensors (forward_tokens + pool only): the peer is the model itself.
2. A warm rerun (a freshly loaded encoder, so the weight fingerprint is recomputed; the files
   are only stat-ed) over the cold run. The same two runs through the ``probe extract`` CLI are
   printed too: there the interpreter's imports dominate the warm run.
3. Peak RSS (VmHWM of a fresh process, patch tokens kept) at --n vs --n-large images.

The images are ImageNet-like: 500x375 JPEGs (procedural demo scenes scaled up).

    .venv/bin/python benchmarks/extraction.py            # ViT-S/16, batch 64, 1k vs 10k images
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _write_image(job):
    from PIL import Image
    from encoder_probe.data.demo import DEMO_CLASSES, render_scene
    root, index = job
    image, _, meta = render_scene(seed=7, split_id=0, index=index, size=128)
    path = Path(root) / "train" / meta["class"] / f"{index:06d}.jpg"
    image.resize((500, 375), Image.BILINEAR).save(path, quality=90)
    assert meta["class"] in DEMO_CLASSES


def make_dataset(root: Path, n: int) -> Path:
    """An ImageNet-layout tree of ``n`` JPEGs (built once, reused)."""
    from encoder_probe.data.demo import DEMO_CLASSES
    if (root / "done").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for name in DEMO_CLASSES:
        (root / "train" / name).mkdir(parents=True)
    with Pool(os.cpu_count()) as pool:
        pool.map(_write_image, [(str(root), i) for i in range(n)], chunksize=64)
    (root / "done").write_text(str(n))
    return root


def raw_forward(spec: str, batch: int, dtype: str, images: int) -> float:
    """images/s of forward_tokens + pool on pre-made tensors: the ceiling extraction can reach."""
    import torch
    from encoder_probe import load_encoder
    encoder = load_encoder(spec, dtype=dtype)
    pixels = torch.randn(batch, 3, *encoder.preprocess.size).to(encoder.dtype)
    with torch.inference_mode():
        encoder.pool(encoder.forward_tokens(pixels), "mean")  # warm-up
        steps = max(1, images // batch)
        start = time.perf_counter()
        for _ in range(steps):
            encoder.pool(encoder.forward_tokens(pixels), "mean").float().cpu()
        return steps * batch / (time.perf_counter() - start)


def timed_extract(spec, root, out, batch, dtype, workers) -> tuple[float, int]:
    from encoder_probe import load_encoder
    from encoder_probe.data import ImageFolder
    from encoder_probe.features import extract
    encoder = load_encoder(spec, dtype=dtype)
    dataset = ImageFolder(root, "train")
    start = time.perf_counter()
    features = extract(encoder, dataset, out=out, batch_size=batch, num_workers=workers, progress=False)
    return time.perf_counter() - start, len(features)


def cli_extract(spec, root, out, batch, dtype, workers) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "encoder_probe", "extract", "--encoder", spec, "--data",
                    f"imagenet={root}", "--split", "train", "--out", str(out), "--batch-size", str(batch),
                    "--dtype", dtype, "--workers", str(workers)], check=True, capture_output=True)
    return time.perf_counter() - start


PEAK = """
import json, sys
from encoder_probe import load_encoder
from encoder_probe.data import ImageFolder
from encoder_probe.features import extract
spec, root, out, batch, dtype, workers = sys.argv[1:]
f = extract(load_encoder(spec, dtype=dtype), ImageFolder(root, "train"), out=out, batch_size=int(batch),
            tokens=True, num_workers=int(workers), progress=False)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"n": len(f), "vmhwm_mib": int(status["VmHWM"].split()[0]) / 1024,
                  "tokens_mib": f.tokens().nbytes / 2**20}))
"""


def peak_rss(spec, root, out, batch, dtype, workers) -> dict:
    result = subprocess.run([sys.executable, "-c", PEAK, spec, str(root), str(out), str(batch), dtype, str(workers)],
                            check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="timm:vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: extract's own)")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--n-large", type=int, default=10000)
    parser.add_argument("--work", default=".cache/bench-extraction")
    args = parser.parse_args()
    work = Path(args.work)
    from encoder_probe.features import default_workers
    workers = args.workers if args.workers is not None else default_workers()
    small = make_dataset(work / f"data-{args.n}", args.n)
    large = make_dataset(work / f"data-{args.n_large}", args.n_large)
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    common = (args.batch, args.dtype, workers)

    raw_images = max(args.batch * 4, 512)
    raw_before = raw_forward(args.model, args.batch, args.dtype, raw_images)
    cold_s, n = timed_extract(args.model, small, runs / "api", *common)
    raw = (raw_before + raw_forward(args.model, args.batch, args.dtype, raw_images)) / 2  # either side: drift
    warm_s, _ = timed_extract(args.model, small, runs / "api", *common)
    cli_cold = cli_extract(args.model, small, runs / "cli", *common)
    cli_warm = cli_extract(args.model, small, runs / "cli", *common)
    peaks = [peak_rss(args.model, root, runs / f"rss-{root.name}", *common) for root in (small, large)]

    rows = [
        ("end-to-end extract images/s", f"{n / cold_s:.1f}", f"raw forward {raw:.1f}", f"{n / cold_s / raw:.2f}", ">= 0.9"),
        ("warm rerun s (extract())", f"{warm_s:.3f}", f"cold {cold_s:.1f}", f"{cold_s / warm_s:.0f}x", ">= 20x"),
        ("warm rerun s (probe extract CLI)", f"{cli_warm:.1f}", f"cold {cli_cold:.1f}", f"{cli_cold / cli_warm:.1f}x", "-"),
        (f"peak RSS MiB at {peaks[1]['n']} images", f"{peaks[1]['vmhwm_mib']:.0f}",
         f"at {peaks[0]['n']}: {peaks[0]['vmhwm_mib']:.0f}", f"{peaks[1]['vmhwm_mib'] / peaks[0]['vmhwm_mib']:.2f}",
         f"flat (tokens on disk: {peaks[0]['tokens_mib']:.0f} vs {peaks[1]['tokens_mib']:.0f} MiB)"),
    ]
    print(f"model {args.model}, batch {args.batch}, {args.dtype}, {workers} DataLoader workers, "
          f"{os.cpu_count()} cores")
    print("| figure | ours | peer | ratio | target |\n| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
