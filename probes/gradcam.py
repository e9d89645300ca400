"""`gradcam`: gradient maps on the token grid, their raw magnitudes, and how well they localise.

Targets (``target``; "auto" picks mllm > text > head):

- ``head``: the logit of the image's class under a linear head on the pooled tokens of the
  encoder's layer, fitted here on the classification data (sklearn's objective, C=``C``, on
  standardised features; the demo data by default). Images whose class the head does not know
  (real-masks photos) use the head's predicted class, scored against all object pixels.
- ``text``: cosine similarity of the tower's own image embedding with "a photo of a {class}."
  (open_clip, HF CLIP / SigLIP dual-tower dirs).
- ``mllm``: the MLLM's own answer log-likelihood, SFT or DPO loss of VQA records (``--data
  vqa=FILE``, the demo's by default), attributed to the visual tokens its LM reads (the PIVOT map;
  :mod:`encoder_probe.mllm`), for every MLLM family ``load_mllm`` reads, in both views; maps are
  ragged per token and painted on each photo, as in view ``full`` below.

Methods: gradcam, gradient-norm (PIVOT), grad-x-act, all from one batched forward/backward
(:mod:`encoder_probe.attribution`). Localisation (pointing game, energy in mask) against the
object masks of the segmentation data (the demo scenes by default; ``--data real-masks``).
Writes ``maps.npz`` (raw maps, per-image magnitudes, classes, scores) and ``overlay.png``.

View ``full`` (MLLM encoders reading several views): maps are per token
over each image's whole sequence (:func:`encoder_probe.attribution.sequence_gradients`; Grad-CAM
per view), painted onto the ORIGINAL image through the token boxes (``TokenLayout.paint``,
bilinear, views averaged where they overlap) and scored against the masks at the original
resolution; pixels no view covers are not scored. ``maps.npz`` then holds the raw per-token maps
ragged: ``map/<method>`` flat over all images' tokens, ``map_offsets`` (N+1,) where image i's tokens
are ``[offsets[i], offsets[i+1])``, ``layouts`` (one JSON TokenLayout per image, to paint them
again); ``painted/<method>`` holds the overlay rows' maps painted at ``OVERLAY_SIDE`` square, as
``images`` and ``inside``.
"""
from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from encoder_probe.attribution import METHODS, sequence_gradients, token_gradients
from encoder_probe.cache import atomic_write_bytes
from encoder_probe.errors import DataError, SpecError
from encoder_probe.localization import chance, object_masks, scores
from encoder_probe.probe import artifact_dir, config_from, config_hash, pick_dataset, summarize

TARGETS = ("auto", "head", "text", "mllm")
OVERLAY_SIDE = 256  # view full: overlay rows are photo and painted maps resized to this square


@dataclass
class GradCAMConfig:
    target: str = "auto"
    methods: list = field(default_factory=lambda: list(METHODS))
    limit: int | None = 60  # images (mllm: records) mapped and scored
    batch_size: int = 16
    pool: str = "mean"  # head target: pooling the head reads
    C: float = 1.0  # head target: inverse regularisation of the fitted head
    classifier: str = "fit"  # head target: "fit" a head here, or the "model"'s own classifier (ImageNet models)
    per_class: int | None = None  # head target: train images per class for the fit
    prompt: str = "a photo of a {}."  # text target
    loss: str = "sft"  # mllm target: logprob | sft | dpo
    beta: float = 0.1  # mllm target, dpo
    dpo_reference: str | None = None  # mllm target, dpo: reference checkpoint (default: the model itself)
    mllm_dtype: str | None = None  # mllm target: load the MLLM in this dtype (bf16, fp16; default the encoder's)
    device_map: str | None = None  # mllm target: transformers' device_map ("auto": spread over GPUs, offload to CPU)
    tolerance: int = 0  # pointing game: pixels of slack around the mask
    overlay_rows: int = 8
    device: str | None = None

    @classmethod
    def from_options(cls, options: dict | None) -> "GradCAMConfig":
        config = config_from(cls, options)
        if isinstance(config.methods, str):
            config.methods = [m.strip() for m in config.methods.split(",") if m.strip()]
        unknown = [m for m in config.methods if m not in METHODS]
        if unknown or not config.methods:
            raise SpecError(f"gradcam: unknown method(s) {unknown or '(none given)'}; choose from {', '.join(METHODS)}")
        if config.target not in TARGETS:
            raise SpecError(f"gradcam: target must be one of {', '.join(TARGETS)}, got {config.target!r}")
        if config.batch_size < 1 or (config.limit is not None and config.limit < 1) or config.tolerance < 0:
            raise SpecError("gradcam: need batch_size >= 1, limit >= 1 (or null) and tolerance >= 0")
        from encoder_probe.mllm.model import LOSSES
        if config.loss not in LOSSES:
            raise SpecError(f"gradcam: mllm loss must be one of {', '.join(LOSSES)}, got {config.loss!r}")
        if config.classifier not in ("fit", "model"):
            raise SpecError(f"gradcam: classifier must be 'fit' or 'model', got {config.classifier!r}")
        if "{}" not in config.prompt:
            raise SpecError(f"gradcam: prompt must contain '{{}}' for the class name, got {config.prompt!r}")
        return config


