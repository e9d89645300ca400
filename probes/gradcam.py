"""`gradcam`: gradient maps on the token grid, their raw magnitudes, and how well they localise.

Targets (``target``; "auto" picks mllm > text > head):

- ``head``: the logit of the image's class under the ``imagenet`` probe's own refit head (seed 0:
  its pooling, layer and standardisation), taken from that probe's result in this run, which runs
  first when the suite has not run it yet; so the maps explain the very classifier that probe
  scored, whatever the suite order. ``classifier=model``: the model's own classifier instead (no
  linear probe runs). Images whose class the head does not know (real-masks photos) use the
  head's predicted class, scored against all object pixels.
- ``text``: cosine similarity of the tower's own image embedding with "a photo of a {class}."
  (open_clip, HF CLIP / SigLIP dual-tower dirs).
- ``mllm``: the MLLM's own answer log-likelihood, SFT or DPO loss of VQA records (``--data
  vqa=FILE``, the demo's by default), attributed to the visual tokens its LM reads (the PIVOT map;
  :mod:`encoder_probe.mllm`), for every MLLM family ``load_mllm`` reads, in both views; maps are
  ragged per token and painted on each photo, as in view ``full`` below.

Methods: gradcam, gradient-norm (PIVOT), grad-x-act, all from one batched forward/backward
(:mod:`encoder_probe.attribution`). Localisation (pointing game, energy in mask) against the
object masks of the segmentation data (the demo scenes by default; ``--data real-masks``).
Per-item outcomes: each image's (VQA: ``record:<i>``) ``pointing_game@<method>`` and
``energy_in_mask@<method>`` (NaN: not scored), so the bootstrap and paired comparisons resample
images. Writes ``maps.npz`` (raw maps, per-image magnitudes, classes, scores) and ``overlay.png``.

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

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from encoder_probe.attribution import METHODS, sequence_gradients, token_gradients
from encoder_probe.cache import atomic_write_bytes
from encoder_probe.data.base import IGNORE_INDEX
from encoder_probe.errors import DataError, SpecError
from encoder_probe.items import Items
from encoder_probe.localization import chance, object_masks, scores
from encoder_probe.mllm.model import LOSSES
from encoder_probe.probe import Metric, Needs, Probe, ProbeResult, protocol, runtime, split_config

TARGETS = ("auto", "head", "text", "mllm")
CLASSIFIERS = ("fit", "model")  # head target: the imagenet probe's refit head, or the model's own classifier
SCORES = ("pointing_game", "energy_in_mask")
HEAD_PROBE = "imagenet"  # whose head target head explains
MLLM_SOURCES = ("llava", "hf-mllm", "qwen2-vl")
OVERLAY_SIDE = 256  # view full: overlay rows are photo and painted maps resized to this square


@dataclass
class GradCAMConfig:
    target: str = protocol("auto", choices=TARGETS, help="what the maps explain (auto: mllm > text > head)")
    methods: list[str] = protocol(list(METHODS), choices=tuple(METHODS), help="attribution methods")
    limit: int | None = protocol(60, min=1, help="images (mllm: records) mapped and scored (null: all)")
    classifier: str = protocol("fit", choices=CLASSIFIERS,
                               help="head target: 'fit' = the imagenet probe's refit head, 'model' = its own")
    prompt: str = protocol("a photo of a {}.", help="text target: '{}' is the class name")
    loss: str = protocol("sft", choices=LOSSES, help="mllm target: what the maps explain")
    beta: float = protocol(0.1, gt=0, help="mllm target, loss dpo")
    dpo_reference: str | None = protocol(None, help="mllm target, loss dpo: reference checkpoint (default: itself)")
    tolerance: int = protocol(0, min=0, help="pointing game: pixels of slack around the mask")
    batch_size: int = runtime(16, min=1, help="images per forward/backward")
    overlay_rows: int = runtime(8, min=1, help="images drawn in overlay.png")
    device: str | None = runtime(None, help="mllm target: where the MLLM runs (default: the encoder's device)")
    device_map: str | None = runtime(None, help="mllm target: transformers' device_map ('auto': spread, offload)")
    mllm_dtype: str | None = runtime(None, help="mllm target: load the MLLM in this dtype (default: the encoder's)")

    def check(self):
        if not self.methods:
            raise ValueError(f"methods: give at least one of {', '.join(METHODS)}")
        if "{}" not in self.prompt:
            raise ValueError(f"prompt must contain '{{}}' for the class name, got {self.prompt!r}")


# -- the items a run maps ------------------------------------------------------------------------
def _runs_as_mllm(path: Path) -> bool:
    """An MLLM dir with its tokenizer (what target mllm needs beyond the tower)."""
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def _dominant(mask: torch.Tensor) -> int:
    """The most frequent object label of a train-id mask (-1 when it has none)."""
    labels = mask[(mask != 0) & (mask != IGNORE_INDEX)].long()
    return int(labels.bincount().argmax()) if labels.numel() else -1


def _no_gradient(encoder, kind: str) -> SpecError:
    return SpecError(f"{encoder.spec}: target {kind!r} gives the patch tokens of layer {encoder.layer} no gradient "
                     "(the score reads only prefix tokens, e.g. a CLS-pooled embedding); pick another layer, pool "
                     "or target")


def _plain(iterable, **_):
    """A bar that draws nothing (mapping functions called outside a run)."""
    return iterable


# -- targets -----------------------------------------------------------------------------------------
def _digest(head: dict) -> str:
    """16 hex digits over the head's arrays: the same digest is the same head."""
    h = hashlib.sha256()
    for key in ("weight", "bias", "mean", "std"):
        h.update(np.ascontiguousarray(head[key], dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def _linear_head(ctx):
    """The imagenet probe's refit head (seed 0) from its result in this run, whatever the suite
    order: (target, what it is, the protocol it was fitted under)."""
    from encoder_probe.targets import HeadTarget
    result = ctx.output(HEAD_PROBE)
    head = result.outputs.get("head")
    if head is None:
        why = result.outputs.get("head_unavailable", "it returned none")
        raise SpecError(f"gradcam target head explains the {HEAD_PROBE} probe's refit head, which is not a linear "
                        f"map of one layer's standardised pooled tokens here: {why}")
    target = HeadTarget(ctx.encoder, head["weight"], head["bias"], pool=head["pool"], mean=head["mean"],
                        std=head["std"], layer=head["layer"], class_names=head["class_names"])
    info = {"from": f"the {HEAD_PROBE} probe's refit head", "C": head["C"], "fitted_on": head["root"],
            "pool": head["pool"], "layer": head["layer"], "classes": list(head["class_names"]),
            "digest": _digest(head)}
    top1 = result.metrics.get("top1")
    if top1 is not None:
        info["val_top1"] = (top1.values or [top1.value])[0]  # seed 0's: the head explained here
    return target, info, {"head": split_config(ctx.config_of(HEAD_PROBE))[0]}


def _target(ctx, cfg: GradCAMConfig, kind: str, dataset):
    """(the score the maps explain, details of it, protocol facts of it)."""
    from encoder_probe.targets import TextTarget, own_classifier
    if kind == "text":
        return TextTarget(ctx.encoder, [cfg.prompt.format(n) for n in dataset.class_names]), {}, {}
    if cfg.classifier == "model":
        target, info = own_classifier(ctx.encoder)
        return target, {"head": info}, {}
    target, info, protocol = _linear_head(ctx)
    return target, {"head": info}, protocol


def _resolve_target(encoder, config) -> str:
    from encoder_probe.targets import has_text_tower
    if config.target != "auto":
        return config.target
    path = _mllm_dir(encoder)
    if path is not None and _runs_as_mllm(path):
        return "mllm"
    return "text" if has_text_tower(encoder) else "head"


class GradCAMProbe(Probe):
    name = "gradcam"
    needs = Needs(data=("segmentation", "vqa"), probes=(HEAD_PROBE,))  # the head only for target head + fit
    Config = GradCAMConfig

    def run(self, ctx, cfg: GradCAMConfig) -> ProbeResult:
        encoder = ctx.encoder
        kind = _resolve_target(encoder, cfg)
        full = getattr(encoder, "view", "base") == "full"
        info, protocol, details = {"kind": kind}, {"target": kind}, {}
        if kind == "mllm":
            result, dataset = _map_mllm(ctx, cfg, info)
            ids = [f"record:{i}" for i in result["index"]]
        else:
            dataset = ctx.dataset("segmentation", "val").with_transform(
                encoder.base_preprocess if full else encoder.preprocess)
            rows = list(range(min(len(dataset), cfg.limit or len(dataset))))
            target, about, known = _target(ctx, cfg, kind, dataset)
            info.update(about)
            protocol.update(known)
            details["layers"] = ["final" if kind == "text" else target.layer if target.layer is not None
                                 else encoder.layer]
            result = (_map_all_full if full else _map_all)(encoder, dataset, rows, target, kind, cfg, ctx.bar)
            ids = ctx.item_ids(dataset, rows)
        scored = not np.isnan(result["chance"]).all()  # VQA records without any mask: mapped, not scored
        columns = {f"{score}@{m}": result["scores"][m][score].astype(np.float64)[None]
                   for m in cfg.methods for score in SCORES}
        means = {name: _mean(values[0]) for name, values in columns.items()}
        metrics = {name: Metric(value, statistic={"name": "mean", "column": name})
                   for name, value in means.items() if scored and np.isfinite(value)}
        unscored = {name: "no image could be scored (its map has no positive energy on any image)"
                    for name, value in means.items() if scored and not np.isfinite(value)}  # e.g. signed grad-x-act
        details.update(
            baseline={"mask_fraction": float(np.mean(result["chance"])),
                      "note": "a uniform map's energy_in_mask, and a random point's hit rate in the pointing game"}
            if scored else {"note": "the VQA records have no masks: localisation not scored"},
            magnitudes={m: {"mean_l1": float(result["magnitude"][m][:, 0].mean()),
                            "mean_max": float(result["magnitude"][m][:, 1].mean())} for m in cfg.methods},
            data={"images": len(ids), "root": str(dataset.root),
                  "grid": list(result["grid"]) if result["grid"] is not None else None},
            target=info)
        if kind == "mllm":
            info["loss_value_mean"] = float(result["loss_values"].mean())
        if "offsets" in result:
            counts = np.diff(result["offsets"])
            details["data"].update(view="full" if full else "base", tokens_per_image={
                "min": int(counts.min()), "mean": float(counts.mean()), "max": int(counts.max())})
        artifacts = _write_artifacts(ctx.out, result, dataset, encoder, cfg) if ctx.out is not None else {}
        items = Items(ids, {name: columns[name] for name in metrics}) if metrics else None
        return ProbeResult(metrics=metrics, items=items, details=details, protocol=protocol, artifacts=artifacts,
                           unscored=unscored)


def _mean(values: np.ndarray) -> float:
    """Mean over the scored images (NaN: not scored, e.g. an all-zero map's energy, a record without a mask)."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


def _map_all(encoder, dataset, items, target, kind, config, bar=_plain) -> dict:
    """Maps, magnitudes and localisation scores of every item, batch by batch."""
    maps = {m: [] for m in config.methods}
    per = {m: {"pointing_game": [], "energy_in_mask": []} for m in config.methods}
    keep = {"index": [], "classes": [], "chance": [], "images": [], "inside": [], "labels": []}
    grid = None
    batches = [items[i:i + config.batch_size] for i in range(0, len(items), config.batch_size)]
    for batch in bar(batches, desc=f"{kind} maps", unit="batch"):
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
            raise _no_gradient(encoder, kind)
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


def _map_all_full(encoder, dataset, items, target, kind, config, bar=_plain) -> dict:
    """View full: per-token maps of every image, painted on the photo and scored at its mask's size."""
    batches = [items[i:i + config.batch_size] for i in range(0, len(items), config.batch_size)]

    def entries():
        for batch in bar(batches, desc=f"{kind} maps (view full)", unit="batch"):
            photos, processed, masks = zip(*(_full_item(dataset, i, encoder) for i in batch))
            mask_class = torch.tensor([_dominant(m) for m in masks])
            rows, classes = _rows(target, kind, batch, dataset, mask_class, list(processed))
            grads = sequence_gradients(target, list(processed), rows)
            if not any(g.grad.any() for g in grads):
                raise _no_gradient(encoder, kind)
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


def _map_mllm(ctx, config, extra: dict) -> tuple[dict, object]:
    """The MLLM's own loss on VQA records, attributed to the visual tokens its LM reads (all views,
    or the base view in view base), painted on each photo through the token boxes."""
    from encoder_probe.attribution import SequenceGradients
    from encoder_probe.mllm import base_view, keep_view, load_mllm, loss_gradient, reference_logprobs
    encoder = ctx.encoder
    path = _mllm_dir(encoder)
    if path is None:
        raise SpecError(f"{encoder.spec}: target 'mllm' needs an MLLM checkpoint dir (LLaVA, LLaVA-NeXT, "
                        "LLaVA-OneVision, Qwen2/2.5-VL, InternVL, a LLaVA-NeXT / PIVOT training dir)")
    dataset = ctx.dataset("vqa", "val", demo_fallback=True)
    if ctx.used_demo_for("vqa"):
        extra["note"] = "target mllm reads VQA records (--data vqa=FILE); the demo's were used, --data was not read"
    where = getattr(dataset, "file", dataset.root)
    count = min(len(dataset.records), config.limit or len(dataset.records))
    photos = [_vqa_photo(dataset, i) for i in range(count)]
    items = list(zip(photos, dataset.records[:count]))
    references = [None] * count
    placement = {"device": None if config.device_map else ctx.device_for(config),
                 "dtype": config.mllm_dtype or encoder.dtype, "device_map": config.device_map}
    if config.loss == "dpo" and config.dpo_reference:
        reference = load_mllm(config.dpo_reference, **placement)
        try:
            references = reference_logprobs(reference, ctx.bar(items, desc="dpo reference log-probs", unit="record"))
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        reference.free()  # first, and freed: the policy is loaded only once the reference is gone
        del reference
        extra["dpo_reference"] = str(config.dpo_reference)
    mllm = load_mllm(path, **placement)
    base = getattr(encoder, "view", "base") != "full"
    extra.update(loss=config.loss, family=mllm.family, tokens="base view" if base else "every view the LM reads",
                 records=str(where))
    bar = ctx.bar(items, desc=f"mllm {config.loss} maps", unit="record")

    def entries():
        for i, ((photo, record), ref) in enumerate(zip(bar, references)):
            try:
                g = loss_gradient(mllm, photo, record, config.loss, beta=config.beta, reference=ref)
            except ValueError as e:  # a record the checkpoint's processor or template cannot take
                raise DataError(f"{where}: record {i + 1}: {e}") from None
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
    return encoder.spec.path if encoder.source in MLLM_SOURCES else None


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
    return {"maps": folder / "maps.npz", "overlay": folder / "overlay.png"}


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
    return {"maps": folder / "maps.npz", "overlay": folder / "overlay.png"}
