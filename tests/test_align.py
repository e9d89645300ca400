"""The `align` probe: mutual k-NN and CKA against brute-force references, the permutation null,
invariances, weight drift, CIs over images (the CKA bootstrap against re-indexed Gram matrices),
and the probe end to end on two tiny timm towers, references loaded with the run's options."""
import itertools
import json

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, run_cli, write_imagefolder
from encoder_probe.alignment import (LinearCKA, MutualKNN, Null, linear_cka, mutual_knn_alignment,
                                     parameter_group, permutation_null, weight_drift)
from encoder_probe.cli import main
from encoder_probe.errors import DataError, SpecError
from encoder_probe.runner import run_probe

ENCODER = "timm:test_vit"  # 160px, 6 blocks, D=64


def pair(n=40, d=16, noise=1.0, seed=0, d_y=None):
    """x, and y = a random linear map of x plus noise: related, but not the same neighbourhoods."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=(d, d_y or d)) + noise * rng.normal(size=(n, d_y or d))
    return x, y


# -- brute-force references: loops and the textbook definitions ---------------------------------
def knn_sets_by_hand(x, k):
    sets = []
    for i in range(len(x)):
        sims = []
        for j in range(len(x)):
            if j != i:
                cos = sum(a * b for a, b in zip(x[i], x[j])) / (np.sqrt(sum(a * a for a in x[i]))
                                                                * np.sqrt(sum(b * b for b in x[j])))
                sims.append((cos, j))
        sets.append({j for _, j in sorted(sims, reverse=True)[:k]})
    return sets


def mutual_knn_by_hand(x, y, k):
    sx, sy = knn_sets_by_hand(x, k), knn_sets_by_hand(y, k)
    return sum(len(a & b) / k for a, b in zip(sx, sy)) / len(x)


def hsic0_by_hand(x, y):
    """tr(K H L H) / (n-1)^2 with an explicit centring matrix H (Gretton et al. 2005)."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(x @ x.T @ h @ y @ y.T @ h) / (n - 1) ** 2


