import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """No test reads or writes the user's ~/.cache (demo data, features) unless it asks to."""
    os.environ["ENCODER_PROBE_CACHE"] = str(tmp_path_factory.mktemp("encoder-probe-cache"))


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    """Session-wide tiny checkpoints, each written once."""
    root = tmp_path_factory.mktemp("toy")
    made = {}

    def get(name, write):
        if name not in made:
            made[name] = write(root / name)
        return made[name]

    return get


def write_imagefolder(root, classes=("cat", "dog", "fish"), per_class=4, size=(40, 48), split="train", seed=0):
    """A small ImageNet-layout split of random RGB PNGs; returns the root."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in classes:
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{i:03d}.png")
    return root


def write_ade20k(root, n=4, size=(48, 64), split="training", seed=0, num_classes=150):
    """A small ADEChallengeData2016 tree: JPEG images, PNG masks of 16x16 label blocks (0..num_classes)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = root / "ADEChallengeData2016"
    (base / "images" / split).mkdir(parents=True, exist_ok=True)
    (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
    h, w = size
    for i in range(n):
        stem = f"ADE_{split}_{i:08d}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(base / "images" / split / f"{stem}.jpg")
        blocks = rng.integers(0, num_classes + 1, (h // 16, w // 16)).astype(np.uint8)
        Image.fromarray(np.kron(blocks, np.ones((16, 16), np.uint8))).save(base / "annotations" / split / f"{stem}.png")
    return root


def run_cli(tmp_path, *args, command="run"):
    """``python -m encoder_probe COMMAND ARGS --out tmp_path/out`` in a fresh process: (proc, out dir)."""
    import subprocess
    import sys
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "encoder_probe", command, *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    return proc, out


def assert_one_line_error(proc, message):
    """Exit 2 and exactly one ``probe: error`` line (the rest of stderr is progress) that says ``message``."""
    errors = [line for line in proc.stderr.splitlines() if "probe: error" in line]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr
    assert proc.stderr.rstrip().endswith(errors[0].split("probe: error", 1)[1])  # and it is the last word


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    """Generated data and features go to a per-test cache, never ~/.cache."""
    monkeypatch.setenv("ENCODER_PROBE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
