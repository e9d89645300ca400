import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# two cores: one torch thread per pytest-xdist worker (make test runs two), both threads otherwise; the
# processes a test starts (CLI runs, notebook kernels, torchrun) inherit one thread each. No test module
# sets its own count: one that did, imported by every worker at collection, ran the whole suite on twice
# as many threads as cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """No test reads or writes the user's ~/.cache (demo data, features) unless it asks to."""
    os.environ["ENCODER_PROBE_CACHE"] = str(tmp_path_factory.mktemp("encoder-probe-cache"))


@pytest.fixture(autouse=True)
def _one_loader_worker_per_xdist_worker(monkeypatch):
    """Under pytest-xdist every core already runs a test: one DataLoader worker each, not one per core."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import encoder_probe.features
        monkeypatch.setattr(encoder_probe.features, "default_workers", lambda: 1)


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


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """A cache root every pytest-xdist worker sees: tests that extract the same real encoder on the same data
    (mnist-5k for the parity and random-twin tests, lfw-faces for the two-class tests) extract it once per
    run; the cache's lock makes a second worker wait for the first. Only for tests that do not look at
    cache hits and misses."""
    root = tmp_path_factory.getbasetemp()
    return (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "shared-cache"


@pytest.fixture(scope="session")
def mnist_features(shared_cache):
    """Pooled features of mnist-5k (40 train and 40 val images a class) through a built-in encoder:
    ``mnist_features(spec) -> (x, y, xv, yv)``, extracted once per run (:func:`shared_cache`)."""
    import numpy as np

    from encoder_probe.data import open_dataset
    from encoder_probe.features import extract

    out = shared_cache / "mnist"

    def get(spec):
        train, val = (extract(spec, open_dataset("mnist-5k", split=split, per_class=40), out=out, progress=False)
                      for split in ("train", "val"))
        return np.asarray(train.pooled()), train.labels, np.asarray(val.pooled()), val.labels

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
    """``probe COMMAND ARGS --out tmp_path/out`` run in this process (``cli.main``, as the console
    script runs it, with stdout and stderr captured): (result with returncode/stdout/stderr, out dir).

    In-process saves the ~4 s interpreter and torch start-up per call; tests that need a real
    process (signals, kill -9, two processes, torchrun, the whole of stderr) start one themselves.
    """
    import contextlib
    import io
    import types

    from encoder_probe.cli import main
    out = tmp_path / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main([command, *args, "--out", str(out)])
        except SystemExit as e:  # argparse errors
            code = e.code
    return types.SimpleNamespace(returncode=code, stdout=stdout.getvalue(), stderr=stderr.getvalue()), out


def assert_one_line_error(proc, message):
    """Exit 2 and exactly one ``probe: error`` line (the rest of stderr is progress) that says ``message``."""
    errors = [line for line in proc.stderr.splitlines() if "probe: error" in line]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr
    assert proc.stderr.rstrip().endswith(errors[0].split("probe: error", 1)[1])  # and it is the last word


def assert_one_line(excinfo, *parts):
    """A raised error's message is one line that names every one of ``parts``."""
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert str(part) in message, message


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    """Generated data and features go to a per-test cache, never ~/.cache."""
    monkeypatch.setenv("ENCODER_PROBE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if an encoder is loaded or anything extracted: the refusal must come first."""
    import encoder_probe.features
    import encoder_probe.runner

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the options were checked")
    monkeypatch.setattr(encoder_probe.runner, "load_encoder", refuse)
    monkeypatch.setattr(encoder_probe.features, "extract", refuse)
