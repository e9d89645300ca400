"""View `full` against view `base`: extraction cost per token on a real-geometry LLaVA-OneVision tower.

`full` feeds the tower every anyres tile (base + up to 36 tiles of 384 px) of every image, so it
must cost what its token count says and no more: seconds per token within 10% of `base`.

Both views run through the same end-to-end ``extract()`` (decode, the preprocessing, DataLoader
workers, forward, pooling, chunk writes) on the same real photographs (scikit-image / scikit-learn,
five aspect ratios), same tower and batch, one after the other in one process, each the best of
``--rounds`` cold extractions after a warm-up forward. Tokens are counted
two ways: what the tower computes (tiles x 729; the peer figure for cost) and what the LM reads
(base + unpadded tiles, the layout's visual tokens).

    .venv/bin/python benchmarks/full_view.py            # SigLIP so400m/14-384 geometry, width 256, 4 blocks
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def photo_tree(root: Path, repeat: int) -> Path:
    """An ImageFolder tree of the bundled photos (one class per photo), ``repeat`` copies each."""
    from encoder_probe.assets import PHOTOS, photo
    for name in PHOTOS:
        folder = root / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        image = photo(name)
        for k in range(repeat):
            image.save(folder / f"{k:03d}.png")
    return root


def run(spec: str, data, view: str, batch: int, workers: int, cache: Path, rounds: int) -> dict:
    """The best of ``rounds`` cold extractions (each into a fresh cache), after one warm-up forward."""
    import torch
    from encoder_probe import load_encoder
    from encoder_probe.assets import photo
    from encoder_probe.features import extract
    encoder = load_encoder(spec, view=view)
    torch.set_num_threads(os.cpu_count())
    with torch.inference_mode():
        encoder.encode(photo("chelsea"))
    times = []
    for k in range(rounds):
        start = time.perf_counter()
        features = extract(encoder, data, out=cache / f"{view}-{k}", batch_size=batch, num_workers=workers,
                           progress=False)
        times.append(time.perf_counter() - start)
    seconds = min(times)
    n = len(features)
    if view == "full":
        tower_tokens = sum(int(encoder.transform(data.read_image(s)).pixel_values.shape[0]) for s in data.samples) * 729
        visual = int(features.meta["tokens_per_image"]["visual"]["mean"] * n)
    else:
        tower_tokens = visual = n * 729
    return {"view": view, "images": n, "seconds": seconds, "images_per_s": n / seconds,
            "tower_tokens": tower_tokens, "visual_tokens": visual}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2, help="copies of each of the 9 photos")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="cold extractions per view; the best counts")
    args = parser.parse_args()

    import transformers as T
    from encoder_probe.data.imagefolder import ImageFolder
    from encoder_probe.toy import ANYRES_MAX_9, TEXT
    work = Path(tempfile.mkdtemp(prefix="full-view-bench-"))
    try:
        vision = dict(model_type="siglip_vision_model", hidden_size=args.width, intermediate_size=4 * args.width,
                      num_hidden_layers=args.depth, num_attention_heads=max(1, args.width // 64),
                      image_size=384, patch_size=14)
        config = T.LlavaOnevisionConfig(vision_config=vision, text_config=dict(TEXT, num_hidden_layers=1),
                                        vision_feature_layer=-1, vision_feature_select_strategy="full",
                                        image_grid_pinpoints=ANYRES_MAX_9, vision_aspect_ratio="anyres_max_9")
        T.LlavaOnevisionForConditionalGeneration(config).save_pretrained(work / "ckpt")
        data = ImageFolder(photo_tree(work / "photos", args.repeat), "train")
        rows = [run(str(work / "ckpt"), data, view, args.batch, args.workers, work / "cache", args.rounds)
                for view in ("base", "full")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base, full = rows
    print(f"LLaVA-OneVision tower, SigLIP/14-384 geometry, width {args.width}, {args.depth} blocks, "
          f"{base['images']} photos, batch {args.batch}, {args.workers} workers, best of {args.rounds}")
    print("| view | images/s | tower tokens / image | LM visual tokens / image | us per tower token | us per LM token |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['view']} | {r['images_per_s']:.2f} | {r['tower_tokens'] / r['images']:.0f} | "
              f"{r['visual_tokens'] / r['images']:.0f} | {1e6 * r['seconds'] / r['tower_tokens']:.1f} | "
              f"{1e6 * r['seconds'] / r['visual_tokens']:.1f} |")
    ratio = (full["seconds"] / full["tower_tokens"]) / (base["seconds"] / base["tower_tokens"])
    lm_ratio = (full["seconds"] / full["visual_tokens"]) / (base["seconds"] / base["visual_tokens"])
    print(f"cost per tower token, full / base: {ratio:.3f} (target <= 1.10); per LM token: {lm_ratio:.3f}")


if __name__ == "__main__":
    main()
