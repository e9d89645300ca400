"""Built-in demo data: procedural shape scenes written in the real ImageNet and ADE20K layouts.

Used whenever no real dataset is given, so every probe (classification, segmentation, VQA
preferences) runs out of the box and the real dataset readers are exercised on true on-disk
layouts. Each scene has its own RNG seeded by ``(seed, split_id, index)``: a scene never depends
on how many others were made, and two runs write byte-identical files.

A scene is one shape (the class) on a textured background with small clutter (dots, lines).
Everything is drawn at twice the output size and downsampled: the image with LANCZOS
(anti-aliased edges), the label map with NEAREST (labels stay exact).
"""
from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..cache import atomic_dir, atomic_write_json, cache_root

DEMO_VERSION = 1

# Raw label values, ADE20K convention: 0 is "other" (the ADE reader turns it into ignore).
OTHER, BACKGROUND, FIRST_SHAPE = 0, 1, 2

PALETTE = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (245, 220, 20),
    "purple": (140, 40, 190), "orange": (250, 130, 10), "cyan": (20, 210, 220), "white": (245, 245, 245),
}
# Perceptually close wrong answers, so a colour question needs a real look at the object.
NEAR_COLOURS = {
    "red": ("orange", "purple"), "green": ("cyan", "yellow"), "blue": ("cyan", "purple"),
    "yellow": ("orange", "white"), "purple": ("blue", "red"), "orange": ("red", "yellow"),
    "cyan": ("blue", "green"), "white": ("yellow", "cyan"),
}
SHADE = 0.7  # fill textures darken the object's own colour, so its colour name stays right
DOT_COLOURS = (*PALETTE.values(), (20, 20, 20))

SIZES = {"small": (0.20, 0.32), "large": (0.45, 0.70)}  # shape extent as a fraction of the side
MAX_DOTS, MAX_LINES, DOT_TRIES = 5, 3, 30
DOT_RADIUS = (0.025, 0.04)  # fraction of the side: a few pixels at 96x96
AXES = (("left", "right"), ("top", "bottom"))  # position questions: x axis, y axis
CLEAR_SIDE = 0.1  # ask about a half only when the centre is this far from the middle
VQA_PER_SCENE = 2
SPLITS = {"train": ("training", 0), "val": ("validation", 1)}  # split -> (ADE dir, split_id)
ADE = "ade20k/ADEChallengeData2016"


def _pick(rng, options):
    """One of ``options`` (dict keys or a sequence), as its own Python object."""
    options = tuple(options)
    return options[rng.integers(len(options))]


# ---- shapes: each draws its footprint (fill 255) centred at (cx, cy) within radius r -------------

def _regular(n):
    a = -np.pi / 2 + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(a), np.sin(a)], 1)


def _star(points=5, inner=0.5):
    a = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    radius = np.where(np.arange(2 * points) % 2, inner, 1.0)
    return np.stack([np.cos(a), np.sin(a)], 1) * radius[:, None]


def _cross(w=0.3):
    quarter = np.array([(w, -1), (w, -w), (1, -w)])  # the other three are 90-degree turns of it
    pts = np.concatenate([quarter @ np.linalg.matrix_power([[0, 1], [-1, 0]], k) for k in range(4)])
    return pts / np.hypot(*pts.T).max()


def _polygon(unit):
    """A drawer for a polygon given on the unit circle; rotated by ``angle`` degrees."""
    def draw(d, cx, cy, r, angle):
        c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
        pts = unit @ np.array([[c, s], [-s, c]]) * r + (cx, cy)
        d.polygon([tuple(p) for p in pts], fill=255)
    return draw


def _disc(d, cx, cy, r, angle):
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)


def _ring(d, cx, cy, r, angle):
    """An annulus: the hole is cleared, so it is not part of the object's footprint."""
    _disc(d, cx, cy, r, angle)
    d.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=0)


SHAPES = {
    "circle": _disc, "square": _polygon(_regular(4)), "triangle": _polygon(_regular(3)),
    "star": _polygon(_star()), "cross": _polygon(_cross()), "ring": _ring,
}
DEMO_CLASSES = tuple(SHAPES)


# ---- textures: float RGB backgrounds and boolean fill patterns over pixel grids xx, yy ------------

def _muted(rng):
    """A greyish colour, so palette-coloured objects and clutter stand out from the background."""
    return np.clip(rng.uniform(70, 170) + rng.uniform(-25, 25, 3), 0, 255)


