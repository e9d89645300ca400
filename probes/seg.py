"""`seg`: a segmentation head on frozen patch tokens, scored by mIoU (DINOv2's linear ADE20K protocol).

The head is BatchNorm + 1x1 conv on the token grid (``head="mlp"``: a hidden layer + GELU);
its logits are upsampled bilinearly to the label map (the encoder's input resolution, see
``data.transforms.SegmentationTransform``) and trained with cross-entropy, ignore index 255, AdamW,
linear warm-up then cosine decay. Tokens are read from the extraction cache (float16), so no
epoch re-runs the encoder; all heads of the learning-rate grid train together on the same
batches (one read feeds every head, as DINOv2's evaluation does).

Protocol: the learning rate is chosen on a seeded held-out 10% of the *train* images (heads fit on
the other 90%); the winner is refit on all of train and scored once on val. A multi-label patch
head (BCE on the classes present in each patch) gives the patch-seg "union" macro recall the
PIVOT paper reports; see ``encoder_probe.segmentation`` for exactly what each metric counts.

View ``full`` (MLLM encoders reading several views: anyres base + tiles, InternVL tiles +
thumbnail, Qwen's native grid): the cache holds every image's ragged token sequence, its
``TokenLayout`` and its mask at the ORIGINAL resolution (:class:`RaggedTokens`). The same head runs
on every token; its logits are painted onto the image through the token boxes (``TokenLayout.paint``,
bilinear within a view, views averaged where they overlap) and CE is taken on pixels: during
training on the mask shrunk (nearest) to at most ``FULL_TRAIN_SIDE`` px on its long side, for the
scores at the original resolution, confusion summed over the split as for base. A token's patch-seg
label is the set of classes of the pixels whose centres fall in its box.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from encoder_probe.errors import DataError, SpecError
from encoder_probe.probe import (artifact_dir, config_from, config_hash, last_layers, pick_dataset,
                                 summarize)
from encoder_probe.segmentation import (IGNORE_INDEX, confusion_matrix, layout_union_targets, paint_logits,
                                        paint_operators, patch_counts, patch_scores, patch_union_targets,
                                        pixel_scores, upsample_bilinear)

HEADS = ("linear", "mlp")
FULL_TRAIN_SIDE = 512  # view full: long side of the label map the pixel CE trains on (scores: original size)


@dataclass
class SegConfig:
    head: str = "linear"
    last_layers: int = 1  # 4 = DINOv2's concatenation of the last four blocks
    lrs: list = field(default_factory=lambda: [1e-3, 3e-3, 1e-2, 3e-2])
    epochs: int = 10
    head_batch: int = 16  # images per optimiser step
    weight_decay: float = 1e-4
    warmup: float = 0.1  # fraction of the steps spent warming up
    hidden: int = 512  # width of the mlp head
    holdout: float = 0.1
    seeds: int = 1
    show: int = 4  # validation images in the PNG grid
    batch_size: int = 32  # extraction batch
    device: str | None = None

    @classmethod
    def from_options(cls, options: dict | None) -> "SegConfig":
        config = config_from(cls, options)
        if isinstance(config.lrs, (int, float)):  # --option lrs=0.01
            config.lrs = [config.lrs]
        if config.head not in HEADS:
            raise SpecError(f"seg probe: head must be one of {', '.join(HEADS)}, got {config.head!r}")
        if not config.lrs or min(config.lrs) <= 0 or config.epochs < 1 or config.head_batch < 1:
            raise SpecError("seg probe: need positive lrs, epochs >= 1 and head_batch >= 1")
        if not 0 < config.holdout < 1 or config.seeds < 1 or config.last_layers < 1 or not 0 <= config.warmup < 1:
            raise SpecError("seg probe: need 0 < holdout < 1, seeds >= 1, last_layers >= 1 and 0 <= warmup < 1")
        return config


# -- heads -------------------------------------------------------------------------------------
class TokenHead(nn.Module):
    """DINOv2's linear segmentation head, BatchNorm + 1x1 conv, applied to tokens directly.

    BatchNorm1d over the (B*h*w, D) tokens is BatchNorm2d over the (B, D, h, w) map and a Linear
    is a 1x1 conv, so this is the same head without the layout round trip. ``kind="mlp"`` puts a
    hidden layer + GELU before the classifier. (B, h*w, D) -> (B, h*w, C).
    """

    def __init__(self, kind: str, dim: int, num_classes: int, hidden: int = 512):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)
        self.classify = nn.Linear(dim, num_classes) if kind == "linear" else \
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, D = tokens.shape
        return self.classify(self.norm(tokens.reshape(B * N, D))).view(B, N, -1)


def logit_map(logits: torch.Tensor, grid) -> torch.Tensor:
    """(B, h*w, C) head output -> (B, C, h, w)."""
    return logits.transpose(1, 2).reshape(logits.shape[0], logits.shape[2], *grid)


def warmup_cosine(optimizer, total_steps: int, warmup: float):
    """Linear warm-up over ``warmup`` of the steps, then cosine decay to zero."""
    warm = max(1, int(round(warmup * total_steps))) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -- data --------------------------------------------------------------------------------------
class CachedTokens:
    """Batches of (tokens as a (B, D, h, w) map, masks) read from cached FeatureSets, never the encoder."""

    def __init__(self, features, layers, device, dtype=torch.float32):
        self.tokens = [features.tokens(layer) for layer in layers]
        if len({t.shape[:2] for t in self.tokens}) > 1:
            raise SpecError(f"{features.path}: layers {layers} have different token grids; "
                            f"last_layers needs blocks of one grid")
        self.masks, self.grid, self.device, self.dtype = features.masks, features.grid, device, dtype
        self.dim = sum(t.shape[2] for t in self.tokens)

    def __len__(self) -> int:
        return len(self.masks)

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, h*w, D) tokens (layers side by side), (B, H, W) long masks."""
        rows = np.sort(rows)  # memmap reads in file order
        x = torch.cat([torch.from_numpy(np.ascontiguousarray(t[rows])) for t in self.tokens], dim=2)
        return x.to(self.device, self.dtype), torch.from_numpy(np.ascontiguousarray(self.masks[rows])).to(self.device).long()

    # what train_heads / evaluate_heads ask of a token source (RaggedTokens answers the same for view full)
    def pixel_loss(self, logits, masks):
        return _pixel_loss(logits, masks, self.grid)

    def patch_targets(self, masks, num_classes: int) -> torch.Tensor:
        return patch_union_targets(masks, self.grid, num_classes)

    def confusion(self, head, x, masks, num_classes: int) -> torch.Tensor:
        return confusion_matrix(masks, predict(head, x, self.grid, masks.shape[-2:]), num_classes)

    def predictions(self, head, x, masks) -> list[np.ndarray]:
        return list(predict(head, x, self.grid, masks.shape[-2:]).cpu().numpy())

    def truths(self, masks) -> list[np.ndarray]:
        return list(masks.cpu().numpy())