# -- the items a run maps ------------------------------------------------------------------------
def _runs_as_mllm(path: Path) -> bool:
    """An MLLM dir with its tokenizer (what target mllm needs beyond the tower)."""
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def _mask_dataset(data, preprocess, limit):
    from encoder_probe.data import open_dataset
    name, root = pick_dataset(data, "segmentation", default="ade20k")
    dataset = open_dataset(name, root, "val").with_transform(preprocess)
    return dataset, range(min(len(dataset), limit or len(dataset)))


def _dominant(mask: torch.Tensor) -> int:
    """The most frequent object label of a train-id mask (-1 when it has none)."""
    labels = mask[(mask != 0) & (mask != 255)].long()
    return int(labels.bincount().argmax()) if labels.numel() else -1


# -- targets -----------------------------------------------------------------------------------------
def _saved_head(encoder, data, config, context):
    """The `imagenet` probe's own refit head from this run's output (same pooling, layer and data), or None."""
    import json

    from safetensors.numpy import load_file

    from encoder_probe.data import open_dataset
    from encoder_probe.targets import HeadTarget
    out = context.get("out")
    path = Path(out) / encoder.fingerprint[:16] / "imagenet" / "head.safetensors" if out is not None else None
    if path is None or not path.is_file():
        return None
    from safetensors import safe_open
    with safe_open(str(path), "np") as f:
        meta = f.metadata() or {}
    name, root = pick_dataset(data, "classification", default="imagenet")
    if (meta.get("pool"), meta.get("layer"), meta.get("root")) != \
            (config.pool, json.dumps(encoder.layer), str(open_dataset(name, root, "train").root)):
        return None  # a head of another protocol or dataset (an older run in the same directory)
    arrays = load_file(str(path))
    names = json.loads(meta["class_names"])
    head = HeadTarget(encoder, arrays["weight"], arrays["bias"], pool=config.pool, mean=arrays["mean"],
                      std=arrays["std"], class_names=names)
    return head, {"from": "the imagenet probe's refit head", "file": str(path), "fitted_on": meta["root"],
                  "classes": names}


def _fit_head(encoder, data, config, context):
    """A logistic head on standardised pooled features of the classification data."""
    from encoder_probe.data import DATASETS
    from encoder_probe.logreg import LogisticRegression
    from encoder_probe.probe import labelled_arrays
    from encoder_probe.targets import HeadTarget
    labelled = {k: v for k, v in (data or {}).items() if DATASETS[k].task == "classification"} or None
    x, y, xv, yv, train = labelled_arrays(encoder, labelled, config, context)
    mean, std = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=config.C, device=config.device, n_classes=len(train.class_names))
    clf.fit((x - mean) / std, y)
    weight, bias = clf.head()  # full width: two classes are sklearn's binomial model, as logits (0, w.x + b)
    head = HeadTarget(encoder, weight, bias, pool=config.pool,
                      mean=mean, std=std, class_names=train.class_names)
    info = {"fitted_on": train.meta["data"]["root"], "train": len(y), "C": config.C,
            "val_top1": clf.score((xv - mean) / std, yv), "classes": train.class_names}
    return head, info


