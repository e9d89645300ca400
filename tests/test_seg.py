"""The `seg` probe: metrics against independent computations, the head, real signal, bad input."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, run_cli, write_ade20k

from encoder_probe import load_encoder
from encoder_probe.segmentation import (confusion_matrix, patch_counts, patch_scores, patch_union_targets,
                                        pixel_scores, upsample_bilinear)
from probes.seg import SegProbe, TokenHead, logit_map


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


@pytest.mark.slow
def test_pretrained_tower_head_beats_its_random_twin_on_demo_data(tmp_path):
    """Real signal on the demo scenes: the ImageNet MobileNetV2's tokens against its random-init twin
    (a tower trained in the test stayed at chance on 240 images; see test_linear_knn)."""
    scores = {}
    options = {"epochs": 3, "lrs": [0.003, 0.03], "show": 3}
    for spec in ("torchvision:mobilenet_v2@imagenet", "torchvision:mobilenet_v2"):
        encoder = load_encoder(spec)
        result = SegProbe().run(encoder, None, options, {"cache": tmp_path / "cache", "out": tmp_path / "out",
                                                         "progress": False})
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
                     "--head", "mlp", "--option", "epochs=2", "--option", "lrs=[0.01, 0.1]", "--seeds", "2")
    assert proc.returncode == 0, proc.stderr
    [results] = out.glob("*/results.json")
    seg = json.loads(results.read_text())["probes"]["seg"]
    assert seg["status"] == "ok" and seg["config"]["head"] == "mlp" and seg["data"]["classes"] == 150
    assert 0 <= seg["metrics"]["mIoU"]["value"] <= 1 and seg["artifacts"]["grid"] == "seg/predictions.png"
    miou = seg["metrics"]["mIoU"]
    assert len(miou["values"]) == 2 and miou["ci95"][0] <= miou["value"] <= miou["ci95"][1]
    assert len(seg["chosen_lr"]) == 2 and len(seg["per_class_iou"]) == 150
    assert (results.parent / "seg" / "predictions.png").is_file()


@pytest.mark.parametrize("problem, message", [
    ("label_above_150", "mask has label 151; labels must be 0..150"),
    ("orphan_annotation", "annotation has no image of the same name"),
    ("missing_annotation", "annotation missing for image"),
    ("empty_split", "no images"),
    ("classification_data", "a segmentation probe needs segmentation data; --data gave only imagenet"),
    ("bad_head", "head must be one of linear, mlp"),
    ("bad_lr", "need positive lrs"),
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