def _pixel_loss(logits, masks, grid):
    return F.cross_entropy(upsample_bilinear(logit_map(logits, grid), masks.shape[-2:]), masks,
                           ignore_index=IGNORE_INDEX)


class RaggedBatch:
    """The images of one view-full batch: token counts, layouts, masks at the original resolution."""

    def __init__(self, counts: list[int], layouts: list, masks: list[torch.Tensor]):
        self.counts, self.layouts, self.masks = counts, layouts, masks

    def split(self, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(1, sum N_i, C) head output -> per image (N_i, C)."""
        return logits[0].split(self.counts)


def _shrunk(mask: torch.Tensor, side: int) -> torch.Tensor:
    """Nearest (pixel-centre) resize of a label map to at most ``side`` px on its long side."""
    H, W = mask.shape
    scale = side / max(H, W)
    if scale >= 1:
        return mask
    h, w = max(1, round(H * scale)), max(1, round(W * scale))
    ys = ((torch.arange(h, device=mask.device) + 0.5) * H / h).long().clamp(max=H - 1)
    xs = ((torch.arange(w, device=mask.device) + 0.5) * W / w).long().clamp(max=W - 1)
    return mask[ys[:, None], xs[None, :]]


def _paint(logits, layout, size):
    """(N, C) -> (C, H, W) through the token boxes (``TokenLayout.paint``, as separable GEMMs)."""
    return paint_logits(logits, layout, size, paint_operators(layout, size, logits.device))


class RaggedTokens:
    """View full: batches of every image's own token sequence from a ragged FeatureSet.

    Reads ``features.token_rows(i, layer)`` (N_i, D), ``features.layout(i)`` (TokenLayout) and
    ``features.mask(i)`` ((H_i, W_i) train ids at the original resolution, 255 ignore).
    ``batch(rows)`` -> ((1, sum N_i, D) tokens, :class:`RaggedBatch`): the head is per token, so
    its BatchNorm sees the batch's tokens as one set, as the base head sees B*h*w tokens.
    """

    ragged = True
    grid = None

    def __init__(self, features, layers, device, dtype=torch.float32, train_side: int = FULL_TRAIN_SIDE):
        self.features, self.layers = features, list(layers)
        self.device, self.dtype, self.train_side = device, dtype, train_side
        self._layouts: dict[int, object] = {}
        first = [np.asarray(features.token_rows(0, layer)) for layer in self.layers] if len(features) else []
        self.dim = sum(t.shape[1] for t in first)

    def __len__(self) -> int:
        return len(self.features)

    def layout(self, i: int):
        if i not in self._layouts:
            self._layouts[i] = self.features.layout(i)
        return self._layouts[i]

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, RaggedBatch]:
        xs, layouts, masks = [], [], []
        for i in (int(r) for r in np.sort(rows)):
            xs.append(torch.cat([torch.from_numpy(np.array(self.features.token_rows(i, layer), np.float32))
                                 for layer in self.layers], dim=1))
            layouts.append(self.layout(i))
            masks.append(torch.from_numpy(np.array(self.features.mask(i))).to(self.device).long())
        x = torch.cat(xs)[None].to(self.device, self.dtype)
        return x, RaggedBatch([len(t) for t in xs], layouts, masks)

    def pixel_loss(self, logits, batch: RaggedBatch):
        """Mean CE over the valid pixels of the batch's (shrunk) masks, logits painted through the boxes."""
        total, count = logits.new_zeros(()), 0
        for z, layout, mask in zip(batch.split(logits), batch.layouts, batch.masks):
            mask = _shrunk(mask, self.train_side)
            painted = _paint(z, layout, tuple(mask.shape))
            total = total + F.cross_entropy(painted[None], mask[None], ignore_index=IGNORE_INDEX, reduction="sum")
            count += int((mask != IGNORE_INDEX).sum())
        return total / max(count, 1)

    def patch_targets(self, batch: RaggedBatch, num_classes: int) -> torch.Tensor:
        """(1, sum N_i, C) bool: each token's class set from the pixels inside its box."""
        return torch.cat([layout_union_targets(m, layout, num_classes)
                          for layout, m in zip(batch.layouts, batch.masks)])[None]

    def predictions(self, head, x, batch: RaggedBatch) -> list[np.ndarray]:
        """Per image, the (H_i, W_i) argmax of the logits painted at the mask's resolution."""
        return [_paint(z, layout, tuple(m.shape)).argmax(0).cpu().numpy()
                for z, layout, m in zip(batch.split(head(x)), batch.layouts, batch.masks)]

    def confusion(self, head, x, batch: RaggedBatch, num_classes: int) -> torch.Tensor:
        conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=x.device)
        for z, layout, m in zip(batch.split(head(x)), batch.layouts, batch.masks):
            conf += confusion_matrix(m, _paint(z, layout, tuple(m.shape)).argmax(0), num_classes)
        return conf

    def truths(self, batch: RaggedBatch) -> list[np.ndarray]:
        return [m.cpu().numpy() for m in batch.masks]