def _resolve_target(encoder, config) -> str:
    from encoder_probe.targets import has_text_tower
    if config.target != "auto":
        return config.target
    path = _mllm_dir(encoder)
    if path is not None and _runs_as_mllm(path):
        return "mllm"
    return "text" if has_text_tower(encoder) else "head"


class GradCAMProbe:
    name = "gradcam"
    needs = ("masks",)

    def run(self, encoder, data, options=None, context=None) -> dict:
        start = time.perf_counter()
        context = context or {}
        config = GradCAMConfig.from_options(options)
        kind = _resolve_target(encoder, config)
        full = getattr(encoder, "view", "base") == "full"
        extra = {}
        if kind == "mllm":
            result, dataset = _map_mllm(encoder, data, config, context, extra)
            items = result["index"]
        else:
            dataset, rows = _mask_dataset(data, encoder.base_preprocess if full else encoder.preprocess,
                                          config.limit)
            items = list(rows)
            if kind == "head":
                from encoder_probe.targets import own_classifier
                target, extra["head"] = own_classifier(encoder) if config.classifier == "model" else \
                    _saved_head(encoder, data, config, context) or _fit_head(encoder, data, config, context)
            elif kind == "text":
                from encoder_probe.targets import TextTarget
                names = dataset.class_names
                target = TextTarget(encoder, [config.prompt.format(n) for n in names])
            else:
                raise SpecError(f"gradcam: unknown target {kind!r}")
        if kind != "mllm":
            result = (_map_all_full if full else _map_all)(encoder, dataset, items, target, kind, config,
                                                          context.get("progress", True))
        used = {**asdict(config), "target": kind, "layer": encoder.layer}
        means = {f"{score}@{m}": _mean(result["scores"][m][score])
                 for m in config.methods for score in ("pointing_game", "energy_in_mask")}
        out = {
            "metrics": {name: summarize([value]) for name, value in means.items() if np.isfinite(value)},
            "baseline": {"mask_fraction": float(np.mean(result["chance"])),
                         "note": "a uniform map's energy_in_mask, and a random point's pointing-game hit rate"},
            "magnitudes": {m: {"mean_l1": float(result["magnitude"][m][:, 0].mean()),
                               "mean_max": float(result["magnitude"][m][:, 1].mean())} for m in config.methods},
            "data": {"images": len(items), "root": str(dataset.root),
                     "grid": list(result["grid"]) if result["grid"] is not None else None},
            "target": {"kind": kind, **extra},
            "config": used, "config_hash": config_hash(used),
        }
        unscored = sorted(name for name, value in means.items() if not np.isfinite(value))
        if unscored and not np.isnan(result["chance"]).all():  # e.g. a signed grad-x-act map with no positive part
            out["unscored"] = {name: "no image could be scored (its map has no positive energy on any image)"
                               for name in unscored}
        if kind == "mllm":
            out["target"]["loss_value_mean"] = float(result["loss_values"].mean())
            if np.isnan(result["chance"]).all():
                out["metrics"] = {}
                out["baseline"] = {"note": "the VQA records have no masks: localisation not scored"}
        if "offsets" in result:
            counts = np.diff(result["offsets"])
            out["data"].update(view="full" if full else "base", tokens_per_image={"min": int(counts.min()), "mean": float(counts.mean()),
                                                              "max": int(counts.max())})
        folder = artifact_dir(encoder, context, self.name)
        if folder is not None:
            out["artifacts"] = _write_artifacts(folder, result, dataset, encoder, config)
        out["wall_s"] = round(time.perf_counter() - start, 3)
        return out


