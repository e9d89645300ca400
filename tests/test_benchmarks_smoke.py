"""The benchmark scripts' helpers at toy sizes, so the scripts cannot rot between the runs that publish figures.

gpu_check.py runs here with device="cpu" through the same functions and arguments (autocast "bf16",
decode "device") a GPU run uses; linear_probe.py's solvers, interleaved rounds and table run on a toy
case; CLIP_benchmark's probe only where clip_benchmark is importable (CI does not install the bench extras).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402
import linear_probe  # noqa: E402


def toy_case(n=240, d=12, k=3, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, d)).astype(np.float32) * 2.0
    y, yv = rng.permutation(np.arange(n) % k), rng.permutation(np.arange(n // 4) % k)
    x = (means[y] + rng.normal(size=(n, d))).astype(np.float32)
    xv = (means[yv] + rng.normal(size=(len(yv), d))).astype(np.float32)
    return x, y, xv, yv, k


def test_gpu_check_extraction_on_cpu(tmp_path):
    """The GPU extraction check's code path on CPU: extract(device, autocast="bf16", decode="device") on
    make_dataset's JPEGs against the raw forward under the same autocast."""
    r = gpu_check.extraction_check("timm:test_vit", images=6, batch=3, device="cpu", autocast="bf16",
                                   decode="device", workers=0, work=tmp_path)
    assert r["images"] == 6 and r["ours"] > 0 and r["raw"] > 0 and r["ratio"] > 0
    row = gpu_check.extraction_row("timm:test_vit", 3, "bf16", "device", r)
    assert row.startswith("| extract()") and row.count("|") == gpu_check.HEADER.splitlines()[0].count("|")


def test_gpu_check_probe_on_cpu():
    """The ImageNet-sized GPU probe check at a toy size on CPU: features made on the device, run_protocol there."""
    x, y, xv, yv = gpu_check.synthetic_features(300, 8, 4, 60, device="cpu", spread=6.0)
    assert x.dtype == np.float32 and x.shape == (300, 8) and yv.shape == (60,) and set(np.unique(y)) <= set(range(4))
    again = gpu_check.synthetic_features(300, 8, 4, 60, device="cpu", spread=6.0)
    assert np.array_equal(x, again[0])  # seeded
    r = gpu_check.probe_check(300, 8, 4, 60, device="cpu", spread=6.0)
    assert r["top1"] > 0.5 and r["seconds"] > 0 and r["sweep_points"] >= 1
    row = gpu_check.probe_row(300, 8, 4, 60, r)
    assert row.count("|") == gpu_check.HEADER.splitlines()[0].count("|")


def test_gpu_check_names_missing_extract_arguments(monkeypatch):
    import encoder_probe.features as features
    monkeypatch.setattr(features, "extract", lambda encoder, dataset, *, out=None: None)
    with pytest.raises(SystemExit, match="autocast, decode"):
        gpu_check.require_extract_args()


def test_linear_probe_rounds_rotate_and_take_medians():
    data = {"toy": toy_case(n=30)}
    calls = []

    def fake(name):
        return lambda *a: calls.append(name) or {"top1": 0.5, "chosen": "C=1"}
    rows = linear_probe.bench(data, {s: fake(s) for s in ("a", "b", "c")}, rounds=3, log=lambda m: None)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # round-robin, rotated by one per round
    assert all(len(r["rounds"]) == 3 and r["seconds"] == sorted(r["rounds"])[1] for r in rows)


def test_linear_probe_solvers_and_table():
    """ours and sklearn through the same protocol on the same arrays, one markdown table."""
    rows = linear_probe.bench({"toy": toy_case()}, {s: linear_probe.solver_fn(s) for s in ("ours", "sklearn")},
                              rounds=1, log=lambda m: None)
    by = {r["solver"]: r for r in rows}
    assert by["ours"]["top1"] > 0.8 and abs(by["ours"]["top1"] - by["sklearn"]["top1"]) <= 0.05
    assert by["ours"]["chosen"].startswith("C=")
    text = linear_probe.table(rows)
    assert text.splitlines()[0].startswith("| case | solver |") and "| ours | " in text and "1.00x" in text


def test_linear_probe_tight_reference_is_sequential_to_1e5_over_the_whole_grid():
    config = linear_probe.tight_sequential_config()
    assert (config.sweep, config.sweep_tol, config.patience) == ("sequential", 1e-5, 0)


def test_balanced_subset_keeps_every_class():
    y = np.repeat(np.arange(4), 25)
    rows = linear_probe.balanced_subset(y, 0.2)
    assert np.bincount(y[rows]).tolist() == [5, 5, 5, 5] and np.all(np.diff(rows) > 0)


@pytest.mark.skipif(not linear_probe.clip_benchmark_available(), reason="clip_benchmark not installed (make bench-install)")
def test_clip_benchmark_probe_runs_its_own_search():
    """CLIP_benchmark's own find_peak / train / infer on our arrays (1 epoch: the flow, not the figures)."""
    import torch
    x, y, xv, yv, k = toy_case(n=120)
    saved = torch.nn.Module.cuda, torch.Tensor.cuda
    r = linear_probe.clip_benchmark_probe(x, y, xv, yv, epochs=1, batch_size=64)
    assert (torch.nn.Module.cuda, torch.Tensor.cuda) == saved  # the no-op patch is undone
    assert r["weight_decay"] in np.logspace(-6, 2, 97).tolist() and 0 <= r["top1"] <= 1
    assert r["top1"] > 1 / k
