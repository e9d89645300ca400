"""`seg`: a segmentation head on frozen patch tokens, scored by mIoU (DINOv2's linear ADE20K protocol).

The head is BatchNorm + 1x1 conv on the token grid (``head="mlp"``: a hidden layer + GELU);
its logits are upsampled bilinearly to the label map (the encoder's input resolution, see
``data.transforms.SegmentationTransform``) and trained with cross-entropy, ignore index 255, AdamW,
linear warm-up then cosine decay. Tokens are read from the extraction cache (float16), so no
epoch re-runs the encoder; all heads of the learning-rate grid train together on the same
batches (one read feeds every head, as DINOv2's evaluation does).

Protocol (``encoder_probe.selection.select_and_refit``): the learning rate is chosen on a seeded
held-out 10% of the *train* images (heads fit on the other 90%); the winner is refit on all of
train and scored once on val. A multi-label patch head (BCE on the classes present in each patch)
gives the patch-seg "union" macro recall the PIVOT paper reports; see ``encoder_probe.segmentation``
for exactly what each metric counts. ``seeds > 1`` reruns held-out split, head initialisation and
batch order per seed. Every val image's own confusion counts and patch counts are kept as its
per-item outcome: they sum to the split's confusion (so mIoU is the split-level one) and let the
bootstrap resample images (statistics ``miou``, ``pixel_accuracy``, ``patch_macro_recall``).

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
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from encoder_probe.data.base import IGNORE_INDEX
from encoder_probe.errors import SpecError
from encoder_probe.items import Items
from encoder_probe.probe import Needs, Probe, ProbeResult, last_layers, over_seeds, protocol, runtime
from encoder_probe.segmentation import (confusion_matrix, layout_union_targets, paint_logits, paint_operators,
                                        patch_counts, patch_scores, patch_union_targets, pixel_scores,
                                        upsample_bilinear)
from encoder_probe.selection import select_and_refit

HEADS = ("linear", "mlp")
FULL_TRAIN_SIDE = 512  # view full: long side of the label map the pixel CE trains on (scores: original size)
SELECT = ("mIoU", "patch_macro_f1")  # held-out scores that choose the pixel head's and the patch head's lr
METRICS = {"mIoU": "miou", "pixel_accuracy": "pixel_accuracy", "patch_macro_recall": "patch_macro_recall"}
CONF_COLUMNS = ("conf_seed", "conf_item", "conf_true", "conf_pred", "conf_count")


@dataclass
class SegConfig:
    head: str = protocol("linear", choices=HEADS, help="linear: BatchNorm + 1x1 conv; mlp: a hidden layer first")
    last_layers: int = protocol(1, min=1, help="concatenate the last K blocks' tokens (4: DINOv2)")
    lrs: list[float] = protocol([1e-3, 3e-3, 1e-2, 3e-2], gt=0, help="learning rates, chosen on held-out train")
    epochs: int = protocol(10, min=1)
    head_batch: int = protocol(16, min=1, help="images per optimiser step")
    weight_decay: float = protocol(1e-4, min=0, help="AdamW weight decay")
    warmup: float = protocol(0.1, min=0, lt=1, help="fraction of the steps spent warming up")
    hidden: int = protocol(512, min=1, help="width of the mlp head")
    holdout: float = protocol(0.1, gt=0, lt=1, help="fraction of the train images held out to choose the lr")
    seeds: int = runtime(1, min=1, help="reruns of held-out split, head init and batch order")
    show: int = runtime(4, min=0, help="val images in predictions.png")
    batch_size: int = runtime(32, min=1, help="extraction batch")
    device: str | None = runtime(None, help="where the heads train (default: the encoder's device)")

    def check(self):
        if not self.lrs:
            raise ValueError("lrs is empty: give at least one learning rate")


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

    ragged = False

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

    def maps(self, head, x, masks) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image, (truth, predicted class map) at the label map's resolution."""
        return list(zip(masks, predict(head, x, self.grid, masks.shape[-2:])))

    def per_image(self, values: torch.Tensor, masks) -> list[torch.Tensor]:
        """(B, h*w, C) per-token values -> per image (h*w, C)."""
        return list(values)


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

    def maps(self, head, x, batch: RaggedBatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image, (mask, argmax of the logits painted at the mask's resolution)."""
        return [(m, _paint(z, layout, tuple(m.shape)).argmax(0))
                for z, layout, m in zip(batch.split(head(x)), batch.layouts, batch.masks)]

    def per_image(self, values: torch.Tensor, batch: RaggedBatch) -> list[torch.Tensor]:
        """(1, sum N_i, C) per-token values -> per image (N_i, C)."""
        return list(batch.split(values))


def token_source(features, layers, device):
    """The head's token source for a FeatureSet: grid batches (view base) or ragged sequences (full)."""
    return RaggedTokens(features, layers, device) if features.ragged else \
        CachedTokens(features, layers, device)


def train_heads(source, rows: np.ndarray, lrs: list, config: SegConfig, num_classes: int, seed: int,
                desc: str = "heads", bar=None) -> list[tuple[nn.Module, nn.Module]]:
    """Train, for every lr, a pixel head (CE) and a patch head (BCE on patch class sets) on ``rows``.

    Every batch is read once and feeds all heads. Returns [(pixel_head, patch_head)] in ``lrs`` order.
    ``bar``: makes the progress bar (``ctx.bar``: named after probe and encoder, off when the run's
    progress is), one step per batch; default none.
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
    with (bar or partial(tqdm, disable=True))(total=steps_per_epoch * config.epochs, desc=desc, unit="step") as shown:
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
                shown.update()
    heads = [head.eval() for head, _, _ in bank]
    return list(zip(heads[0::2], heads[1::2]))


@torch.no_grad()
def evaluate_heads(source, rows: np.ndarray, pairs, num_classes: int, batch: int = 16, *,
                   per_image: bool = False) -> list[dict]:
    """Scores of every (pixel head, patch head) pair on ``rows``, from the confusion and patch counts
    summed over them. ``per_image``: also every image's own, the per-item outcomes the bootstrap
    resamples: "confusions" (nnz, 4) int64 rows (item, true, pred, count), item = position in the
    sorted ``rows``, and "patch_counts" (n, 3, C) (``segmentation.patch_counts`` of each image)."""
    rows = np.sort(np.asarray(rows))
    conf = [torch.zeros(num_classes, num_classes, dtype=torch.long, device=source.device) for _ in pairs]
    counts = [torch.zeros(3, num_classes, dtype=torch.long, device=source.device) for _ in pairs]
    kept = [([], []) for _ in pairs]
    for start in range(0, len(rows), batch):
        x, masks = source.batch(rows[start:start + batch])
        truth = source.per_image(source.patch_targets(masks, num_classes), masks)
        for i, (pixel, patch) in enumerate(pairs):
            image_conf = torch.stack([confusion_matrix(t, p, num_classes) for t, p in source.maps(pixel, x, masks)])
            image_counts = torch.stack([patch_counts(t, p) for t, p in
                                        zip(truth, source.per_image(patch(x) > 0, masks))])
            conf[i] += image_conf.sum(0)
            counts[i] += image_counts.sum(0)
            if per_image:
                nz = image_conf.nonzero()  # (k, 3): image of the batch, true, pred
                found = image_conf[nz[:, 0], nz[:, 1], nz[:, 2]]
                nz[:, 0] += start
                kept[i][0].append(torch.cat([nz, found[:, None]], 1).cpu())
                kept[i][1].append(image_counts.cpu())
    scores = [{**pixel_scores(c), **patch_scores(n)} for c, n in zip(conf, counts)]
    if per_image:
        for score, (triples, per) in zip(scores, kept):
            score["confusions"] = torch.cat(triples).numpy() if triples else np.zeros((0, 4), np.int64)
            score["patch_counts"] = torch.cat(per).numpy() if per else np.zeros((0, 3, num_classes), np.int64)
    return scores


def predict(head: nn.Module, x: torch.Tensor, grid, size) -> torch.Tensor:
    """(B, H, W) class map: logits upsampled bilinearly to the label size, then argmax."""
    return upsample_bilinear(logit_map(head(x), grid), tuple(size)).argmax(1)


def run_protocol(train, val, config: SegConfig, num_classes: int, seed: int, *, bar=None) -> dict:
    """lr chosen on held-out train images, refit on all train, val scored once: val scores with every
    image's outcomes, the chosen lrs, the sweep and the refit pixel head."""
    of_seed = f" (seed {seed + 1}/{config.seeds})" if config.seeds > 1 else ""

    def sweep(fit, held):
        heads = train_heads(train, fit, config.lrs, config, num_classes, seed, desc=f"lr sweep{of_seed}", bar=bar)
        return evaluate_heads(train, held, heads, num_classes)

    def refit(chosen):  # a (pixel, patch) pair per chosen lr, as the sweep trains them: seeded inits stay put
        lrs = [config.lrs[chosen[key]] for key in SELECT]
        final = train_heads(train, np.arange(len(train)), lrs, config, num_classes, seed, desc=f"refit{of_seed}",
                            bar=bar)
        return final[0][0], final[1][1]

    picked = select_and_refit(len(train), fraction=config.holdout, seed=seed, sweep=sweep, keys=SELECT,
                              refit=refit, where="seg probe: the train split")
    [scores] = evaluate_heads(val, np.arange(len(val)), [picked.final], num_classes, per_image=True)
    return {**scores, "lr": config.lrs[picked.chosen["mIoU"]], "patch_lr": config.lrs[picked.chosen["patch_macro_f1"]],
            "pixel_head": picked.final[0],
            "sweep": [{"lr": lr, "heldout_mIoU": s["mIoU"], "heldout_patch_macro_f1": s["patch_macro_f1"]}
                      for lr, s in zip(config.lrs, picked.curve)]}


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
def segmentation_features(ctx, config: SegConfig, layers):
    """(train FeatureSet, val FeatureSet, val dataset) with tokens and masks; default: the demo ADE20K."""
    splits = [ctx.dataset("segmentation", split) for split in ("train", "val")]  # an empty split is refused
    train, val = (ctx.features(d, layers=layers, tokens=True, batch_size=config.batch_size) for d in splits)
    return train, val, splits[1]


def per_item_outcomes(runs: list[dict], ids, num_classes: int) -> Items:
    """Every val image's confusion (sparse, one block of rows per seed) and patch counts (S, n, 3, C)."""
    conf = np.concatenate([np.column_stack([np.full(len(r["confusions"]), seed), r["confusions"]])
                           for seed, r in enumerate(runs)]).astype(np.int64)
    columns = {name: conf[:, j] for j, name in enumerate(CONF_COLUMNS)}
    columns["patch_counts"] = np.stack([r["patch_counts"] for r in runs])
    return Items(ids, columns, {"num_classes": num_classes, "seeds": len(runs)})


class SegProbe(Probe):
    name = "seg"
    needs = Needs(data=("segmentation",))
    Config = SegConfig

    def run(self, ctx, cfg: SegConfig) -> ProbeResult:
        train_set, val_set, val_data = segmentation_features(ctx, cfg, last_layers(ctx.encoder, cfg.last_layers))
        num_classes = train_set.num_classes
        device = ctx.device_for(cfg)
        ragged = train_set.ragged
        train, val = (token_source(f, f.layers, device) for f in (train_set, val_set))
        runs = [run_protocol(train, val, cfg, num_classes, seed, bar=ctx.bar) for seed in range(cfg.seeds)]

        ious = np.array([r["iou"] for r in runs], dtype=float)
        seen = np.isfinite(ious).sum(0)  # a class no seed saw (nor predicted) has no IoU, not a warning
        per_class = np.where(seen > 0, np.nansum(ious, axis=0) / np.maximum(seen, 1), np.nan)
        per_class_iou = {n: (None if np.isnan(v) else float(v)) for n, v in zip(train_set.class_names, per_class)}
        metrics = {m: over_seeds([r[m] for r in runs], statistic={"name": stat}) for m, stat in METRICS.items()}
        details = {
            "per_class_iou": per_class_iou, "classes_counted": [r["classes_counted"] for r in runs],
            "chosen_lr": [r["lr"] for r in runs], "chosen_patch_lr": [r["patch_lr"] for r in runs],
            "sweep": [r["sweep"] for r in runs], "layers": train_set.layers,
            "data": {"train": len(train), "val": len(val), "classes": num_classes, "root": train_set.root,
                     "mask_size": "original" if ragged else list(val_set.masks.shape[1:])},
        }
        artifacts = {}
        if cfg.show > 0 and ctx.out is not None:
            artifacts = write_artifacts(ctx.out, runs[0]["pixel_head"], val, val_set, val_data, per_class_iou,
                                        cfg.show, num_classes)
        return ProbeResult(metrics=metrics, details=details, artifacts=artifacts,
                           items=per_item_outcomes(runs, ctx.item_ids(val_data, val_set.index), num_classes),
                           protocol={"grid": None if ragged else list(train_set.grid)})


def write_artifacts(out, head, val, val_set, val_data, per_class_iou: dict, show: int, num_classes: int) -> dict:
    """predictions.png (the first ``show`` val images: image, truth, prediction) and per_class_iou.csv."""
    from encoder_probe.cache import atomic_write_bytes
    rows = np.arange(min(show, len(val)))
    x, masks = val.batch(rows)
    with torch.no_grad():
        truth, pred = zip(*[(t.cpu().numpy(), p.cpu().numpy()) for t, p in val.maps(head, x, masks)])
    prediction_grid(val_data, val_set.index[rows], truth, pred, num_classes, out / "predictions.png",
                    original=val.ragged)
    table = "class,iou\n" + "".join(f"{n},{'' if v is None else f'{v:.6f}'}\n" for n, v in per_class_iou.items())
    atomic_write_bytes(out / "per_class_iou.csv", table.encode())
    return {"grid": out / "predictions.png", "table": out / "per_class_iou.csv"}