def _mean(values: np.ndarray) -> float:
    """Mean over the scored images (NaN: not scored, e.g. an all-zero map's energy, a record without a mask)."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


def _map_all(encoder, dataset, items, target, kind, config, progress) -> dict:
    """Maps, magnitudes and localisation scores of every item, batch by batch."""
    from tqdm.auto import tqdm
    maps = {m: [] for m in config.methods}
    per = {m: {"pointing_game": [], "energy_in_mask": []} for m in config.methods}
    keep = {"index": [], "classes": [], "chance": [], "images": [], "inside": [], "labels": []}
    grid = None
    batches = [items[i:i + config.batch_size] for i in range(0, len(items), config.batch_size)]
    from encoder_probe.encoders.registry import short_spec
    bar = tqdm(batches, desc=f"gradcam [{short_spec(encoder.spec)}] {kind} maps", unit="batch", disable=not progress,
               file=sys.stderr)
    for batch in bar:
        index = list(batch)
        samples = [dataset[i] for i in index]
        bad = [s for s in samples if not isinstance(s, dict)]
        if bad:
            raise DataError(f"{bad[0].path}: {bad[0].reason}")
        pixels = torch.stack([s["pixels"] for s in samples]).to(encoder.device)
        masks = torch.stack([s["mask"] for s in samples])
        mask_class = torch.tensor([_dominant(m) for m in masks])
        rows, classes = _rows(target, kind, batch, dataset, mask_class, pixels)
        act, grad = token_gradients(target, pixels, rows)
        if not grad.any():
            raise SpecError(f"{encoder.spec}: target {kind!r} gives the patch tokens of layer {encoder.layer} no "
                            "gradient (the score reads only prefix tokens, e.g. a CLS-pooled embedding); "
                            "pick another layer, pool or target")
        out = {m: METHODS[m].from_gradients(act, grad) for m in config.methods}
        inside, valid = object_masks(masks, classes)
        grid = tuple(next(iter(out.values())).shape[-2:])
        for m, values in out.items():
            values = values.cpu()
            maps[m].append(values)
            for name, v in scores(values, inside, valid, config.tolerance).items():
                per[m][name].append(v)
        keep["index"] += index
        keep["classes"].append(classes)
        keep["chance"].append(chance(inside, valid))
        if len(keep["images"]) < config.overlay_rows:
            room = config.overlay_rows - len(keep["images"])
            keep["images"] += [s["pixels"] for s in samples][:room]
            keep["inside"].append(inside[:room])
            keep["labels"] += _labels(target, kind, rows)[:room]
    maps = {m: torch.cat(v).numpy() for m, v in maps.items()}
    return {"maps": maps, "grid": grid, "index": np.array(keep["index"]),
            "classes": torch.cat(keep["classes"]).numpy(), "chance": torch.cat(keep["chance"]).numpy(),
            "scores": {m: {k: torch.cat(v).numpy() for k, v in s.items()} for m, s in per.items()},
            "magnitude": {m: np.stack([np.abs(v).sum((1, 2)), np.abs(v).max((1, 2))], 1) for m, v in maps.items()},
            "images": torch.stack(keep["images"]), "labels": keep["labels"],
            "inside": torch.cat(keep["inside"]).numpy()}


def _full_item(dataset, index: int, encoder):
    """View full: (original photo, ``encoder.transform(photo)``, (H, W) train-id mask at the original size)."""
    sample = dataset.samples[index]
    try:
        image = dataset.read_image(sample)
        labels = dataset.map_labels(dataset.read_mask(sample))
    except Exception as e:  # the readers' own errors, an out-of-range label
        raise DataError(f"{sample.path}: {' '.join(str(e).split())[:200]}") from None
    if labels.shape != (image.height, image.width):
        raise DataError(f"{sample.mask}: mask is {labels.shape[1]}x{labels.shape[0]} but its image is "
                        f"{image.width}x{image.height}")
    return image, encoder.transform(image), torch.from_numpy(np.ascontiguousarray(labels))


def _map_all_full(encoder, dataset, items, target, kind, config, progress) -> dict:
    """View full: per-token maps of every image, painted on the photo and scored at its mask's size."""
    from tqdm.auto import tqdm

    from encoder_probe.encoders.registry import short_spec
    batches = [items[i:i + config.batch_size] for i in range(0, len(items), config.batch_size)]
    bar = tqdm(batches, desc=f"gradcam [{short_spec(encoder.spec)}] {kind} maps (view full)", unit="batch",
               disable=not progress, file=sys.stderr)

    def entries():
        for batch in bar:
            photos, processed, masks = zip(*(_full_item(dataset, i, encoder) for i in batch))
            mask_class = torch.tensor([_dominant(m) for m in masks])
            rows, classes = _rows(target, kind, batch, dataset, mask_class, list(processed))
            grads = sequence_gradients(target, list(processed), rows)
            if not any(g.grad.any() for g in grads):
                raise SpecError(f"{encoder.spec}: target {kind!r} gives the patch tokens of layer {encoder.layer} "
                                "no gradient (the score reads only prefix tokens, e.g. a CLS-pooled embedding); "
                                "pick another layer, pool or target")
            for j, (g, photo, mask) in enumerate(zip(grads, photos, masks)):
                yield g, photo, mask, int(classes[j]), _labels(target, kind, rows[j:j + 1])[0]

    return _collect(entries(), list(items), config)


