"""Extraction throughput, warm-cache speed-up and peak memory against dataset size.

Three figures, all with the same model, batch size and dtype:

1. End-to-end ``extract()`` images/s (JPEG decode, the encoder's resize + crop, DataLoader
   workers, forward, pooling, chunk writes, merge) over the raw forward images/s on
   pre-made tensors (forward_tokens + pool only): the peer is the model itself.
2. A warm rerun (a freshly loaded encoder, so the weight fingerprint is recomputed; the files
   are only stat-ed) over the cold run. The same two runs through the ``probe extract`` CLI are
   printed too: there the interpreter's imports dominate the warm run.
3. Peak RSS (VmHWM of a fresh process, patch tokens kept) at --n vs --n-large images.
4. Against the peer: thingsvision 2.7.3 and ours on the same model (--peer-model), the same --peer-n
   JPEGs, batch 64, 3 interleaved rounds of fresh processes (each times its extraction only), medians;
   features compared (max abs diff of the mean-pooled final map). thingsvision imports tensorflow,
   requests and h5py at top level and uses numpy 1's ``np.AxisError``: its process gets stub modules
   for the three (nothing of theirs runs on this path) and ``np.AxisError = np.exceptions.AxisError``.
5. A small model (--small-model) end-to-end over its raw forward, same rounds.
6. The allocator: minor page faults, user and system seconds per image (RUSAGE_SELF + CHILDREN, so
   loader workers count) of ours with ``keep_freed_memory`` and with ``ENCODER_PROBE_MALLOC=0``.

The images are ImageNet-like: 500x375 JPEGs (procedural demo scenes scaled up).

    .venv/bin/python benchmarks/extraction.py            # ViT-S/16, batch 64, 1k vs 10k images + peers
    .venv/bin/python benchmarks/extraction.py --quick    # small sizes, one round: a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

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
                    "--dtype", dtype, *(["--workers", str(workers)] if workers is not None else [])],
                   check=True, capture_output=True)
    return time.perf_counter() - start


PEAK = """
import json, sys
from encoder_probe import load_encoder
from encoder_probe.data import ImageFolder
from encoder_probe.features import extract
spec, root, out, batch, dtype, workers = sys.argv[1:]
f = extract(load_encoder(spec, dtype=dtype), ImageFolder(root, "train"), out=out, batch_size=int(batch),
            tokens=True, num_workers=None if workers == "None" else int(workers), progress=False)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"n": len(f), "vmhwm_mib": int(status["VmHWM"].split()[0]) / 1024,
                  "tokens_mib": f.tokens().nbytes / 2**20}))
"""


def peak_rss(spec, root, out, batch, dtype, workers) -> dict:
    result = subprocess.run([sys.executable, "-c", PEAK, spec, str(root), str(out), str(batch), dtype, str(workers)],
                            check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- jobs in fresh processes: one extraction each, timed inside, resources counted -----------------------
def stub_thingsvision_imports() -> None:
    """thingsvision 2.7.3 imports tensorflow, requests and h5py at top level (none is used by its
    PyTorch extractor) and numpy 1's np.AxisError: stub modules and the alias let it import."""
    import importlib.machinery
    import types

    import numpy as np

    class Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})

    for name in ("tensorflow", "tensorflow.keras", "tensorflow.keras.applications", "tensorflow.keras.layers",
                 "requests", "h5py"):
        module = sys.modules.setdefault(name, Stub(name))
        module.__path__, module.__spec__ = [], importlib.machinery.ModuleSpec(name, None, is_package=True)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
    sys.modules["tensorflow"].config = types.SimpleNamespace(list_physical_devices=lambda kind: [])
    np.AxisError = np.exceptions.AxisError


def _usage() -> dict:
    self, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"minflt": self.ru_minflt + children.ru_minflt, "user": self.ru_utime + children.ru_utime,
            "sys": self.ru_stime + children.ru_stime, "wall": time.perf_counter()}


def job_ours(spec, root, batch, out):
    from encoder_probe import load_encoder
    from encoder_probe.data import ImageFolder
    from encoder_probe.features import extract
    encoder = load_encoder(spec)
    f = extract(encoder, ImageFolder(root, "train"), out=out, batch_size=batch, progress=False)
    return np.asarray(f.pooled("mean"))


def job_thingsvision(spec, root, batch, out):
    stub_thingsvision_imports()
    import torch
    from thingsvision import get_extractor_from_model
    from thingsvision.utils.data import DataLoader, ImageDataset
    from encoder_probe import load_encoder
    encoder = load_encoder(spec)  # the same torchvision module and preprocessing object
    transform = encoder.preprocess.transform
    extractor = get_extractor_from_model(model=encoder.module, device="cpu", backend="pt", preprocess=transform)
    dataset = ImageDataset(root=str(Path(root) / "train"), out_path=str(out), backend="pt", transforms=transform)
    maps = extractor.extract_features(batches=DataLoader(dataset=dataset, batch_size=batch, backend="pt"),
                                      module_name="features", flatten_acts=False, output_type="ndarray")
    return torch.from_numpy(maps).flatten(2).mean(2).numpy()  # our "mean" pooling of the final map


def job_raw(spec, root, batch, out):
    """forward_tokens + pool on pre-made tensors of as many images (the allocator set as extract sets it)."""
    import torch
    from encoder_probe import load_encoder
    from encoder_probe.runtime import keep_freed_memory
    keep_freed_memory()
    encoder = load_encoder(spec)
    n = sum(1 for _ in Path(root).rglob("*.jpg"))
    pixels = torch.randn(batch, 3, *encoder.preprocess.size)
    with torch.inference_mode():
        for start in range(0, n, batch):
            encoder.pool(encoder.forward_tokens(pixels[:min(batch, n - start)]), "mean").float().cpu()
    return np.zeros((n, 1), np.float32)


