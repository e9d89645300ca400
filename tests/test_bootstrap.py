"""The bootstrap over evaluation items: coverage on a problem with known accuracy, the paired
difference of two encoders against an exact McNemar test, and every statistic against the metric
code it stands for (segmentation.pixel_scores / patch_scores, sklearn's balanced accuracy)."""
import warnings

import numpy as np
import pytest
import torch

from encoder_probe import bootstrap as bs
from encoder_probe.bootstrap import (bootstrap_ci, compare_items, metric_intervals, outside_noise, p_value,
                                     register_statistic, resample_weights, statistic_value)
from encoder_probe.errors import DataError, SpecError
from encoder_probe.items import Items
from encoder_probe.segmentation import patch_scores, pixel_scores

TOP1 = {"name": "mean", "column": "top1"}


def ids(n, prefix="val/img_"):
    return [f"{prefix}{i:05d}.png" for i in range(n)]


def hits(correct):
    return Items(ids(len(correct)), {"top1": np.asarray(correct, dtype=float)[None]})


def two_encoders(n=200, worse=0, better=0, base_correct=150, seed=0):
    """Outcomes of encoders a and b on the same n images: b loses ``worse`` images a gets right and
    wins ``better`` images a gets wrong (the discordant pairs); the rest agree."""
    rng = np.random.default_rng(seed)
    a = np.zeros(n)
    a[rng.permutation(n)[:base_correct]] = 1
    b = a.copy()
    right, wrong = np.flatnonzero(a == 1), np.flatnonzero(a == 0)
    b[rng.permutation(right)[:worse]] = 0
    b[rng.permutation(wrong)[:better]] = 1
    return hits(a), hits(b)


# -- resampling -----------------------------------------------------------------------------------
def test_resample_weights_are_seeded_counts_of_n_draws():
    w = resample_weights(50, 300, seed=3)
    assert w.shape == (300, 50) and (w.sum(1) == 50).all() and (w >= 0).all()
    assert np.array_equal(w, resample_weights(50, 300, seed=3))
    assert not np.array_equal(w, resample_weights(50, 300, seed=4))
    assert np.allclose(w.mean(0), 1, atol=0.2)  # each item drawn once per resample on average
    with pytest.raises(DataError, match="no evaluation items"):
        resample_weights(0, 10)


def test_chunked_replicates_equal_one_matrix_product(monkeypatch):
    """Memory stays bounded by chunking over resamples; the chunks are the same resamples."""
    items = hits(np.random.default_rng(0).random(300) < 0.7)
    monkeypatch.setattr(bs, "CHUNK_ELEMENTS", 1000)  # 3 rows per chunk
    w = resample_weights(300, 100, seed=1)
    assert np.allclose(bs.replicates([TOP1], items, 100, seed=1)[0], w @ items.columns["top1"][0] / 300)


def test_p_value_is_the_two_sided_bootstrap_tail():
    deltas = np.array([-0.1, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])  # B = 9: 2 at or below 0, 8 at or above
    assert p_value(deltas) == pytest.approx(2 * 3 / 10)
    assert p_value(np.full(99, 0.5)) == pytest.approx(2 / 100)
    assert p_value(np.zeros(20)) == 1.0


# -- coverage on a problem with known accuracy ------------------------------------------------------
def test_ci_of_the_mean_covers_the_true_accuracy_95_percent_of_the_time():
    """400 synthetic val sets of 200 images at accuracy 0.8, all bootstrapped in one matrix product
    (the same 1000 resamples for each set, as bootstrap_ci with seed 0 draws them)."""
    p, n, repeats, B = 0.8, 200, 400, 1000
    correct = (np.random.default_rng(2026).random((repeats, n)) < p).astype(float)
    replicates = resample_weights(n, B, seed=0) @ correct.T / n  # (B, repeats)
    lo, hi = np.percentile(replicates, [2.5, 97.5], axis=0)
    for r in (0, 1, 399):  # the vectorised intervals are bootstrap_ci's
        assert bootstrap_ci(TOP1, hits(correct[r]), B=B, seed=0) == pytest.approx([lo[r], hi[r]], abs=1e-12)
    coverage = np.mean((lo <= p) & (p <= hi))
    assert abs(coverage - 0.95) <= 0.03, coverage


