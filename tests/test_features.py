"""Feature extraction: values equal the encoder's forward, cache keys, kill -9 resume, torchrun, bad input."""
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli, write_ade20k, write_imagefolder
from encoder_probe import load_encoder
from encoder_probe.data import ADE20K, ImageFolder
from encoder_probe.errors import DataError
from encoder_probe.features import FeatureSet, extract

ENCODER = "timm:test_vit"  # 160px, 370k parameters: fast enough for real runs in tests


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith("."))


def _probe(*args):
    return subprocess.Popen([sys.executable, "-m", "encoder_probe", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(ENCODER)


def test_features_equal_the_encoders_own_forward(tmp_path, encoder):
    write_imagefolder(tmp_path / "data", per_class=3)
    ds = ImageFolder(tmp_path / "data", "train")
    fs = extract(encoder, ds, out=tmp_path / "cache", layers=[2, "final"], pool=["mean", "cls"], tokens=True,
                 batch_size=4, num_workers=0, progress=False)
    pixels = torch.stack([encoder.transform(Image.open(s.path)) for s in ds.samples])
    with torch.inference_mode():
        mid, final = encoder.forward_tokens(pixels, [2, "final"])
    assert len(fs) == 9 and fs.grid == final.grid and fs.class_names == ["cat", "dog", "fish"]
    np.testing.assert_allclose(fs.pooled("cls", "final"), final.prefix[:, 0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fs.pooled("mean", 2), mid.patches.mean(1).numpy(), rtol=1e-5, atol=1e-5)
    assert np.array_equal(fs.pooled("mean", 2 - encoder.layers.depth - 1), fs.pooled("mean", 2))  # negative index
    assert fs.tokens(2).dtype == np.float16 and fs.tokens(2).shape == tuple(mid.patches.shape)
    np.testing.assert_array_equal(fs.tokens("final"), final.patches.half().numpy())
    np.testing.assert_array_equal(fs.prefix("final"), final.prefix.half().numpy())
    assert fs.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and fs.index.tolist() == list(range(9))
    assert (fs.num_classes, fs.dataset, fs.split, fs.root) == (3, "imagenet", "train", str(tmp_path / "data"))
    data = fs.data
    assert data["num_classes"] == 3 and data["size"] == 9
    data["root"], fs.class_names[0] = "/elsewhere", "tiger"  # copies: the entry keeps what it holds
    assert fs.root == str(tmp_path / "data") and fs.class_names[0] == "cat"
    with pytest.raises(DataError, match="layer 5 was not extracted"):
        fs.pooled("mean", 5)


def test_segmentation_features_keep_masks_at_encoder_resolution(tmp_path, encoder):
    write_ade20k(tmp_path / "ade", n=3, size=(64, 80))
    ds = ADE20K(tmp_path / "ade", "train")
    fs = extract(encoder, ds, out=tmp_path / "cache", tokens=True, batch_size=2, num_workers=1, progress=False)
    assert fs.masks.shape == (3, 160, 160) and fs.masks.dtype == np.uint8
    for row in range(3):
        assert np.array_equal(fs.masks[row], ds[row]["mask"].numpy())
    assert set(np.unique(fs.masks)) <= set(range(150)) | {255}


def test_cache_key_parts_each_make_a_new_entry(tmp_path, encoder):
    data, cache = tmp_path / "data", tmp_path / "cache"
    write_imagefolder(data, per_class=2)
    run = lambda enc=encoder, **kw: extract(enc, ImageFolder(data, "train"), out=cache, num_workers=0,
                                            progress=False, **kw)
    first = run()
    meta_mtime = (first.path / "meta.json").stat().st_mtime_ns
    assert run().path == first.path and (first.path / "meta.json").stat().st_mtime_ns == meta_mtime  # a hit
    paths = {first.path, run(layers=1).path, run(pool="cls").path}
    other = load_encoder(ENCODER)
    other.preprocess = dataclasses.replace(other.preprocess, interpolation="bilinear")
    paths.add(run(other).path)
    image = data / "train" / "dog" / "dog_001.png"
    pixels = np.asarray(Image.open(image)).copy()
    pixels[0, 0] ^= 1  # one bit of one image
    Image.fromarray(pixels).save(image)
    paths.add(run().path)
    assert len(paths) == 5 and len(_entries(cache)) == 5


def test_bad_image_fails_naming_the_file_and_leaves_nothing(tmp_path, encoder):
    data, cache = tmp_path / "data", tmp_path / "cache"
    write_imagefolder(data, per_class=3)
    broken = data / "train" / "dog" / "dog_001.png"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated
    with pytest.raises(DataError, match=f"{broken}: unreadable image"):
        extract(encoder, ImageFolder(data, "train"), out=cache, batch_size=2, chunk_size=2, num_workers=0,
                progress=False)
    assert _entries(cache) == [] and not list(cache.glob(".*.partial"))

    fs = extract(encoder, ImageFolder(data, "train"), out=cache, batch_size=2, chunk_size=2, num_workers=1,
                 on_bad_image="skip", progress=False)
    assert len(fs) == 8 and 4 not in fs.index.tolist() and fs.labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert [s["path"] for s in fs.meta["skipped"]] == [str(broken)]


def test_cli_bad_mask_is_one_line_exit_2_and_no_entry(tmp_path):
    write_ade20k(tmp_path / "ade", n=2, size=(64, 64))
    mask = tmp_path / "ade" / "ADEChallengeData2016" / "annotations" / "training" / "ADE_training_00000001.png"
    Image.fromarray(np.full((64, 64), 200, np.uint8)).save(mask)
    proc, cache = run_cli(tmp_path, "--encoder", ENCODER, "--data", f"ade20k={tmp_path / 'ade'}", "--split", "train",
                          "--workers", "0", command="extract")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("probe: error")]
    assert proc.returncode == 2 and lines == [f"probe: error: {mask}: mask has label 200; labels must be 0..150"]
    assert not cache.exists() or _entries(cache) == []


@pytest.mark.slow
def test_kill_9_then_rerun_is_byte_identical(tmp_path):
    data = tmp_path / "data"
    write_imagefolder(data, classes=("a", "b", "c", "d"), per_class=12, size=(200, 240))
    args = ["extract", "--encoder", ENCODER, "--data", f"imagenet={data}", "--split", "train", "--tokens",
            "--batch-size", "2", "--chunk-size", "2", "--workers", "0"]
    killed = tmp_path / "killed"
    proc = _probe(*args, "--out", str(killed))
    deadline = time.time() + 300
    while time.time() < deadline:
        partial = next(killed.glob(".*.partial"), None) if killed.exists() else None
        if partial is not None and len(list(partial.glob("chunk-*"))) >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert _entries(killed) == [], "the run finished before it could be killed"
    done = len(list(partial.glob("chunk-*")))
    assert 3 <= done < 24

    rerun = _probe(*args, "--out", str(killed))
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "of 24 chunks already done" in err
    clean = tmp_path / "clean"
    whole = _probe(*args, "--out", str(clean))
    _, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    [a], [b] = _entries(killed), _entries(clean)
    assert a.name == b.name and _files(a) == _files(b)
    assert not list(killed.glob(".*.partial"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path):
    """One process with its default threads vs torchrun's two single-threaded gloo ranks: same bytes."""
    data = tmp_path / "data"
    write_imagefolder(data, per_class=5, size=(64, 64))
    args = ["--encoder", ENCODER, "--data", f"imagenet={data}", "--split", "train", "--tokens", "--pool",
            "mean,cls", "--batch-size", "2", "--chunk-size", "4", "--workers", "0"]
    one = subprocess.run([sys.executable, "-m", "encoder_probe", "extract", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                          "-m", "encoder_probe", "extract", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert "rank 1/2" in two.stderr and two.stdout.count("train: 15 images") == 1  # only rank 0 reports
    [a], [b] = _entries(tmp_path / "one"), _entries(tmp_path / "two")
    assert a.name == b.name and _files(a) == _files(b)
    assert FeatureSet(b).index.tolist() == list(range(15))


def test_cli_extract_defaults_to_the_builtin_demo_data(tmp_path, cache_env):
    proc, _ = run_cli(tmp_path, "--encoder", ENCODER, "--split", "val", "--pool", "cls,mean", command="extract")
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    assert out.startswith("imagenet/val: 60 images -> ")
    fs = FeatureSet(out.split(" -> ")[1].strip())
    assert fs.root.startswith(str(cache_env)) and fs.class_names[0] == "circle"
    assert np.bincount(fs.labels).tolist() == [10] * 6 and fs.pooled("cls").shape == (60, 64)