def _collect(entries, index, config) -> dict:
    """Raw per-token maps of every (gradients, photo, mask, class, label) entry, their magnitudes, and
    their localisation scores: each map painted on its photo through the token boxes, scored at the
    mask's resolution (pixels no view reads cannot be pointed at); a photo without a mask is not scored."""
    from PIL import Image

    from encoder_probe.segmentation import covered
    maps = {m: [] for m in config.methods}
    per = {m: {"pointing_game": [], "energy_in_mask": []} for m in config.methods}
    keep = {"classes": [], "chance": [], "images": [], "inside": [], "labels": [], "layouts": [],
            "painted": {m: [] for m in config.methods}}
    side = OVERLAY_SIDE
    for g, photo, mask, cls, label in entries:
        size = tuple(mask.shape) if mask is not None else (photo.height, photo.width)
        if mask is not None:
            inside, valid = object_masks(mask[None], torch.tensor([cls]))
            valid = valid & covered(g.layout, size)[None]  # pixels no view reads cannot be pointed at
        else:
            inside = valid = torch.zeros(1, *size, dtype=torch.bool)
        show = len(keep["images"]) < config.overlay_rows
        for m in config.methods:
            token_map = METHODS[m].from_sequence(g.act, g.grad, g.layout).cpu()
            maps[m].append(token_map)
            if mask is not None:
                painted = g.layout.paint(token_map, size)
                for name, v in scores(painted[None], inside, valid, config.tolerance).items():
                    per[m][name].append(v)
            else:
                for name in per[m]:
                    per[m][name].append(torch.tensor([float("nan")]))
            if show:
                keep["painted"][m].append(g.layout.paint(token_map, (side, side)))
        keep["chance"].append(chance(inside, valid) if mask is not None else torch.tensor([float("nan")]))
        keep["layouts"].append(json.dumps(g.layout.to_dict()))
        keep["classes"].append(cls)
        if show:
            keep["images"].append(np.asarray(photo.convert("RGB").resize((side, side), Image.BILINEAR)))
            ys = ((torch.arange(side) + 0.5) * size[0] / side).long()
            xs = ((torch.arange(side) + 0.5) * size[1] / side).long()
            keep["inside"].append(inside[0][ys[:, None], xs[None, :]])
            keep["labels"].append(label)
    offsets = np.concatenate([[0], np.cumsum([len(v) for v in maps[config.methods[0]]])]).astype(np.int64)
    return {"maps": {m: torch.cat(v).numpy() for m, v in maps.items()}, "offsets": offsets, "grid": None,
            "layouts": np.array(keep["layouts"]), "index": np.array(index),
            "classes": np.array(keep["classes"], np.int64), "chance": torch.cat(keep["chance"]).numpy(),
            "scores": {m: {k: torch.cat(v).numpy() for k, v in s.items()} for m, s in per.items()},
            "magnitude": {m: np.array([[float(v.abs().sum()), float(v.abs().max())] for v in vs], np.float32)
                          for m, vs in maps.items()},
            "images": np.stack(keep["images"]), "labels": keep["labels"],
            "inside": torch.stack(keep["inside"]).numpy(),
            "painted": {m: torch.stack(v).numpy() for m, v in keep["painted"].items()}}