def token_source(features, layers, device):
    """The head's token source for a FeatureSet: grid batches (view base) or ragged sequences (full)."""
    return RaggedTokens(features, layers, device) if getattr(features, "ragged", False) else \
        CachedTokens(features, layers, device)


def train_heads(source, rows: np.ndarray, lrs: list, config: SegConfig, num_classes: int, seed: int,
                desc: str = "seg heads", progress: bool = False) -> list[tuple[nn.Module, nn.Module]]:
    """Train, for every lr, a pixel head (CE) and a patch head (BCE on patch class sets) on ``rows``.

    Every batch is read once and feeds all heads. Returns [(pixel_head, patch_head)] in ``lrs`` order.
    ``progress``: a bar named ``desc`` on stderr, one step per batch (shown whether or not stderr
    is a terminal, as the feature extraction's bars are; the run's ``progress`` flag turns it off).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    steps_per_epoch = math.ceil(len(rows) / config.head_batch)
    bank = []
    for lr in lrs:
        pair = (TokenHead(config.head, source.dim, num_classes, config.hidden),
                TokenHead(config.head, source.dim, num_classes, config.hidden))
        for head in pair:
            head.to(source.device).train()
            opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=config.weight_decay)
            bank.append((head, opt, warmup_cosine(opt, steps_per_epoch * config.epochs, config.warmup)))
    with tqdm(total=steps_per_epoch * config.epochs, desc=desc, unit="step", disable=not progress,
              file=sys.stderr) as bar:
        for _ in range(config.epochs):
            order = rng.permutation(rows)
            for start in range(0, len(order), config.head_batch):
                x, masks = source.batch(order[start:start + config.head_batch])
                targets = source.patch_targets(masks, num_classes).to(x.dtype)
                for i, (head, opt, sched) in enumerate(bank):
                    logits = head(x)
                    if i % 2 == 0:
                        loss = source.pixel_loss(logits, masks)
                    else:
                        loss = F.binary_cross_entropy_with_logits(logits, targets)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                bar.update()
    heads = [head.eval() for head, _, _ in bank]
    return list(zip(heads[0::2], heads[1::2]))


@torch.no_grad()
def evaluate_heads(source, rows: np.ndarray, pairs, num_classes: int, batch: int = 16) -> list[dict]:
    """Scores of every (pixel head, patch head) pair on ``rows``, summed over all of them."""
    conf = [torch.zeros(num_classes, num_classes, dtype=torch.long, device=source.device) for _ in pairs]
    counts = [torch.zeros(3, num_classes, dtype=torch.long, device=source.device) for _ in pairs]
    for start in range(0, len(rows), batch):
        x, masks = source.batch(rows[start:start + batch])
        truth = source.patch_targets(masks, num_classes)
        for i, (pixel, patch) in enumerate(pairs):
            conf[i] += source.confusion(pixel, x, masks, num_classes)
            counts[i] += patch_counts(truth, patch(x) > 0)
    return [{**pixel_scores(c), **patch_scores(n)} for c, n in zip(conf, counts)]


def predict(head: nn.Module, x: torch.Tensor, grid, size) -> torch.Tensor:
    """(B, H, W) class map: logits upsampled bilinearly to the label size, then argmax."""
    return upsample_bilinear(logit_map(head(x), grid), tuple(size)).argmax(1)


def holdout_images(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-out rows): a seeded ``fraction`` of the train images, at least one."""
    if n < 2:
        raise DataError(f"seg probe: the train split has {n} image(s); holding some out for the lr choice needs 2")
    held = np.sort(np.random.default_rng(seed).choice(n, max(1, int(round(fraction * n))), replace=False))
    return np.setdiff1d(np.arange(n), held), held