# -- paired differences ---------------------------------------------------------------------------
def mcnemar(a: Items, b: Items) -> float:
    """Exact McNemar: a binomial test on the discordant pairs."""
    from scipy.stats import binomtest
    x, y = a.columns["top1"][0], b.columns["top1"][0]
    b_wins, a_wins = int(((y == 1) & (x == 0)).sum()), int(((y == 0) & (x == 1)).sum())
    return binomtest(b_wins, b_wins + a_wins, 0.5).pvalue


@pytest.mark.parametrize("worse, better, significant", [(2, 0, False), (40, 0, True), (30, 10, True),
                                                        (10, 30, True), (0, 2, False)])
def test_paired_ci_and_p_value_agree_with_exact_mcnemar(worse, better, significant):
    a, b = two_encoders(worse=worse, better=better)
    found = compare_items(TOP1, a, b, B=1000, seed=0)
    assert found["paired"] is True and found["n"] == 200
    assert found["delta"] == pytest.approx((better - worse) / 200)
    assert outside_noise(found["ci95"]) is significant  # the CI excludes 0 exactly when it is significant
    assert bool(found["p_value"] < 0.05) is significant
    assert bool(mcnemar(a, b) < 0.05) is significant  # the exact test on the discordant pairs says the same


def test_two_of_two_hundred_images_is_inside_the_noise_forty_is_outside():
    """The issue's case: top-1 0.75 vs 0.74 on the same 200 images."""
    a, b = two_encoders(worse=2)
    small = compare_items(TOP1, a, b)
    assert small["ci95"][0] < 0 <= small["ci95"][1] and not outside_noise(small["ci95"])
    a, b = two_encoders(worse=40)
    large = compare_items(TOP1, a, b)
    assert large["ci95"][1] < 0 and outside_noise(large["ci95"])
    unpaired = compare_items(TOP1, a, Items(ids(200, "other/"), b.columns))
    assert unpaired["paired"] is False
    assert large["ci95"][1] - large["ci95"][0] < unpaired["ci95"][1] - unpaired["ci95"][0]  # pairing cancels


def test_pairing_aligns_by_id_whatever_the_order():
    a, b = two_encoders(worse=12, better=3)
    order = np.random.default_rng(1).permutation(200)
    shuffled = Items(b.ids[order], {"top1": b.columns["top1"][:, order]})
    assert compare_items(TOP1, a, shuffled, B=300) == compare_items(TOP1, a, b, B=300)


def test_different_ids_are_compared_unpaired_and_say_so():
    a, b = two_encoders(worse=40)
    other = Items(ids(150, "elsewhere/"), {"top1": b.columns["top1"][:, :150]})
    found = compare_items(TOP1, a, other, B=500)
    assert found["paired"] is False and found["n"] == [200, 150]
    assert found["delta"] == pytest.approx(other.columns["top1"].mean() - a.columns["top1"].mean())
    assert found["ci95"][0] < found["delta"] < found["ci95"][1]
    overlap = Items(list(a.ids[:199]) + ["val/extra.png"], b.columns)  # same count, one id differs
    assert compare_items(TOP1, a, overlap, B=100)["paired"] is False


# -- statistics against the metric code they stand for ---------------------------------------------
def confusion_items(rng, n=12, classes=6, seeds=1):
    """Hand-built per-image confusions (class 5 absent from truth and prediction) as sparse columns."""
    per_image = rng.integers(0, 4, size=(seeds, n, classes, classes)) * (rng.random((seeds, n, classes, classes)) < 0.3)
    per_image[..., 5, :] = 0
    per_image[..., :, 5] = 0
    s, i, t, p = np.nonzero(per_image)
    items = Items(ids(n), {"conf_seed": s, "conf_item": i, "conf_true": t, "conf_pred": p,
                           "conf_count": per_image[s, i, t, p]}, {"num_classes": classes})
    return items, per_image