def cka_feature_space_by_hand(x, y):
    """Kornblith et al. 2019, eq. (feature space): ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    xc = x - np.array([[x[:, j].mean() for j in range(x.shape[1])]])
    yc = y - np.array([[y[:, j].mean() for j in range(y.shape[1])]])
    return np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))


def hsic1_u_statistic(x, y):
    """HSIC_1 as the U-statistic over distinct 4-tuples (Song et al. 2012, Theorem 2)."""
    k, l_ = x @ x.T, y @ y.T
    n, total = len(x), 0.0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i, j] * l_[i, j] + k[i, j] * l_[q, r] - 2 * k[i, j] * l_[i, q]
    return total / (n * (n - 1) * (n - 2) * (n - 3))


@pytest.mark.parametrize("k", [1, 3, 10])
def test_mutual_knn_equals_brute_force(k):
    x, y = pair(n=30, d=8, seed=k)
    assert mutual_knn_alignment(x, y, k=k) == pytest.approx(mutual_knn_by_hand(x, y, k), abs=1e-12)
    assert 0 < mutual_knn_alignment(x, y, k=k) < 1


def test_cka_equals_brute_force():
    x, y = pair(n=30, d=8, noise=2.0, d_y=12)
    expected = hsic0_by_hand(x, y) / np.sqrt(hsic0_by_hand(x, x) * hsic0_by_hand(y, y))
    assert linear_cka(x, y) == pytest.approx(expected, rel=1e-10)
    assert linear_cka(x, y) == pytest.approx(cka_feature_space_by_hand(x, y), rel=1e-10)

    x, y = pair(n=9, d=5, noise=2.0, d_y=7, seed=1)  # 9*8*7*6 tuples per HSIC
    expected = hsic1_u_statistic(x, y) / np.sqrt(hsic1_u_statistic(x, x) * hsic1_u_statistic(y, y))
    assert linear_cka(x, y, unbiased=True) == pytest.approx(expected, rel=1e-9)
    assert abs(linear_cka(x, y, unbiased=True) - linear_cka(x, y)) > 0.01  # two different estimators


def test_identical_features_give_one():
    x, _ = pair(n=50, d=32)
    assert mutual_knn_alignment(x, x.copy()) == 1.0
    assert linear_cka(x, x.copy()) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x.copy(), unbiased=True) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("metric", [MutualKNN(10), LinearCKA(False), LinearCKA(True)], ids=lambda m: m.name)
def test_invariant_to_rotation_and_isotropic_scale(metric):
    x, y = pair(n=60, d=24, noise=1.5)
    q, _ = np.linalg.qr(np.random.default_rng(7).normal(size=(24, 24)))
    base = metric(x, y)
    assert metric(x @ q, y) == pytest.approx(base, abs=1e-12)
    assert metric(x, 3.7 * y @ q.T) == pytest.approx(base, abs=1e-12)
    if metric.name != "mutual_knn":  # CKA is not invariant to anisotropic scaling: the check can fail
        assert abs(metric(x * np.linspace(0.1, 10, 24), y) - base) > 1e-3


def test_permuting_the_prepared_state_equals_recomputing():
    x, y = pair(n=45, d=10, noise=0.5)
    for metric in (MutualKNN(5), LinearCKA(False), LinearCKA(True)):
        fast = permutation_null(metric, x, y, repeats=20, seed=3)
        slow = permutation_null(lambda a, b: metric(a, b), x, y, repeats=20, seed=3)
        assert fast.score == pytest.approx(slow.score, abs=1e-12)
        np.testing.assert_allclose(fast.values, slow.values, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_independent_features_sit_inside_the_null(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(60, 200)), rng.normal(size=(60, 300))  # wide: the biased CKA of noise is large
    results = {m.name: permutation_null(m, x, y, repeats=200, seed=seed) for m in
               (MutualKNN(10), LinearCKA(False), LinearCKA(True))}
    for name, null in results.items():
        assert null.values.min() <= null.score <= null.values.max(), name
        assert abs(null.z) < 3.5 and null.p_value > 0.001, (name, null.as_dict())
    assert results["cka_linear"].score > 0.6  # raw biased CKA of independent noise: why the null matters
    assert abs(results["cka_unbiased"].score) < 0.05
    assert results["mutual_knn"].mean == pytest.approx(10 / 59, rel=0.1)  # a random k-set of n-1 others
    related = permutation_null(LinearCKA(False), x, x @ rng.normal(size=(200, 300)), repeats=50, seed=seed)
    assert related.z > 10 and related.p_value == 1 / 51


def test_null_summary_by_hand():
    null = Null(0.5, np.array([0.1, 0.2, 0.5, 0.6]))
    assert null.mean == pytest.approx(0.35) and null.std == pytest.approx(np.std([0.1, 0.2, 0.5, 0.6], ddof=1))
    assert null.z == pytest.approx(0.15 / null.std) and null.calibrated == pytest.approx(0.15)
    assert null.p_value == pytest.approx(3 / 5)  # (1 + two values >= 0.5) / (1 + 4)
    assert Null(0.3, np.array([0.3, 0.3])).z is None


def test_weight_drift_by_hand():
    a = {"cls_token": torch.ones(1, 4), "blocks.0.fc.weight": torch.ones(2, 2), "blocks.0.fc.bias": torch.zeros(2),
         "blocks.1.fc.weight": torch.full((2, 2), 2.0), "norm.weight": torch.ones(3), "pos_ids": torch.arange(3)}
    b = {**a, "blocks.1.fc.weight": torch.tensor([[2.0, 2.0], [2.0, 5.0]]), "blocks.0.fc.bias": torch.tensor([0.0, 1.0])}
    rows = {r["group"]: r for r in weight_drift(a, b)}
    assert list(rows) == ["cls_token", "blocks.0", "blocks.1", "norm"]  # state-dict order; int buffers skipped
    assert rows["blocks.0"]["relative_change"] == pytest.approx(1 / 2) and rows["blocks.0"]["params"] == 6
    assert rows["blocks.1"]["relative_change"] == pytest.approx(3 / 4) and rows["blocks.1"]["block"] == 1
    assert rows["norm"]["relative_change"] == 0 and rows["norm"]["block"] is None
    assert parameter_group("vision_model.encoder.layers.11.mlp.fc1.weight") == ("vision_model.encoder.layers.11", 11)
    with pytest.raises(SpecError, match="one architecture"):
        weight_drift(a, {**a, "norm.weight": torch.ones(4)})


def test_bad_arrays_are_one_line_errors():
    x, y = pair(n=20, d=4)
    with pytest.raises(DataError, match="20 rows vs 19 rows"):
        mutual_knn_alignment(x, y[:19])
    with pytest.raises(DataError, match="20 rows vs 19 rows"):
        linear_cka(x, y[:19], unbiased=True)
    with pytest.raises(DataError, match="k=20 for 20 images"):
        mutual_knn_alignment(x, y, k=20)
    with pytest.raises(DataError, match="do not vary"):
        linear_cka(np.ones((20, 4)), y)
    with pytest.raises(DataError, match="NaN or inf"):
        linear_cka(np.where(x > 2, np.nan, x), y)


def test_cka_half_samples_are_the_cka_of_each_half():
    """Each replicate is CKA of x[S], y[S] for a random half S of the images (no image twice)."""
    from probes.align import cka_half_samples, cka_interval, halves
    x, y = pair(n=25, d=6, noise=1.5, d_y=9)
    reps = cka_half_samples(x, y, B=7, seed=3)
    weights = np.concatenate(list(halves(25, 7, 3)))
    assert (weights.sum(1) == 12).all() and len(np.unique(weights, axis=0)) == 7
    for b, w in enumerate(weights):
        kept = np.flatnonzero(w)
        assert reps["cka_linear"][b] == pytest.approx(linear_cka(x[kept], y[kept]), rel=1e-9)
        assert reps["cka_unbiased"][b] == pytest.approx(linear_cka(x[kept], y[kept], unbiased=True), rel=1e-9)
    lo, hi = cka_interval(0.5, np.array([0.1, 0.2, 0.3, np.nan]))
    assert lo == pytest.approx(0.5 - 0.1 + 0.005) and hi == pytest.approx(0.5 + 0.1 - 0.005)
    assert cka_interval(0.5, np.full(3, np.nan)) is None


@pytest.mark.parametrize("name", ["cka_linear", "cka_unbiased"])
def test_cka_interval_covers_the_cka_of_fresh_images(name):
    """Coverage on a synthetic problem: the interval of n images holds the mean CKA of n fresh images
    (what a rerun on other images would report) 89-100% of the time over 100 draws."""
    from probes.align import cka_half_samples, cka_interval
    rng = np.random.default_rng(1)
    mixing = rng.normal(size=(16, 16)) * 0.3

    def draw(m):
        x = rng.normal(size=(m, 16)) + 0.5  # uncentred, as pooled features are
        return x, x @ mixing + rng.normal(size=(m, 16))
    unbiased = name == "cka_unbiased"
    target = np.mean([linear_cka(*draw(60), unbiased=unbiased) for _ in range(200)])
    hits = 0
    for r in range(100):
        x, y = draw(60)
        lo, hi = cka_interval(linear_cka(x, y, unbiased=unbiased), cka_half_samples(x, y, 300, seed=r)[name])
        hits += lo <= target <= hi
    assert hits >= 89


def test_mutual_knn_is_the_mean_of_per_image_overlaps():
    from probes.align import knn_overlaps
    x, y = pair(n=30, d=8, seed=4)
    metric = MutualKNN(5)
    per_image = knn_overlaps(metric.prepare(x), metric.prepare(y))
    assert per_image.shape == (30,) and set(np.unique(per_image * 5)) <= set(range(6))
    assert per_image.mean() == pytest.approx(mutual_knn_alignment(x, y, k=5), abs=1e-12)


# -- the probe, end to end ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """The reference tower (seeded random init) and the same tower with blocks 4..6 changed."""
    from safetensors.torch import save_file

    from encoder_probe import load_encoder
    root = tmp_path_factory.mktemp("towers")
    state = load_encoder(ENCODER).module.state_dict()
    gen = torch.Generator().manual_seed(0)
    tuned = {k: (v + 3 * v.std() * torch.randn(v.shape, generator=gen)
                 if k.startswith(("blocks.3.", "blocks.4.", "blocks.5.")) and v.ndim == 2 else v).contiguous()
             for k, v in state.items()}
    save_file(tuned, root / "tuned.safetensors")
    return ENCODER, f"{ENCODER}@{root / 'tuned.safetensors'}"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """42 random images in the ImageNet layout (the demo data works too, but takes longer to generate)."""
    return write_imagefolder(tmp_path_factory.mktemp("images"), per_class=14, split="val")


def test_probe_end_to_end_with_drift_and_compare(tmp_path, towers, images):
    from encoder_probe.report.compare import compare
    reference, tuned = towers
    out = tmp_path / "out"
    code = main(["run", "--encoder", tuned, "--encoder", reference, "--suite", "align", "--reference", reference,
                 "--data", f"imagenet={images}", "--option", "repeats=30", "--option", "layers=[2, -1]",
                 "--out", str(out)])
    assert code == 0
    records = {json.loads(p.read_text())["encoder"]["spec"]: (p, json.loads(p.read_text()))
               for p in out.glob("*/results.json")}
    path, record = records[tuned]
    result = record["probes"]["align"]
    assert result["status"] == "ok", result
    metrics = result["metrics"]
    assert {"mutual_knn@L2", "cka_linear@L-1", "cka_unbiased@L-1_z", "mutual_knn@L-1_calibrated"} <= set(metrics)
    # blocks 1..3 are untouched: the features there are the reference's own
    assert metrics["mutual_knn@L2"]["value"] == 1.0
    assert metrics["cka_linear@L2"]["value"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["cka_linear@L-1"]["value"] < 0.95 and metrics["cka_linear@L-1_z"]["value"] > 3
    null = result["null"]["cka_linear@L-1"]
    assert null["calibrated"] == pytest.approx(null["score"] - null["mean"]) and null["repeats"] == 30
    assert result["data"]["images"] == 42 and result["references"]["reference"]["same_architecture"]
    # CIs over the images: mutual k-NN by the runner's bootstrap of per-image overlaps, CKA by the probe's own
    knn, cka = metrics["mutual_knn@L-1"], metrics["cka_linear@L-1"]
    assert knn["ci"]["method"] == "bootstrap" and knn["ci"]["n"] == 42
    assert knn["ci95"][0] <= knn["value"] <= knn["ci95"][1] and knn["ci95"][1] - knn["ci95"][0] > 0
    assert cka["ci95"][0] < cka["value"] < cka["ci95"][1] < 1
    assert cka["ci"]["method"] == "half-sampling" and cka["ci"]["B"] == 1000 and cka["ci"]["n"] == 42
    assert "ci95" not in metrics["cka_linear@L-1_z"]  # a z-value has an interval over seeds only
    from encoder_probe.bootstrap import statistic_value
    from encoder_probe.items import Items
    items = Items.load(path.parent / result["items"]["file"])
    assert len(items) == 42 and items.ids[0] == "val/cat/cat_000.png"
    assert statistic_value(knn["statistic"], items) == pytest.approx(knn["value"], abs=1e-9)

    drift = result["drift"]["reference"]
    assert drift["layers"] == [1, 2, 3, 4, 5, 6]
    assert drift["cka_linear"][:3] == pytest.approx([1, 1, 1], abs=1e-9) and drift["cka_linear"][5] < 0.95
    changes = {r["group"]: r["relative_change"] for r in drift["weights"]}
    assert changes["blocks.2"] == 0 and changes["patch_embed.proj"] == 0 and changes["blocks.4"] > 0.1
    png = path.parent / result["artifacts"]["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    same = records[reference][1]["probes"]["align"]["metrics"]  # the reference against itself
    assert same["cka_unbiased@L-1"]["value"] == pytest.approx(1.0, abs=1e-9)
    report = compare([p for p, _ in records.values()], tmp_path / "report", plots=False)
    rows = report.table[(report.table["probe"] == "align") & (report.table["metric"] == "cka_linear@L-1")]
    assert len(rows) == 2 and rows["delta"].notna().sum() == 1
    assert "/ align: [plot](../out/" in (tmp_path / "report" / "report.md").read_text()


def test_probe_without_drift_several_references(tmp_path, towers, images):
    from encoder_probe import load_encoder
    reference, tuned = towers
    result = run_probe("align", load_encoder(tuned), data={"imagenet": str(images)},
                       options={"reference": [reference, "timm:test_convnext"], "repeats": 10, "max_images": 40,
                                "bootstrap": 0},
                       out=tmp_path / "out", cache=tmp_path / "cache", seeds=2, bootstrap=0)
    assert result["references"]["ref1"]["same_architecture"] is False and list(result["drift"]) == ["ref0"]
    assert "ref1:cka_linear" in result["metrics"] and len(result["metrics"]["ref1:cka_linear_z"]["values"]) == 2
    assert "seed_ci95" in result["metrics"]["ref0:mutual_knn_z"] and result["data"]["images"] == 40
    assert "ci95" not in result["metrics"]["ref0:cka_linear"] and "ci" not in result["metrics"]["ref0:cka_linear"]
    assert result["runtime"]["seeds"] == 2 and "seeds" not in result["config"]


@pytest.mark.parametrize("args, message", [
    (["--reference", f"{ENCODER}@/nonexistent/w.safetensors"], "reference 'timm:test_vit@/nonexistent/w.safetensors"),
    (["--reference", ENCODER, "--option", "k=42"], "more than k=42"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, images, args, message):
    proc, out = run_cli(tmp_path, "--encoder", ENCODER, "--suite", "align", "--data", f"imagenet={images}", *args)
    assert_one_line_error(proc, message)
    assert not list(out.glob("*/results.json"))


@pytest.mark.parametrize("args, message", [
    (["--reference", "nosuch:thing"], "align.reference: unknown source 'nosuch'"),
    (["--reference", "/no/such/tower"], "align.reference: /no/such/tower: no such directory"),
    ([], "probe 'align': needs a reference encoder (--reference SPEC, repeatable)"),
    (["--reference", ENCODER, "--option", "repeats=1"], "align.repeats must be >= 2, got 1"),
    (["--reference", ENCODER, "--option", "reference_view=tiles"], "align.reference_view must be one of base, full"),
    (["--reference", ENCODER, "--option", "bootstrap=50"], "bootstrap must be 0 (no intervals) or >= 100"),
])
def test_bad_references_and_options_are_refused_before_any_work(tmp_path, no_work, args, message):
    proc, out = run_cli(tmp_path, "--encoder", ENCODER, "--suite", "align", *args)
    assert_one_line_error(proc, message)
    assert not out.exists() or not any(out.rglob("results.json"))


def test_references_load_with_the_runs_load_options(tmp_path, images):
    """--image-size reaches a reference whose source takes it (Qwen2-VL towers), as it reaches the
    encoder under test: both read the same input size."""
    from encoder_probe import load_encoder
    from encoder_probe.toy import write_hf_mllm
    test = write_hf_mllm(tmp_path / "test", "qwen2_vl")
    reference = write_hf_mllm(tmp_path / "ref", "qwen2_vl", seed=1)
    proc, out = run_cli(tmp_path, "--encoder", str(test), "--suite", "align", "--reference", str(reference),
                        "--data", f"imagenet={images}", "--image-size", "48", "--option", "repeats=5",
                        "--bootstrap", "0", "--option", "bootstrap=0")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(next(out.rglob("results.json")).read_text())
    ref = record["probes"]["align"]["references"]["reference"]
    assert ref["input_size"] == [48, 48] and ref["fingerprint"] == load_encoder(str(reference), image_size=48).fingerprint
    assert ref["fingerprint"] != load_encoder(str(reference)).fingerprint


def test_encoders_that_saw_different_images_are_refused(tmp_path, monkeypatch, towers, images):
    import probes.align as align
    from encoder_probe import load_encoder
    real, calls = align._features, []

    def one_image_short(*args, **kwargs):  # as if the reference's extraction had skipped an image
        features, rows, entry = real(*args, **kwargs)
        calls.append(entry)
        return ({k: v[1:] for k, v in features.items()}, rows[1:], entry) if len(calls) == 2 else (features, rows, entry)

    monkeypatch.setattr(align, "_features", one_image_short)
    reference, tuned = towers
    with pytest.raises(DataError, match=r"saw different images \(42 vs 41 rows\)"):
        run_probe("align", load_encoder(tuned), data={"imagenet": str(images)}, options={"reference": reference},
                  out=tmp_path / "out", cache=tmp_path / "cache", bootstrap=0)
    assert not list((tmp_path / "out").rglob("*.*"))
