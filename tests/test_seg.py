"""The `seg` probe: metrics against independent computations, the head, real signal, bad input."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, run_cli, write_ade20k

from encoder_probe import load_encoder
from encoder_probe.bootstrap import statistic_value
from encoder_probe.errors import SpecError
from encoder_probe.items import Items
from encoder_probe.runner import run_probe
from encoder_probe.segmentation import (confusion_matrix, patch_counts, patch_scores, patch_union_targets,
                                        pixel_scores, upsample_bilinear)
from encoder_probe.selection import held_out
from probes.seg import CachedTokens, TokenHead, evaluate_heads, logit_map, predict


def _reference_scores(truth, pred, num_classes, ignore=255):
    """Per class with boolean masks and loops: IoU over the classes with a non-empty union."""
    valid = truth != ignore
    ious = []
    for c in range(num_classes):
        inter = np.sum((truth == c) & (pred == c) & valid)
        union = np.sum(((truth == c) | (pred == c)) & valid)
        if union:
            ious.append(inter / union)
    return float(np.mean(ious)), float(np.sum((truth == pred) & valid) / np.sum(valid))


@pytest.mark.parametrize("seed", range(4))
def test_miou_and_pixel_accuracy_equal_an_independent_computation(seed):
    rng = np.random.default_rng(seed)
    C = 12
    truth = rng.integers(0, C - 2, (5, 37, 29)).astype(np.uint8)  # two classes never in the truth
    truth[rng.random(truth.shape) < 0.2] = 255
    pred = np.where(rng.random(truth.shape) < 0.6, truth, rng.integers(0, C - 1, truth.shape)).astype(np.uint8)
    pred[pred == 255] = 0
    # summed over the split in two halves, as evaluation accumulates batches
    conf = sum(confusion_matrix(torch.from_numpy(truth[s]), torch.from_numpy(pred[s]), C)
               for s in (slice(0, 2), slice(2, 5)))
    got = pixel_scores(conf)
    miou, acc = _reference_scores(truth, pred, C)
    assert got["mIoU"] == pytest.approx(miou, abs=1e-6)
    assert got["pixel_accuracy"] == pytest.approx(acc, abs=1e-6)
    assert got["classes_counted"] == C - 1  # class C-1 is neither in the truth nor predicted
    assert np.isnan(got["iou"][C - 1])


def test_confusion_rejects_labels_outside_the_class_range():
    with pytest.raises(ValueError, match="truth labels must be 0..3"):
        confusion_matrix(torch.tensor([[0, 4]]), torch.tensor([[0, 0]]), 4)


@pytest.mark.parametrize("size, grid", [((32, 48), (4, 6)), ((30, 45), (4, 7)), ((17, 17), (3, 2))])
def test_patch_union_targets_equal_a_loop_over_patches(size, grid):
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 5, (3, *size)).astype(np.uint8)
    masks[rng.random(masks.shape) < 0.3] = 255
    got = patch_union_targets(torch.from_numpy(masks), grid, 5).numpy()
    (H, W), (h, w) = size, grid
    for b in range(3):
        for i in range(h):
            for j in range(w):
                cell = masks[b][[y for y in range(H) if y * h // H == i]][:, [x for x in range(W) if x * w // W == j]]
                present = {int(v) for v in np.unique(cell) if v != 255}
                assert {int(c) for c in np.flatnonzero(got[b, i * w + j])} == present


def test_patch_macro_recall_by_hand():
    truth = torch.tensor([[[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]]], dtype=torch.bool)
    pred = torch.tensor([[[1, 1, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1]]], dtype=torch.bool)
    scores = patch_scores(patch_counts(truth, pred))
    # class 0: 1 of 2 found; class 1: 1 of 1; class 2: 0 of 1
    assert scores["patch_macro_recall"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert scores["patch_macro_precision"] == pytest.approx((1 + 1 / 2 + 0) / 3)


@pytest.mark.parametrize("size, grid", [((224, 224), (7, 7)), ((50, 75), (4, 6)), ((9, 9), (9, 9))])
def test_matmul_upsampling_equals_bilinear_interpolation(size, grid):
    x = torch.randn(2, 3, *grid, dtype=torch.float64)
    expected = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    assert torch.allclose(upsample_bilinear(x, size), expected, atol=1e-10)


def test_token_head_is_batchnorm_plus_1x1_conv():
    """The DINOv2 head written on tokens equals BatchNorm2d + Conv2d(1x1) on the token map."""
    torch.manual_seed(0)
    head = TokenHead("linear", 16, 5)
    bn, conv = torch.nn.BatchNorm2d(16), torch.nn.Conv2d(16, 5, 1)
    bn.load_state_dict(head.norm.state_dict())
    conv.weight.data = head.classify.weight.data[:, :, None, None].clone()
    conv.bias.data = head.classify.bias.data.clone()
    tokens = torch.randn(3, 4 * 6, 16)
    fmap = tokens.transpose(1, 2).reshape(3, 16, 4, 6)
    for mode in ("train", "eval"):
        head.train(mode == "train"), bn.train(mode == "train")
        assert torch.allclose(logit_map(head(tokens), (4, 6)), conv(bn(fmap)), atol=1e-5)


class _GridFeatures:
    """What a base FeatureSet gives CachedTokens (tokens, masks, grid), in memory."""

    def __init__(self, tokens, masks, grid):
        self._tokens, self.masks, self.grid, self.path = tokens, masks, grid, "in-memory"

    def tokens(self, layer=None):
        return self._tokens


def test_per_image_outcomes_sum_to_the_split_confusion_and_patch_counts():
    """Each val image's confusion and patch counts, summed, are what one pass over the whole split
    counts (so mIoU from the items is the split-level mIoU), whatever the batching."""
    rng = np.random.default_rng(0)
    C, grid, n = 6, (3, 4), 7
    masks = np.kron(rng.integers(0, C, (n, *grid)), np.ones((5, 4), np.int64)).astype(np.uint8)
    masks[rng.random(masks.shape) < 0.1] = 255
    features = _GridFeatures(rng.normal(size=(n, grid[0] * grid[1], 8)).astype(np.float16), masks, grid)
    source = CachedTokens(features, [-1], torch.device("cpu"))
    torch.manual_seed(0)
    heads = (TokenHead("linear", 8, C).eval(), TokenHead("linear", 8, C).eval())
    [scores] = evaluate_heads(source, np.arange(n), [heads], C, batch=3, per_image=True)
    x, truth = source.batch(np.arange(n))
    with torch.no_grad():
        split_conf = confusion_matrix(truth, predict(heads[0], x, grid, truth.shape[-2:]), C).numpy()
        split_counts = patch_counts(patch_union_targets(truth, grid, C), heads[1](x) > 0).numpy()
    item, true, pred, count = scores["confusions"].T
    per_image = np.zeros((n, C, C), np.int64)
    np.add.at(per_image, (item, true, pred), count)
    assert (count > 0).all() and np.array_equal(per_image.sum(0), split_conf)
    assert np.array_equal(per_image.sum((1, 2)), (masks != 255).reshape(n, -1).sum(1))  # an image's own pixels
    assert scores["patch_counts"].shape == (n, 3, C) and np.array_equal(scores["patch_counts"].sum(0), split_counts)
    assert scores["mIoU"] == pixel_scores(torch.from_numpy(split_conf))["mIoU"]


@pytest.mark.parametrize("n, fraction, seed", [(6, 0.1, 0), (40, 0.1, 3), (101, 0.25, 7)])
def test_lr_holdout_draws_the_images_it_always_drew(n, fraction, seed):
    """select_and_refit's held-out split (a count: not stratified) is the draw seg made before it
    moved there, so a seed keeps choosing the same learning rates."""
    held = np.sort(np.random.default_rng(seed).choice(n, max(1, int(round(fraction * n))), replace=False))
    fit, got = held_out(n, fraction, seed)
    assert np.array_equal(got, held) and np.array_equal(fit, np.setdiff1d(np.arange(n), held))


@pytest.mark.slow
def test_pretrained_tower_head_beats_its_random_twin_on_demo_data(tmp_path):
    """Real signal on the demo scenes: the ImageNet MobileNetV2's tokens against its random-init twin
    (a tower trained in the test stayed at chance on 240 images; see test_linear_knn)."""
    scores = {}
    options = {"epochs": 3, "lrs": [0.003, 0.03], "show": 3}
    for spec in ("torchvision:mobilenet_v2@imagenet", "torchvision:mobilenet_v2"):
        encoder = load_encoder(spec)
        result = run_probe("seg", encoder, options=options, cache=tmp_path / "cache", out=tmp_path / "out",
                           bootstrap=0)
        scores[spec] = {m: v["value"] for m, v in result["metrics"].items()}
        assert result["data"]["mask_size"] == [224, 224] and result["config"]["grid"] == [7, 7]
        assert len(result["sweep"][0]) == 2 and set(result["chosen_lr"]) <= {0.003, 0.03}
    pretrained, random = scores.values()
    assert pretrained["mIoU"] > 0.3 and pretrained["mIoU"] - random["mIoU"] > 0.15, scores
    assert pretrained["patch_macro_recall"] - random["patch_macro_recall"] > 0.2, scores
    grid = tmp_path / "out" / load_encoder("torchvision:mobilenet_v2@imagenet").fingerprint[:16] / "seg" / "predictions.png"
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (grid.parent / "per_class_iou.csv").read_text().splitlines()
    assert table[0] == "class,iou" and len(table) == 1 + 7


def test_cli_seg_on_an_ade20k_tree(tmp_path):
    data = tmp_path / "ade"
    write_ade20k(data, n=6, num_classes=5, split="training")
    write_ade20k(data, n=3, num_classes=5, split="validation", seed=1)
    proc, out = run_cli(tmp_path, "--encoder", "timm:test_vit", "--suite", "seg", "--data", f"ade20k={data}",
                        "--head", "mlp", "--option", "epochs=2", "--option", "lrs=[0.01, 0.1]", "--seeds", "2",
                        "--bootstrap", "200")
    assert proc.returncode == 0, proc.stderr
    [results] = out.glob("*/results.json")
    seg = json.loads(results.read_text())["probes"]["seg"]
    assert seg["status"] == "ok" and seg["config"]["head"] == "mlp" and seg["data"]["classes"] == 150
    assert 0 <= seg["metrics"]["mIoU"]["value"] <= 1 and seg["artifacts"]["grid"] == "seg/predictions.png"
    assert seg["runtime"]["seeds"] == 2 and "seeds" not in seg["config"] and seg["layers"] == ["final"]
    miou = seg["metrics"]["mIoU"]
    assert len(miou["values"]) == 2 and miou["seed_ci95"][0] <= miou["value"] <= miou["seed_ci95"][1]
    assert miou["ci"]["B"] == 200 and miou["ci"]["n"] == 3 and miou["ci95"][0] <= miou["ci95"][1]
    assert len(seg["chosen_lr"]) == 2 and len(seg["per_class_iou"]) == 150
    assert (results.parent / "seg" / "predictions.png").is_file()
    # per-item outcomes: every val image, both seeds; the statistics recompute the reported numbers
    items = Items.load(results.parent / seg["items"]["file"])
    assert sorted(items.ids) == [f"images/validation/ADE_validation_{i:08d}.jpg" for i in range(3)]
    assert items.meta == {"num_classes": 150, "seeds": 2} and items.columns["patch_counts"].shape == (2, 3, 3, 150)
    for name, metric in seg["metrics"].items():
        assert metric["statistic"] == {"name": {"mIoU": "miou"}.get(name, name)}
        assert statistic_value(metric["statistic"], items) == pytest.approx(metric["value"], abs=1e-9), name
    c = items.columns
    for s in range(2):
        conf = np.zeros((150, 150), np.int64)
        np.add.at(conf, (c["conf_true"][c["conf_seed"] == s], c["conf_pred"][c["conf_seed"] == s]),
                  c["conf_count"][c["conf_seed"] == s])
        scores = pixel_scores(torch.from_numpy(conf))
        assert scores["mIoU"] == pytest.approx(miou["values"][s], abs=1e-12)
        assert scores["classes_counted"] == seg["classes_counted"][s]



@pytest.mark.parametrize("options, key", [({"lrs": [0]}, "seg.lrs must be > 0"),
                                          ({"head": "cnn"}, "seg.head must be one of linear, mlp"),
                                          ({"lrs": []}, "lrs is empty")])
def test_bad_options_fail_before_any_extraction(monkeypatch, options, key):
    import encoder_probe.features

    def no_extraction(*a, **k):
        raise AssertionError("features extracted before the options were checked")
    monkeypatch.setattr(encoder_probe.features, "extract", no_extraction)
    with pytest.raises(SpecError, match=key) as excinfo:
        run_probe("seg", load_encoder("timm:test_vit"), options=options, bootstrap=0)
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize("problem, message", [
    ("label_above_150", "mask has label 151; labels must be 0..150"),
    ("orphan_annotation", "annotation has no image of the same name"),
    ("missing_annotation", "annotation missing for image"),
    ("empty_split", "no images"),
    ("classification_data", "probe 'seg' needs segmentation data; --data gave only imagenet"),
    ("bad_head", "--option head=conv: seg.head must be one of linear, mlp"),
    ("bad_lr", "--option lrs=0: seg.lrs must be > 0"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, problem, message):
    data = tmp_path / "ade"
    write_ade20k(data, n=3, num_classes=5, split="training")
    write_ade20k(data, n=2, num_classes=5, split="validation", seed=1)
    base = data / "ADEChallengeData2016"
    name, extra = "ade20k", []
    if problem == "label_above_150":
        from PIL import Image
        mask = base / "annotations" / "validation" / "ADE_validation_00000001.png"
        Image.fromarray(np.full((48, 64), 151, np.uint8)).save(mask)
    elif problem == "orphan_annotation":
        (base / "images" / "validation" / "ADE_validation_00000001.jpg").unlink()
    elif problem == "missing_annotation":
        (base / "annotations" / "training" / "ADE_training_00000002.png").unlink()
    elif problem == "empty_split":
        for image in (base / "images" / "validation").iterdir():
            image.unlink()
        for mask in (base / "annotations" / "validation").iterdir():
            mask.unlink()
    elif problem == "classification_data":
        from conftest import write_imagefolder
        name, data = "imagenet", write_imagefolder(tmp_path / "inet")
    elif problem == "bad_head":
        extra = ["--option", "head=conv"]
    elif problem == "bad_lr":
        extra = ["--option", "lrs=0"]
    proc, out = run_cli(tmp_path, "--encoder", "timm:test_vit", "--suite", "seg", "--data", f"{name}={data}", *extra)
    assert_one_line_error(proc, message)
    assert not list(out.glob("*/results.json"))