def _map_mllm(encoder, data, config, context, extra: dict) -> tuple[dict, object]:
    """The MLLM's own loss on VQA records, attributed to the visual tokens its LM reads (all views,
    or the base view in view base), painted on each photo through the token boxes."""
    from tqdm.auto import tqdm

    from encoder_probe.attribution import SequenceGradients
    from encoder_probe.encoders.registry import short_spec
    from encoder_probe.mllm import base_view, keep_view, load_mllm, loss_gradient, reference_logprobs
    path = _mllm_dir(encoder)
    if path is None:
        raise SpecError(f"{encoder.spec}: target 'mllm' needs an MLLM checkpoint dir (LLaVA, LLaVA-NeXT, "
                        "LLaVA-OneVision, Qwen2/2.5-VL, InternVL, a LLaVA-NeXT / PIVOT training dir)")
    dataset = _vqa_records(data)
    if data and "vqa" not in data:
        extra["note"] = "target mllm reads VQA records (--data vqa=FILE); the demo's were used, --data was not read"
    count = min(len(dataset.records), config.limit or len(dataset.records))
    photos = [_vqa_photo(dataset, i) for i in range(count)]
    items = list(zip(photos, dataset.records[:count]))
    progress = context.get("progress", True)
    references = [None] * count
    placement = {"device": None if config.device_map else encoder.device,
                 "dtype": config.mllm_dtype or encoder.dtype, "device_map": config.device_map}
    if config.loss == "dpo" and config.dpo_reference:
        reference = load_mllm(config.dpo_reference, **placement)
        try:
            references = reference_logprobs(reference, tqdm(items, desc="gradcam dpo reference log-probs",
                                                             unit="record", disable=not progress, file=sys.stderr))
        except ValueError as e:
            raise DataError(f"{getattr(dataset, 'file', dataset.root)}: {e}") from None
        reference.free()  # first, and freed: the policy is loaded only once the reference is gone
        del reference
        extra["dpo_reference"] = str(config.dpo_reference)
    mllm = load_mllm(path, **placement)
    base = getattr(encoder, "view", "base") != "full"
    extra.update(loss=config.loss, family=mllm.family,
                 tokens="base view" if base else "every view the LM reads",
                 records=str(getattr(dataset, "file", dataset.root)))
    bar = tqdm(items, desc=f"gradcam [{short_spec(encoder.spec)}] mllm {config.loss} maps", unit="record",
               disable=not progress, file=sys.stderr)

    def entries():
        for i, ((photo, record), ref) in enumerate(zip(bar, references)):
            try:
                g = loss_gradient(mllm, photo, record, config.loss, beta=config.beta, reference=ref)
            except ValueError as e:  # a record the checkpoint's processor or template cannot take
                raise DataError(f"{getattr(dataset, 'file', dataset.root)}: record {i + 1}: {e}") from None
            if base:
                g = keep_view(g, base_view(g.layout))
            seen.append(g.value)
            mask = dataset.labels(i)
            yield SequenceGradients(g.act, g.grad, g.layout), photo, \
                None if mask is None else torch.from_numpy(np.ascontiguousarray(mask)), -1, \
                f"{record['question'][:28]} {record['chosen']}"

    seen = []
    result = _collect(entries(), list(range(count)), config)
    result["loss_values"] = np.array(seen, np.float64)
    return result, dataset


def _mllm_dir(encoder) -> Path | None:
    """The checkpoint dir of an encoder read from an MLLM (any family, LLaVA-NeXT / PIVOT dirs)."""
    if encoder.source not in ("llava", "hf-mllm", "qwen2-vl"):
        return None
    return Path(encoder.spec.split("@")[0])