def run_protocol(train, val, config: SegConfig, num_classes: int, seed: int, *, label: str = "",
                 progress: bool = False) -> dict:
    """lr chosen on held-out train images, refit on all train, val scored once; returns val scores.

    ``label`` names the encoder in the progress bars: ``seg [timm:vit_small…] lr sweep``."""
    fit, held = holdout_images(len(train), config.holdout, seed)
    name = f"seg [{label}]" if label else "seg"
    of_seed = f" (seed {seed + 1}/{config.seeds})" if config.seeds > 1 else ""
    sweep = evaluate_heads(train, held, train_heads(train, fit, config.lrs, config, num_classes, seed,
                                                    desc=f"{name} lr sweep{of_seed}", progress=progress),
                           num_classes)
    best_pixel = int(np.nanargmax([s["mIoU"] for s in sweep]))
    best_patch = int(np.nanargmax([s["patch_macro_f1"] for s in sweep]))
    lrs = [config.lrs[best_pixel], config.lrs[best_patch]]
    final = train_heads(train, np.arange(len(train)), lrs, config, num_classes, seed,
                        desc=f"{name} refit{of_seed}", progress=progress)
    pixel_head, patch_head = final[0][0], final[1][1]
    scores = evaluate_heads(val, np.arange(len(val)), [(pixel_head, patch_head)], num_classes)[0]
    return {**scores, "lr": lrs[0], "patch_lr": lrs[1], "pixel_head": pixel_head,
            "sweep": [{"lr": lr, "heldout_mIoU": s["mIoU"], "heldout_patch_macro_f1": s["patch_macro_f1"]}
                      for lr, s in zip(config.lrs, sweep)]}