def _bands(xx, yy, angle, period):
    return (xx * np.cos(angle) + yy * np.sin(angle)) // (period / 2) % 2 == 1


def _two_tone(on, rng):
    return np.where(on[..., None], _muted(rng), _muted(rng))


def _flat_noise(rng, xx, yy):
    return _muted(rng) + rng.normal(0, 8, xx.shape + (3,))


def _stripes(rng, xx, yy):
    return _two_tone(_bands(xx, yy, rng.uniform(0, np.pi), rng.uniform(10, 28)), rng)


def _checker(rng, xx, yy):
    cell = rng.integers(8, 25)
    return _two_tone((xx // cell + yy // cell) % 2 == 1, rng)


def _gradient(rng, xx, yy):
    a = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(a) + yy * np.sin(a)
    t = ((t - t.min()) / (t.max() - t.min()))[..., None]
    return (1 - t) * _muted(rng) + t * _muted(rng)


BACKGROUNDS = {"flat": _flat_noise, "stripes": _stripes, "checker": _checker, "gradient": _gradient}


def _solid(rng, xx, yy):
    return np.zeros(xx.shape, bool)


def _striped(rng, xx, yy):
    return _bands(xx, yy, rng.uniform(0, np.pi), rng.uniform(6, 12))


def _dotted(rng, xx, yy):
    period = rng.uniform(7, 11)
    ox, oy = rng.uniform(0, period, 2)
    dx, dy = (xx + ox) % period - period / 2, (yy + oy) % period - period / 2
    return np.hypot(dx, dy) < 0.28 * period


FILLS = {"solid": _solid, "striped": _striped, "dotted": _dotted}


# ---- one scene ------------------------------------------------------------------------------------

def _sample_object(rng, name, big):
    size = _pick(rng, SIZES)
    extent = rng.uniform(*SIZES[size])
    r = extent * big / 2
    cx, cy = rng.uniform(r + 1, big - r - 1, 2)
    return dict(name=name, colour=_pick(rng, PALETTE), size=size, extent=extent, r=r, cx=cx, cy=cy,
                rotation=rng.uniform(0, 360), fill=_pick(rng, FILLS))


def _footprint(obj, big):
    mask = Image.new("L", (big, big), 0)
    SHAPES[obj["name"]](ImageDraw.Draw(mask), obj["cx"], obj["cy"], obj["r"], obj["rotation"])
    return np.asarray(mask) > 0


def _draw_lines(rng, draws, big):
    n = rng.integers(0, MAX_LINES + 1)
    width = max(1, round(big * 0.012))
    for _ in range(n):
        ends, colour = rng.uniform(0, big, 4).tolist(), tuple(rng.integers(0, 256, 3).tolist())
        for d, fill in zip(draws, (colour, OTHER)):
            d.line(ends, fill=fill, width=width)
    return int(n)


def _draw_dots(rng, draws, big, box):
    """Dots clear of the object's bounding box and of each other, so each stays visible and countable."""
    x0, y0, x1, y1 = box
    margin, placed = 0.02 * big, []
    for _ in range(rng.integers(0, MAX_DOTS + 1)):
        r, colour = rng.uniform(*DOT_RADIUS) * big, _pick(rng, DOT_COLOURS)
        for _ in range(DOT_TRIES):
            x, y = rng.uniform(r + 1, big - r - 1, 2)
            gap = r + margin
            off_object = x < x0 - gap or x > x1 + gap or y < y0 - gap or y > y1 + gap
            if off_object and all(np.hypot(x - px, y - py) > r + pr + margin for px, py, pr in placed):
                for d, fill in zip(draws, (colour, OTHER)):
                    d.ellipse([x - r, y - r, x + r, y + r], fill=fill)
                placed.append((x, y, r))
                break
    return placed


def render_scene(seed: int, split_id: int, index: int, size: int = 96) -> tuple[Image.Image, np.ndarray, dict]:
    """One scene: RGB image, raw label map (H, W) uint8, metadata. Class is ``index % 6``.

    Clutter is drawn before the object, so the object's labels win wherever they meet.
    """
    rng = np.random.default_rng([seed, split_id, index])
    big = 2 * size
    yy, xx = np.mgrid[0:big, 0:big].astype(float)
    name = DEMO_CLASSES[index % len(DEMO_CLASSES)]
    obj = _sample_object(rng, name, big)
    footprint = _footprint(obj, big)
    ys, xs = np.nonzero(footprint)

    background = _pick(rng, BACKGROUNDS)
    image = Image.fromarray(np.clip(BACKGROUNDS[background](rng, xx, yy), 0, 255).astype(np.uint8))
    labels = Image.new("L", (big, big), BACKGROUND)
    draws = (ImageDraw.Draw(image), ImageDraw.Draw(labels))
    n_lines = _draw_lines(rng, draws, big)
    dots = _draw_dots(rng, draws, big, (xs.min(), ys.min(), xs.max(), ys.max()))

    colour = np.array(PALETTE[obj["colour"]], float)
    pattern = FILLS[obj["fill"]](rng, xx, yy)
    pixels, label = np.array(image), np.array(labels)
    pixels[footprint] = np.where(pattern[..., None], colour * SHADE, colour).astype(np.uint8)[footprint]
    label[footprint] = FIRST_SHAPE + DEMO_CLASSES.index(name)

    out = Image.fromarray(pixels).resize((size, size), Image.Resampling.LANCZOS)
    label = np.asarray(Image.fromarray(label).resize((size, size), Image.Resampling.NEAREST))

    def frac(v):
        return round(float(v) / big, 4)

    meta = {
        "class": name, "colour": obj["colour"], "size": obj["size"], "extent": round(float(obj["extent"]), 4),
        "position": [frac(obj["cx"]), frac(obj["cy"])], "rotation": round(float(obj["rotation"]), 2),
        "fill": obj["fill"], "background": background, "n_lines": n_lines,
        "n_dots": len(dots), "dots": [[frac(x), frac(y), frac(r)] for x, y, r in dots],
    }
    return out, label, meta


# ---- VQA preference records -----------------------------------------------------------------------

def _colour_q(meta, rng):
    return f"What colour is the {meta['class']}?", meta["colour"], _pick(rng, NEAR_COLOURS[meta["colour"]])


def _clear_axes(meta):
    return [axis for axis in range(2) if abs(meta["position"][axis] - 0.5) > CLEAR_SIDE]


def _position_q(meta, rng):
    axis = _pick(rng, _clear_axes(meta))
    low, high = AXES[axis]
    chosen = high if meta["position"][axis] > 0.5 else low
    return (f"Is the {meta['class']} in the {low} or the {high} half of the image?",
            chosen, high if chosen == low else low)


def _count_q(meta, rng):
    n = meta["n_dots"]
    wrong = n + 1 if n == 0 else n + _pick(rng, (-1, 1))
    return "How many dots are in the image?", str(n), str(wrong)


def _size_q(meta, rng):
    wrong = next(s for s in SIZES if s != meta["size"])
    return f"Is the {meta['class']} large or small?", meta["size"], wrong


QUESTIONS = {"colour": _colour_q, "position": _position_q, "count": _count_q, "size": _size_q}


def vqa_records(meta: dict, rng) -> list[dict]:
    """A few preference records for one scene; position only when the object is clearly on one side."""
    kinds = [k for k in QUESTIONS if k != "position" or _clear_axes(meta)]
    picked = sorted(rng.choice(len(kinds), VQA_PER_SCENE, replace=False))
    records = []
    for kind in (kinds[i] for i in picked):
        question, chosen, rejected = QUESTIONS[kind](meta, rng)
        records.append({"image": meta["image"], "question": question, "chosen": chosen,
                        "rejected": rejected, "kind": kind})
    return records


def _vqa_jsonl(metas, seed):
    """All records of a split; each scene's questions come from its own stream (stream 1 of its seed)."""
    records = (rec for m in metas
               for rec in vqa_records(m, np.random.default_rng([seed, SPLITS[m["split"]][1], m["index"], 1])))
    return "".join(json.dumps(rec) + "\n" for rec in records)


# ---- the on-disk layout ---------------------------------------------------------------------------

def _scene_paths(split, index, name):
    ade_split, stem = SPLITS[split][0], f"{split}_{index:05d}"
    return {"stem": stem, "image": f"imagenet/{split}/{name}/{name}_{index:05d}.png",
            "ade_image": f"{ADE}/images/{ade_split}/{stem}.jpg",
            "ade_annotation": f"{ADE}/annotations/{ade_split}/{stem}.png"}


def _write_scene(root, split, index, size, seed):
    """Write one scene in both layouts; returns its metadata and its label histogram."""
    image, label, meta = render_scene(seed, SPLITS[split][1], index, size)
    meta = {"split": split, "index": index, **_scene_paths(split, index, meta["class"]), **meta}
    for key in ("image", "ade_image", "ade_annotation"):
        (root / meta[key]).parent.mkdir(parents=True, exist_ok=True)
    image.save(root / meta["image"])
    image.save(root / meta["ade_image"], quality=95, subsampling=0)
    Image.fromarray(label).save(root / meta["ade_annotation"])
    return meta, np.bincount(label.ravel(), minlength=FIRST_SHAPE + len(DEMO_CLASSES))


def _object_info(hists):
    """ADE's objectInfo150.txt, computed from the masks: pixel ratio and images per split."""
    total = sum(h.sum() for split in hists for h in hists[split])
    names = ("background", *DEMO_CLASSES)
    rows = ["Idx\tRatio\tTrain\tVal\tName"]
    for idx, name in enumerate(names, start=BACKGROUND):
        pixels = sum(h[idx] for split in hists for h in hists[split])
        train, val = (sum(int(h[idx] > 0) for h in hists[split]) for split in SPLITS)
        rows.append(f"{idx}\t{pixels / total:.4f}\t{train}\t{val}\t{name}")
    return "\n".join(rows) + "\n"


def generate_demo(root, *, train_per_class: int = 40, val_per_class: int = 10, size: int = 96,
                  seed: int = 0) -> Path:
    """Write the full layout into ``root`` (which must not exist), atomically. Returns ``root``."""
    root = Path(root)
    if root.exists():
        raise FileExistsError(f"demo data root already exists: {root}")
    if size < 32 or train_per_class < 1 or val_per_class < 0:
        raise ValueError("demo data needs size >= 32, train_per_class >= 1 and val_per_class >= 0")
    params = dict(train_per_class=train_per_class, val_per_class=val_per_class, size=size, seed=seed)
    counts = {"train": train_per_class * len(DEMO_CLASSES), "val": val_per_class * len(DEMO_CLASSES)}
    with atomic_dir(root) as tmp:
        scenes, hists = {s: [] for s in SPLITS}, {s: [] for s in SPLITS}
        with tqdm(total=sum(counts.values()), desc="demo data", unit="scene", disable=None) as bar:
            for split, n in counts.items():
                for i in range(n):
                    meta, hist = _write_scene(tmp, split, i, size, seed)
                    scenes[split].append(meta)
                    hists[split].append(hist)
                    bar.update()
        (tmp / "imagenet").mkdir(exist_ok=True)
        (tmp / "imagenet/LOC_synset_mapping.txt").write_text("".join(f"{c} {c}\n" for c in DEMO_CLASSES))
        (tmp / ADE).mkdir(parents=True, exist_ok=True)
        (tmp / ADE / "objectInfo150.txt").write_text(_object_info(hists))
        (tmp / "vqa").mkdir()
        for split, metas in scenes.items():
            (tmp / "vqa" / f"{split}.jsonl").write_text(_vqa_jsonl(metas, seed))
        atomic_write_json(tmp / "manifest.json", {
            "generator": "encoder_probe.data.demo", "version": DEMO_VERSION, "params": params,
            "classes": list(DEMO_CLASSES), "counts": counts,
            "labels": {str(OTHER): "other", str(BACKGROUND): "background",
                       **{str(FIRST_SHAPE + i): c for i, c in enumerate(DEMO_CLASSES)}},
            "scenes": scenes,
        })
    return root


def demo_data(cache_dir=None, **params) -> Path:
    """The demo root for ``params`` under ``cache_dir`` (default :func:`cache_root`); built once, reused after.

    The directory name hashes the full parameter set (defaults filled in), so equal requests share it.
    """
    defaults = {k: p.default for k, p in inspect.signature(generate_demo).parameters.items()
                if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise TypeError(f"demo_data got unknown parameters {unknown}; known: {sorted(defaults)}")
    params = {**defaults, **params}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir if cache_dir is not None else cache_root()) / f"demo-v{DEMO_VERSION}-{digest}"
    if not root.is_dir():
        try:
            generate_demo(root, **params)
        except FileExistsError:
            pass  # another process finished the identical build first
    return root