def patch_items(rng, n=12, classes=5, seeds=1):
    truth = rng.random((seeds, n, 16, classes)) < 0.3
    truth[..., 4] = False  # a class no patch holds: left out of the macro average
    pred = rng.random((seeds, n, 16, classes)) < 0.3
    counts = np.stack([[patch_counts_np(t, p) for t, p in zip(ts, ps)] for ts, ps in zip(truth, pred)])
    return Items(ids(n), {"patch_counts": counts}), counts


def patch_counts_np(truth, pred):
    from encoder_probe.segmentation import patch_counts
    return patch_counts(torch.from_numpy(truth), torch.from_numpy(pred)).numpy()


@pytest.mark.parametrize("seed", range(5))
def test_seg_statistics_with_unit_weights_equal_the_metric_code(seed):
    rng = np.random.default_rng(seed)
    items, per_image = confusion_items(rng)
    total = pixel_scores(torch.from_numpy(per_image[0].sum(0)))
    assert total["classes_counted"] < 6  # the absent class is left out of the mean
    assert statistic_value({"name": "miou"}, items) == total["mIoU"]
    assert statistic_value({"name": "pixel_accuracy"}, items) == total["pixel_accuracy"]
    items, counts = patch_items(rng)
    summed = patch_scores(torch.from_numpy(counts[0].sum(0)))
    for key in ("patch_macro_recall", "patch_macro_precision", "patch_macro_f1"):
        assert statistic_value({"name": key}, items) == summed[key]


def test_seg_statistics_under_weights_sum_the_weighted_contributions(monkeypatch):
    monkeypatch.setattr(bs, "CHUNK_ELEMENTS", 40)  # the (rows, C*C) sums a row at a time
    rng = np.random.default_rng(7)
    items, per_image = confusion_items(rng, seeds=2)
    w = resample_weights(len(items), 5, seed=0)
    want = [np.mean([pixel_scores(torch.from_numpy(np.einsum("i,itp->tp", row, per_image[s])))["mIoU"]
                     for s in range(2)]) for row in w]
    assert np.allclose(bs.evaluate({"name": "miou"}, w, items), want, rtol=0, atol=1e-12)
    items, counts = patch_items(rng, seeds=3)
    want = [np.mean([patch_scores(torch.from_numpy(np.einsum("i,ikc->kc", row, counts[s])))["patch_macro_recall"]
                     for s in range(3)]) for row in w]
    assert np.allclose(bs.evaluate({"name": "patch_macro_recall"}, w, items), want, rtol=0, atol=1e-12)


def test_class_recall_is_balanced_accuracy_over_the_classes_in_the_labels():
    from sklearn.metrics import balanced_accuracy_score
    rng = np.random.default_rng(0)
    label = rng.integers(0, 7, size=(3, 90))
    label[label == 6] = 0  # class 6 only ever predicted: not in the mean
    pred = np.where(rng.random((3, 90)) < 0.6, label, rng.integers(0, 7, size=(3, 90)))
    items = Items(ids(90), {"pred": pred, "label": label})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about the predicted-only class
        want = np.mean([balanced_accuracy_score(label[s], pred[s]) for s in range(3)])
    assert statistic_value({"name": "class_recall"}, items) == pytest.approx(want, abs=1e-12)
    one_label = Items(ids(90), {"pred": pred, "label": label[:1]})  # labels shared by every seed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = np.mean([balanced_accuracy_score(label[0], pred[s]) for s in range(3)])
    assert statistic_value({"name": "class_recall"}, one_label) == pytest.approx(want, abs=1e-12)


def test_mean_leaves_unscored_items_out_and_averages_seeds():
    x = np.array([[1, 0, np.nan, 1], [1, 1, 1, np.nan]])
    assert statistic_value(TOP1, Items(ids(4), {"top1": x})) == pytest.approx((2 / 3 + 1) / 2)
    assert statistic_value(TOP1, Items(ids(4), {"top1": x[0]})) == pytest.approx(2 / 3)  # no seed axis: S = 1


