"""The GPU extraction paths (autocast, decode on the device) run on CPU with the same arguments."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_imagefolder
from encoder_probe import load_encoder
from encoder_probe.data import ImageFolder
from encoder_probe.data.device_decode import FileBytes, collate_bytes, decode_batch, device_pipeline
from encoder_probe.errors import DataError, SpecError
from encoder_probe.features import extract

ENCODER = "timm:test_vit"


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(ENCODER)


def write_jpegs(root, per_class=3, size=(90, 120)):
    """Smooth photo-like JPEGs (noise would make every decoder/resizer difference look large)."""
    yy, xx = np.mgrid[0:size[0], 0:size[1]]
    for c, name in enumerate(("cat", "dog")):
        (root / "train" / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            phase = c * 3 + i
            rgb = np.stack([np.sin(xx / (9 + phase)), np.cos(yy / (7 + i)), np.sin((xx + yy) / 13)], -1)
            Image.fromarray(((rgb + 1) * 127.5).astype(np.uint8)).save(root / "train" / name / f"{i}.jpg", quality=92)
    return root


def _run(encoder, root, cache, **kw):
    return extract(encoder, ImageFolder(root, "train"), out=cache, batch_size=4, num_workers=0, progress=False,
                   pool=["cls", "mean"], **kw)


def test_bad_settings_are_one_line_spec_errors(tmp_path, encoder):
    data = write_jpegs(tmp_path / "data", per_class=1)
    with pytest.raises(SpecError, match="autocast must be None, 'bf16', 'fp16'; got 'fp8'"):
        _run(encoder, data, tmp_path / "c", autocast="fp8")
    with pytest.raises(SpecError, match="decode must be one of 'auto', 'cpu', 'device'; got 'gpu'"):
        _run(encoder, data, tmp_path / "c", decode="gpu")


def test_bf16_autocast_on_cpu_is_close_stored_float32_and_keyed(tmp_path, encoder):
    data = write_jpegs(tmp_path / "data")
    plain = _run(encoder, data, tmp_path / "c")
    cast = _run(encoder, data, tmp_path / "c", autocast="bf16")
    assert cast.path != plain.path and cast.meta["key"]["autocast"] == "bf16" and "autocast" not in plain.meta["key"]
    a, b = plain.pooled("mean"), cast.pooled("mean")
    assert b.dtype == np.float32 and not np.array_equal(a, b)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()  # bf16 keeps ~3 significant digits


def test_device_decode_pixels_and_features_close_to_pil(tmp_path, encoder):
    data = write_jpegs(tmp_path / "data")
    ds = ImageFolder(data, "train").with_transform(encoder.preprocess)
    pipeline, why = device_pipeline(encoder.preprocess.transform, ds)
    assert pipeline is not None, why
    batch = decode_batch(collate_bytes([FileBytes(ds)[i] for i in range(len(ds))]), pipeline, torch.device("cpu"))
    pil = torch.stack([ds[i]["pixels"] for i in range(len(ds))])
    assert batch["pixels"].shape == pil.shape and batch["index"].tolist() == list(range(len(ds)))
    # the same libjpeg decode; torch's antialiased resize vs PIL's differ by at most 1/255 of a raw pixel
    # (measured: max 0.0078, mean 0.0013 after Normalize here; 0.0175 / 0.0016 for mobilenet_v3_small, bilinear)
    assert (batch["pixels"] - pil).abs().max() < 0.03 and (batch["pixels"] - pil).abs().mean() < 0.005

    cpu = _run(encoder, data, tmp_path / "c", decode="cpu")
    dev = _run(encoder, data, tmp_path / "c", decode="device")
    assert dev.meta["decode"] == {"asked": "device", "used": "device"} and dev.path != cpu.path
    assert dev.meta["key"]["transform"]["decode"] == "device" and "decode" not in cpu.meta["key"]["transform"]
    a, b = cpu.pooled("mean"), dev.pooled("mean")
    assert np.abs(a - b).max() < 0.02 * np.abs(a).max()
    assert _run(encoder, data, tmp_path / "c", decode="auto").path == cpu.path  # auto on CPU = cpu


def test_device_decode_falls_back_with_its_reason(tmp_path, encoder):
    png = write_imagefolder(tmp_path / "png", per_class=2)
    fs = _run(encoder, png, tmp_path / "c", decode="device")
    assert fs.meta["decode"]["used"] == "cpu" and "not a JPEG file" in fs.meta["decode"]["reason"]
    from torchvision import transforms as T
    custom = T.Compose([T.ColorJitter(0.1), T.ToTensor()])
    pipeline, why = device_pipeline(custom, ImageFolder(write_jpegs(tmp_path / "jpg"), "train"))
    assert pipeline is None and "not a plain resize / crop / normalise pipeline (ColorJitter -> ToTensor)" in why


def test_device_decode_bad_file_is_the_one_line_error_naming_it(tmp_path, encoder):
    data = write_jpegs(tmp_path / "data")
    broken = data / "train" / "dog" / "1.jpg"
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(DataError, match=f"^{broken}: unreadable image .*on_bad_image='skip'"):
        _run(encoder, data, tmp_path / "c", decode="device")
    fs = _run(encoder, data, tmp_path / "c", decode="device", on_bad_image="skip")
    assert len(fs) == 5 and [s["path"] for s in fs.meta["skipped"]] == [str(broken)]


def test_cli_passes_autocast_and_decode(tmp_path):
    from encoder_probe.cli import build_parser
    args = build_parser().parse_args(["extract", "--encoder", ENCODER, "--out", str(tmp_path), "--autocast", "bf16",
                                      "--decode", "device"])
    assert (args.autocast, args.decode) == ("bf16", "device")
    args = build_parser().parse_args(["run", "--encoder", ENCODER, "--suite", "imagenet", "--out", str(tmp_path)])
    assert (args.autocast, args.decode) == (None, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["extract", "--encoder", ENCODER, "--out", str(tmp_path), "--decode", "gpu"])


def test_probe_run_defaults_reach_extract(tmp_path, encoder):
    from encoder_probe.runtime import extraction_defaults
    data = write_jpegs(tmp_path / "data", per_class=1)
    old = extraction_defaults(autocast="bf16", decode="device")
    try:
        fs = _run(encoder, data, tmp_path / "c")
    finally:
        extraction_defaults(**old)
    assert fs.meta["key"]["autocast"] == "bf16" and fs.meta["decode"]["used"] == "device"


def test_cpu_plan_balances_workers_and_threads_and_restores_them(tmp_path, encoder, monkeypatch):
    import encoder_probe.features as features
    data = write_jpegs(tmp_path / "data", per_class=4)
    ds = ImageFolder(data, "train").with_transform(encoder.preprocess)
    monkeypatch.setattr(features, "cores", lambda: 2)
    monkeypatch.setattr(features, "_decode_share", lambda enc, ds: 0.4)  # a small model: decoding is 40%
    assert features.cpu_plan(encoder, ds, batch_size=4) == (1, 1)
    monkeypatch.setattr(features, "_decode_share", lambda enc, ds: 0.05)  # a big one: torch keeps both cores
    assert features.cpu_plan(encoder, ds, batch_size=4) == (1, None)
    assert features.cpu_plan(encoder, ds, batch_size=64)[1] is None  # too few images to weigh: the default
    monkeypatch.undo()
    share = features._decode_share(encoder, ds)
    assert 0 < share < 1
    seen = []
    monkeypatch.setattr(features, "cpu_plan", lambda *a, **k: (0, 1))
    monkeypatch.setattr(features._Extraction, "run", lambda self, *a, **k: seen.append(torch.get_num_threads())
                        or (_ for _ in ()).throw(KeyboardInterrupt))
    before = torch.get_num_threads()
    with pytest.raises(KeyboardInterrupt):
        extract(encoder, ds, out=tmp_path / "c", batch_size=4, progress=False)
    assert seen == [1] and torch.get_num_threads() == before