JOBS = {"ours": job_ours, "thingsvision": job_thingsvision, "raw": job_raw}


def run_job(kind, spec, root, batch, out, **env) -> dict:
    """One job in a fresh process: {"n", "seconds", "minflt", "user", "sys"} and its features in out.npy."""
    cmd = [sys.executable, __file__, "--job", kind, "--model", spec, "--job-root", str(root), "--batch", str(batch),
           "--work", str(out)]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    result = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**environ, **env})
    return json.loads(result.stdout.strip().splitlines()[-1])


def _job_main(args) -> None:
    import torch  # noqa: F401  (imported before the clock in every job)
    before = _usage()
    features = JOBS[args.job](args.model, args.job_root, args.batch, Path(args.work))
    after = _usage()
    np.save(Path(args.work) / "features.npy", features)
    n = len(features)
    print(json.dumps({"n": n, "seconds": after["wall"] - before["wall"],
                      **{k: (after[k] - before[k]) / n for k in ("minflt", "user", "sys")}}))


def rounds(jobs: dict, rounds_n: int, work: Path) -> dict:
    """{name: [result per round]}: every job once per round, interleaved, each in a fresh process."""
    out = {name: [] for name in jobs}
    for r in range(rounds_n):
        for name, (kind, spec, root, batch, env) in jobs.items():
            where = work / f"{name}-{r}"
            shutil.rmtree(where, ignore_errors=True)
            where.mkdir(parents=True)
            out[name].append({**run_job(kind, spec, root, batch, where, **env), "dir": str(where)})
    return out


def median(results: list, what: str = "rate") -> float:
    return statistics.median(r["n"] / r["seconds"] if what == "rate" else r[what] for r in results)


def peer_rows(args, work: Path) -> list:
    root = make_dataset(work / f"data-{args.peer_n}", args.peer_n)
    off = {"ENCODER_PROBE_MALLOC": "0"}
    peer, small = (args.peer_model, root, 64), (args.small_model, root, 64)  # batch 64, as the figures
    jobs = {"ours": ("ours", *peer, {}), "thingsvision": ("thingsvision", *peer, {}), "raw": ("raw", *peer, {}),
            "ours-malloc-off": ("ours", *peer, off), "small": ("ours", *small, {}), "small-raw": ("raw", *small, {})}
    seen = rounds(jobs, args.rounds, work / "peer-runs")
    ours_f = np.load(Path(seen["ours"][0]["dir"]) / "features.npy")
    peer_f = np.load(Path(seen["thingsvision"][0]["dir"]) / "features.npy")
    diff = float(np.abs(ours_f - peer_f).max()) if ours_f.shape == peer_f.shape else float("nan")
    rate = {name: median(results) for name, results in seen.items()}
    m = args.peer_model
    rows = [(f"{m} images/s vs thingsvision 2.7.3", f"{rate['ours']:.1f}", f"{rate['thingsvision']:.1f}",
             f"{rate['ours'] / rate['thingsvision']:.2f}x", f">= 2x (features max abs diff {diff:.2g})"),
            (f"{m} images/s vs raw forward", f"{rate['ours']:.1f}", f"{rate['raw']:.1f}",
             f"{rate['ours'] / rate['raw']:.2f}", ">= 0.9"),
            (f"{args.small_model} images/s vs raw forward", f"{rate['small']:.1f}", f"{rate['small-raw']:.1f}",
             f"{rate['small'] / rate['small-raw']:.2f}", ">= 0.9")]
    for what, unit in (("minflt", "minor faults / image"), ("user", "user s / image"), ("sys", "system s / image")):
        a, b = median(seen["ours"], what), median(seen["ours-malloc-off"], what)
        rows.append((f"{m} {unit}, keep_freed_memory vs ENCODER_PROBE_MALLOC=0", f"{a:.4g}", f"{b:.4g}",
                     f"{a / b:.2f}" if b else "-", "far fewer faults" if what == "minflt" else "-"))
    rows.append((f"{m} images/s, keep_freed_memory vs ENCODER_PROBE_MALLOC=0", f"{rate['ours']:.1f}",
                 f"{rate['ours-malloc-off']:.1f}", f"{rate['ours'] / rate['ours-malloc-off']:.2f}x", "-"))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="timm:vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: extract's own)")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--n-large", type=int, default=10000)
    parser.add_argument("--work", default=".cache/bench-extraction")
    parser.add_argument("--peer-model", default="torchvision:mobilenet_v2@imagenet")
    parser.add_argument("--small-model", default="torchvision:mobilenet_v3_small")
    parser.add_argument("--peer-n", type=int, default=500, help="JPEGs of the peer and small-model figures")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="128 / 512 images, one round: a smoke run")
    parser.add_argument("--peers-only", action="store_true",
                        help="only the thingsvision, raw-forward and page-fault figures (skip the 1k/10k runs)")
    parser.add_argument("--job", choices=list(JOBS), help=argparse.SUPPRESS)  # one timed job (fresh process)
    parser.add_argument("--job-root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        return _job_main(args)
    if args.quick:
        args.n, args.n_large, args.peer_n, args.rounds = 128, 512, 128, 1
    work = Path(args.work)
    workers = args.workers  # None: extract's own plan (workers balanced against torch threads on CPU)
    if args.peers_only:
        _print_table(peer_rows(args, work))
        return
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
    print(f"model {args.model}, batch {args.batch}, {args.dtype}, DataLoader workers {workers or 'planned'}, "
          f"{os.cpu_count()} cores")
    _print_table(rows + peer_rows(args, work))


def _print_table(rows):
    print("| figure | ours | peer | ratio | target |\n| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