# -- pictures ----------------------------------------------------------------------------------
def palette(num_classes: int) -> np.ndarray:
    """(C + 1, 3) uint8 colours; the last row (ignore) is black."""
    import matplotlib
    colours = matplotlib.colormaps["tab20"](np.arange(num_classes) % 20)[:, :3]
    colours *= 1 - 0.35 * ((np.arange(num_classes) // 20) % 3)[:, None] / 2  # darker cycles past 20
    return np.vstack([(colours * 255).astype(np.uint8), [[0, 0, 0]]])


def prediction_grid(dataset, indices, truth, predictions, num_classes: int, path, *, original: bool = False) -> None:
    """Image, ground truth and prediction per row: at the encoder's input (base view, the pixels
    de-normalised), or on the original photos (``original``: view full, prediction painted from every view)."""
    from matplotlib.figure import Figure

    from encoder_probe.cache import save_png
    colours = palette(num_classes)
    fig = Figure(figsize=(7.5, 2.5 * len(indices)))
    axes = fig.subplots(len(indices), 3, squeeze=False)
    for row, (index, gt, pred) in enumerate(zip(indices, truth, predictions)):
        if original:
            image = np.asarray(dataset.read_image(dataset.samples[int(index)]))
        else:
            mean, std = np.array(dataset.preprocess.mean), np.array(dataset.preprocess.std)
            image = (dataset[int(index)]["pixels"].permute(1, 2, 0).numpy() * std + mean).clip(0, 1)
        gt = np.where(gt == IGNORE_INDEX, num_classes, gt)
        for ax, picture, title in zip(axes[row], (image, colours[gt], colours[pred]),
                                      ("image", "ground truth", "prediction (all views)" if original else "prediction")):
            ax.imshow(picture)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title)
    fig.tight_layout()
    save_png(fig, path, dpi=80)


# -- the probe ---------------------------------------------------------------------------------
def segmentation_features(encoder, data, config: SegConfig, context: dict, layers):
    """(train FeatureSet, val FeatureSet, val dataset) with tokens and masks; default: the demo ADE20K."""
    from encoder_probe.data import open_dataset
    from encoder_probe.features import extract
    name, root = pick_dataset(data, "segmentation", default="ade20k")
    splits = [open_dataset(name, root, split) for split in ("train", "val")]
    features = [extract(encoder, dataset, out=context.get("cache"), layers=layers, pool="mean", tokens=True,
                        batch_size=config.batch_size, progress=context.get("progress", True)) for dataset in splits]
    return features[0], features[1], splits[1]  # an empty split is refused by its reader


class SegProbe:
    name = "seg"
    needs = ("masks",)

    def run(self, encoder, data, options=None, context=None) -> dict:
        start = time.perf_counter()
        context = context or {}
        config = SegConfig.from_options(options)
        train_set, val_set, val_data = segmentation_features(encoder, data, config, context,
                                                             last_layers(encoder, config.last_layers))
        num_classes = train_set.meta["data"]["num_classes"]
        device = torch.device(config.device or "cpu")
        ragged = bool(getattr(train_set, "ragged", False))
        train, val = (token_source(f, f.layers, device) for f in (train_set, val_set))
        from encoder_probe.encoders.registry import short_spec
        runs = [run_protocol(train, val, config, num_classes, seed, label=short_spec(encoder.spec),
                             progress=context.get("progress", True)) for seed in range(config.seeds)]

        names = train_set.class_names
        ious = np.array([r["iou"] for r in runs], dtype=float)
        seen = np.isfinite(ious).sum(0)  # a class no seed saw (nor predicted) has no IoU, not a warning
        per_class = np.where(seen > 0, np.nansum(ious, axis=0) / np.maximum(seen, 1), np.nan)
        used = {**asdict(config), "layers": train_set.layers, "grid": None if ragged else list(train_set.grid)}
        if ragged:  # base configs (and their hashes) stay what they were
            used["view"] = "full"
        result = {
            "metrics": {m: summarize([r[m] for r in runs]) for m in ("mIoU", "pixel_accuracy", "patch_macro_recall")},
            "per_class_iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, per_class)},
            "classes_counted": [r["classes_counted"] for r in runs],
            "chosen_lr": [r["lr"] for r in runs], "chosen_patch_lr": [r["patch_lr"] for r in runs],
            "sweep": [r["sweep"] for r in runs],
            "data": {"train": len(train), "val": len(val), "classes": num_classes,
                     "root": train_set.meta["data"]["root"],
                     "mask_size": "original" if ragged else list(val_set.masks.shape[1:])},
            "config": used, "config_hash": config_hash(used), "wall_s": round(time.perf_counter() - start, 3),
        }
        out = artifact_dir(encoder, context, self.name)
        if out is not None and config.show > 0:
            result["artifacts"] = self._write_artifacts(out, runs[0]["pixel_head"], val, val_set, val_data,
                                                        result["per_class_iou"], config.show, num_classes)
        return result

    @staticmethod
    def _write_artifacts(out, head, val, val_set, val_data, per_class_iou, show, num_classes) -> dict:
        from encoder_probe.cache import atomic_write_bytes
        rows = np.arange(min(show, len(val)))
        x, masks = val.batch(rows)
        with torch.no_grad():
            pred = val.predictions(head, x, masks)
        truth = val.truths(masks)
        if getattr(val, "ragged", False):
            prediction_grid(val_data, val_set.index[rows], truth, pred, num_classes, out / "predictions.png",
                            original=True)
        else:
            prediction_grid(val_data, val_set.index[rows], np.stack(truth), np.stack(pred), num_classes,
                            out / "predictions.png")
        table = "class,iou\n" + "".join(f"{n},{'' if v is None else f'{v:.6f}'}\n" for n, v in per_class_iou.items())
        atomic_write_bytes(out / "per_class_iou.csv", table.encode())
        return {"grid": f"{out.name}/predictions.png", "table": f"{out.name}/per_class_iou.csv"}