def _duplicate(items: Items, i: int) -> Items:
    """``items`` with item i drawn twice (dense columns and sparse confusion entries alike)."""
    n = len(items)
    cols = {}
    for name, value in items.columns.items():
        cols[name] = value if name.startswith("conf_") else np.concatenate([value, value[:, i:i + 1]], axis=1)
    if "conf_item" in cols:
        extra = items.columns["conf_item"] == i
        cols = {name: np.concatenate([value, np.full(extra.sum(), n) if name == "conf_item" else value[extra]])
                for name, value in cols.items()}
    return Items(list(items.ids) + ["copy"], cols, items.meta)


def test_a_weight_of_two_is_the_item_twice():
    rng = np.random.default_rng(3)
    label = rng.integers(0, 4, size=(1, 12))
    cases = [(TOP1, hits(rng.random(12) < 0.5)),
             ({"name": "class_recall"}, Items(ids(12), {"pred": rng.integers(0, 4, (1, 12)), "label": label})),
             ({"name": "miou"}, confusion_items(rng)[0]),
             ({"name": "pixel_accuracy"}, confusion_items(rng)[0]),
             ({"name": "patch_macro_f1"}, patch_items(rng)[0])]
    for stat, items in cases:
        weights = np.ones((1, 12))
        weights[0, 4] = 2
        assert bs.evaluate(stat, weights, items)[0] == pytest.approx(statistic_value(stat, _duplicate(items, 4)),
                                                                     abs=1e-12), stat


# -- the runner's helper and the registry -----------------------------------------------------------
def test_metric_intervals_for_the_runner():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 200)
    pred = np.where(rng.random(200) < 0.8, y, rng.integers(0, 5, 200))
    items = Items(ids(200), {"top1": (pred == y)[None].astype(float), "pred": pred[None], "label": y[None]})
    metrics = {"top1": {"value": 0.8, "statistic": TOP1},
               "mean_per_class_recall": {"value": 0.8, "statistic": {"name": "class_recall"}},
               "cka": {"value": 0.5}}  # no statistic: no interval
    found = metric_intervals(metrics, items, B=400, seed=0)
    assert set(found) == {"top1", "mean_per_class_recall"}
    assert found["top1"]["ci"] == {"method": "bootstrap", "over": "items", "B": 400, "n": 200, "seed": 0}
    assert found["top1"]["ci95"] == bootstrap_ci(TOP1, items, B=400, seed=0)
    lo, hi = found["mean_per_class_recall"]["ci95"]
    assert lo < statistic_value({"name": "class_recall"}, items) < hi
    assert metric_intervals(metrics, None, 400) == {}


def test_a_registered_statistic_and_one_line_errors():
    @register_statistic("top_half")
    def top_half(weights, items, column="top1"):
        return weights[:, : len(items) // 2] @ items.columns[column][0][: len(items) // 2] / weights.sum(1)

    try:
        items = hits([1, 1, 0, 0])
        assert statistic_value({"name": "top_half"}, items) == 0.5
        assert len(bootstrap_ci({"name": "top_half"}, items, B=50)) == 2
    finally:
        bs.STATISTICS.pop("top_half")
    items = hits([1, 0, 1])
    with pytest.raises(SpecError, match="unknown statistic 'nope' .*known: .*class_recall"):
        statistic_value({"name": "nope"}, items)
    with pytest.raises(SpecError, match="statistic 'mean': .*colum"):
        statistic_value({"name": "mean", "colum": "top1"}, items)
    with pytest.raises(DataError, match="no column 'top5' \\(columns: top1\\)"):
        bootstrap_ci({"name": "mean", "column": "top5"}, items)
    with pytest.raises(DataError, match="need columns conf_seed"):
        statistic_value({"name": "miou"}, items)


def test_bootstrap_of_fifty_thousand_images_stays_fast_and_bounded():
    """ImageNet-val sized: 50,000 items, 1000 resamples, in chunks of rows."""
    import time
    rng = np.random.default_rng(0)
    items = hits(rng.random(50_000) < 0.75)
    start = time.perf_counter()
    lo, hi = bootstrap_ci(TOP1, items, B=1000)
    assert time.perf_counter() - start < 60  # ~1 s on an idle core
    assert lo < items.columns["top1"].mean() < hi and hi - lo < 0.02