def _vqa_records(data):
    from encoder_probe.data import open_dataset
    name, root = pick_dataset(data if data and "vqa" in data else None, "vqa", default="vqa")
    return open_dataset(name, root, "val")


def _vqa_photo(dataset, i):
    from encoder_probe.data.images import load_rgb
    sample = dataset.samples[i]
    try:
        photo = load_rgb(sample.path)
        mask = dataset.labels(i)
    except Exception as e:  # the readers' own errors
        raise DataError(f"{sample.path}: {' '.join(str(e).split())[:200]}") from None
    if mask is not None and mask.shape != (photo.height, photo.width):
        raise DataError(f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                        f"{photo.width}x{photo.height}")
    return photo


def _rows(target, kind, batch, dataset, mask_class, pixels):
    """What each image's score selects, and the mask class it is scored against (-1: any object)."""
    if kind == "text":
        return mask_class.clamp(min=0), mask_class
    known = {name: i for i, name in enumerate(target.class_names)}
    names = [dataset.class_names[c] if c >= 0 else None for c in mask_class.tolist()]
    predicted = target.predict(pixels).cpu()
    rows = torch.tensor([known.get(n, int(p)) for n, p in zip(names, predicted)])
    classes = torch.tensor([c if n in known else -1 for c, n in zip(mask_class.tolist(), names)])
    return rows, classes


def _labels(target, kind, rows) -> list[str]:
    """Row labels of the overlay: the class or text scored."""
    names = target.texts if kind == "text" else target.class_names
    return [names[int(r)][:32] for r in rows]


def _write_artifacts(folder: Path, result: dict, dataset, encoder, config) -> dict:
    from encoder_probe.overlay import denormalize, overlay_grid
    if "offsets" in result:
        return _write_full_artifacts(folder, result, dataset, config)
    images = denormalize(result["images"], encoder.preprocess.mean, encoder.preprocess.std)
    arrays = {"index": result["index"], "classes": result["classes"], "chance": result["chance"],
              "images": (images * 255).round().astype(np.uint8), "inside": result["inside"],
              "class_names": np.array(dataset.class_names)}
    for m in config.methods:
        arrays[f"map/{m}"] = result["maps"][m]
        arrays[f"magnitude/{m}"] = result["magnitude"][m]  # (N, 2): L1 sum, max of the raw map
        for name, v in result["scores"][m].items():
            arrays[f"{name}/{m}"] = v
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(folder / "maps.npz", buffer.getvalue())
    n = len(images)
    overlay_grid(images, {m: result["maps"][m][:n] for m in config.methods}, folder / "overlay.png",
                 masks=result["inside"], row_labels=result["labels"])
    rel = folder.name
    return {"maps": f"{rel}/maps.npz", "overlay": f"{rel}/overlay.png"}


def _write_full_artifacts(folder: Path, result: dict, dataset, config) -> dict:
    """View full: ragged raw token maps (flat + offsets + layouts), overlay rows painted at OVERLAY_SIDE."""
    from encoder_probe.overlay import overlay_grid
    arrays = {"index": result["index"], "classes": result["classes"], "chance": result["chance"],
              "images": result["images"], "inside": result["inside"], "class_names": np.array(dataset.class_names),
              "view": np.array("full"), "map_offsets": result["offsets"], "layouts": result["layouts"]}
    for m in config.methods:
        arrays[f"map/{m}"] = result["maps"][m].astype(np.float32)  # flat raw per-token maps of every image
        arrays[f"painted/{m}"] = result["painted"][m]  # the overlay rows', on the photo at OVERLAY_SIDE square
        arrays[f"magnitude/{m}"] = result["magnitude"][m]  # (N, 2): L1 sum, max of the raw token map
        for name, v in result["scores"][m].items():
            arrays[f"{name}/{m}"] = v
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(folder / "maps.npz", buffer.getvalue())
    overlay_grid(result["images"].astype(np.float32) / 255, {m: result["painted"][m] for m in config.methods},
                 folder / "overlay.png", masks=result["inside"], row_labels=result["labels"])
    return {"maps": f"{folder.name}/maps.npz", "overlay": f"{folder.name}/overlay.png"}
