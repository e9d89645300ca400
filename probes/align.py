"""`align`: how close the encoder under test is to reference encoders on the same images.

For every reference (``--reference SPEC``, e.g. the base tower before SFT/DPO; loaded through the
run context, so with the run's device, dtype and load options: ``--vision-config``,
``--image-size`` reach it where its source takes them) and every requested layer: mutual k-NN
(k = 10, rows L2-normalised), linear CKA biased and unbiased, each beside a permutation null (the
reference's rows shuffled across images, ``repeats`` times) as a z-value and a calibrated
difference (score - null mean), since raw scores grow with width and depth. ``seeds > 1`` draws
new permutation sets: the z-values get a 95% interval over seeds.

Intervals over images: mutual k-NN is a mean over images of each image's neighbour overlap, kept
as a per-item outcome (the runner's bootstrap resamples it). CKA is not a mean over images, so the
probe computes its interval itself, by half-sampling: CKA of ``bootstrap`` random halves of the
images (seed 0), each half as 0/1 weights on the two Gram matrices (O(n^2) per half, B halves are
a few matrix products); the interval is the value plus the 2.5/97.5% percentiles of the halves'
deviations from their mean (a half drawn without replacement varies as much as n images drawn
anew). Not the bootstrap with replacement: a drawn-twice image is two perfectly aligned rows in
both spaces, which inflates every resample's CKA (on simulated features its percentile interval
never covered the truth; the half-samples' covered it 95-99% of the time).

When a reference has the test encoder's architecture (same state-dict keys and shapes, e.g. SFT
vs DPO tower) the probe also measures drift: CKA and mutual k-NN at every layer, and the
relative weight change of every block, drawn as one plot.

Metric names: ``mutual_knn``, ``cka_linear``, ``cka_unbiased``, each with ``_z`` and
``_calibrated`` twins; ``@L<layer>`` when several layers are asked for, ``ref<i>:`` in front
when several references are (``references`` in the result maps i to the spec).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from encoder_probe.alignment import (LinearCKA, MutualKNN, as_rows, permutation_null, same_architecture,
                                     weight_drift)
from encoder_probe.bootstrap import CHUNK_ELEMENTS, percentile_interval
from encoder_probe.context import checked_features
from encoder_probe.encoders.registry import short_spec
from encoder_probe.errors import DataError
from encoder_probe.features import POOLS
from encoder_probe.items import Items
from encoder_probe.probe import Metric, Needs, Probe, ProbeResult, over_seeds, protocol, runtime

VIEWS = ("base", "full")
CKA = ("cka_linear", "cka_unbiased")
MIN_HALF = 4  # images the unbiased CKA needs

# how the CKA intervals are made (CKA is not a mean over images; resampling with replacement biases it)
CKA_CI = {"method": "half-sampling", "over": "images", "seed": 0,
          "interval": "value + 2.5/97.5% percentiles of the half-sample deviations"}


@dataclass
class AlignConfig:
    reference: list[str] = protocol([], help="reference encoder specs (--reference SPEC, repeatable)")
    k: int = protocol(10, min=1, help="neighbours of mutual k-NN")
    repeats: int = protocol(100, min=2, help="permutations in the null")
    layers: list | None = protocol(None, help="layers on both sides (default: each encoder's own layer)")
    pool: str = protocol("mean", choices=POOLS)
    split: str = protocol("val", choices=("train", "val"))
    per_class: int | None = protocol(None, min=1, help="K images per class")
    max_images: int | None = protocol(5000, min=4, help="a seeded subset above this (Gram matrices are n x n)")
    reference_view: str | None = protocol(None, choices=VIEWS,
                                          help="default: the test encoder's view where a reference has it, else base")
    seed: int = protocol(0, min=0, help="the image subset and the permutations")
    seeds: int = runtime(1, min=1, help="independent permutation sets (the z-values get a 95% interval)")
    batch_size: int = runtime(64, min=1, help="extraction batch")
    device: str | None = runtime(None, help="where the n x n work runs (default: the encoder's device)")
    bootstrap: int = runtime(1000, min=0, help="resamples of the images behind the CKA intervals (0: none)")

    def __post_init__(self):
        if self.layers is not None:  # "2,-1" on the command line: indices, not names
            self.layers = [int(v) if isinstance(v, str) and v.lstrip("-").isdigit() else v for v in self.layers]

    def check(self):
        if not self.reference:
            raise ValueError("needs a reference encoder (--reference SPEC, repeatable)")
        if 0 < self.bootstrap < 100:
            raise ValueError(f"bootstrap must be 0 (no intervals) or >= 100 resamples, got {self.bootstrap}")


def _dataset(ctx, cfg: AlignConfig):
    """The images both sides see: the first --data dataset (any task), default the demo data."""
    dataset = ctx.dataset(any_task=True, split=cfg.split, per_class=cfg.per_class)
    n = min(len(dataset), cfg.max_images or len(dataset))
    if not cfg.k < n or n < 4:
        raise DataError(f"{dataset.root}: split {cfg.split!r} has {len(dataset)} images; the align probe needs "
                        f"at least 4 and more than k={cfg.k} (use max_images/per_class/split)")
    return dataset


def _features(ctx, encoder, dataset, cfg: AlignConfig, layers) -> tuple[dict, np.ndarray, object]:
    """{requested layer: (n, d) float32 pooled features}, the dataset rows they belong to, the FeatureSet."""
    resolved = {layer: encoder.resolve_layer(layer) for layer in layers}
    features = ctx.features(dataset, layers=list(dict.fromkeys(resolved.values())), pool=cfg.pool,
                            batch_size=cfg.batch_size, encoder=encoder)
    return ({layer: checked_features(features, cfg.pool, [r]) for layer, r in resolved.items()},
            np.asarray(features.index), features)


def _subset(n: int, config: AlignConfig) -> np.ndarray:
    if config.max_images is None or n <= config.max_images:
        return np.arange(n)
    return np.sort(np.random.default_rng(config.seed).choice(n, config.max_images, replace=False))


def _metrics(config: AlignConfig, device):
    return [MutualKNN(config.k, device), LinearCKA(False, device), LinearCKA(True, device)]


def knn_overlaps(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """(n,) each image's shared fraction of its k neighbours in two (n, k) neighbour lists; their
    mean is the mutual k-NN score."""
    return ((a[:, :, None] == b[:, None, :]).any(-1).sum(1).double() / a.shape[1]).cpu().numpy()


def _hsic_kept(w, ab, aw, bw, da, db) -> tuple[torch.Tensor, torch.Tensor]:
    """(biased, unbiased) HSIC, as alignment's _hsic computes them, of the images each row of 0/1
    weights ``w`` (b, n) keeps, without forming their Gram matrices: ``ab`` = A * B elementwise,
    ``aw`` = w @ A, ``da`` = diag(A)."""
    m = w.sum(1)
    t = ((w @ ab) * w).sum(1)  # sum over kept pairs of A_ij B_ij
    biased = t - 2 / m * (w * aw * bw).sum(1) + (w * aw).sum(1) * (w * bw).sum(1) / m ** 2
    ra, rb = aw - da, bw - db  # row sums of the kept zero-diagonal Gram matrices
    unbiased = (t - (w * da * db).sum(1) + (w * ra).sum(1) * (w * rb).sum(1) / ((m - 1) * (m - 2))
                - 2 / (m - 2) * (w * ra * rb).sum(1)) / (m * (m - 3))
    return biased, unbiased


def halves(n: int, B: int, seed: int = 0):
    """0/1 weights (b, n) of ``B`` random halves of n images in chunks of rows (memory bounded, seeded)."""
    rng = np.random.default_rng(seed)
    rows = max(1, CHUNK_ELEMENTS // n)
    for start in range(0, B, rows):
        b = min(rows, B - start)
        weights = np.zeros((b, n))
        np.put_along_axis(weights, rng.random((b, n)).argsort(1)[:, :n // 2], 1.0, axis=1)
        yield weights


def cka_half_samples(x, y, B: int, seed: int = 0, device=None) -> dict[str, np.ndarray]:
    """{cka_linear, cka_unbiased: (B,)}: CKA of ``B`` random halves of the images (x[S], y[S]);
    NaN where a half does not vary."""
    x, y = as_rows(x, device), as_rows(y, device)
    k, l_ = x @ x.T, y @ y.T
    dk, dl = k.diagonal(), l_.diagonal()
    kl, kk, ll = k * l_, k * k, l_ * l_
    out = {name: [] for name in CKA}
    for weights in halves(len(k), B, seed):
        w = torch.as_tensor(weights, dtype=torch.float64, device=k.device)
        kw, lw = w @ k, w @ l_
        for name, cross, self_x, self_y in zip(CKA, _hsic_kept(w, kl, kw, lw, dk, dl),
                                               _hsic_kept(w, kk, kw, kw, dk, dk), _hsic_kept(w, ll, lw, lw, dl, dl)):
            varies = (self_x > 0) & (self_y > 0)
            out[name].append(torch.where(varies, cross / (self_x * self_y).clamp(min=1e-300).sqrt(),
                                         torch.nan).cpu().numpy())
    return {name: np.concatenate(parts) for name, parts in out.items()}


def cka_interval(value: float, replicates: np.ndarray) -> list[float] | None:
    """value + the 2.5/97.5% percentiles of the half-sample estimates' deviations from their mean:
    a half of n images (drawn without replacement) varies about as much as n images drawn anew."""
    deviations = replicates - np.nanmean(replicates) if np.isfinite(replicates).any() else replicates
    interval = percentile_interval(deviations)
    return None if interval is None else [value + interval[0], value + interval[1]]


def _drift_layers(encoder) -> list:
    """Every layer the (shared) architecture has: embeddings (where exposed) and each block."""
    return list(range(encoder.layers.first, encoder.layers.available + 1))


def plot(curves: dict, weights: dict, path, title: str) -> None:
    """Per-layer scores of each reference (top) and, for same-architecture references, the
    relative weight change of every block (bottom), on one layer axis."""
    from matplotlib.figure import Figure

    from encoder_probe.cache import save_png
    fig = Figure(figsize=(7.5, 3.2 * (2 if weights else 1)))
    top = fig.add_subplot(2 if weights else 1, 1, 1)
    for ref, c in curves.items():
        x = [layer if isinstance(layer, int) else str(layer) for layer in c["layers"]]
        for name, style in (("cka_linear", "-o"), ("cka_unbiased", "--s"), ("mutual_knn", ":^")):
            top.plot(x, c[name], style, label=f"{ref}: {name}", markersize=4)
    top.set(ylabel="alignment", xlabel="layer")
    top.set_title(title, fontsize=9)
    top.grid(alpha=0.3)
    top.legend(fontsize=7)
    if weights:
        bottom = fig.add_subplot(2, 1, 2, sharex=top)
        width = 0.8 / len(weights)
        for i, (ref, rows) in enumerate(weights.items()):
            blocks = [r for r in rows if r["block"] is not None]
            rest = ", ".join(f"{r['group']} {r['relative_change']:.2g}" for r in rows
                             if r["block"] is None and r["relative_change"] is not None)
            bottom.bar(np.array([r["block"] + 1 for r in blocks]) + (i - (len(weights) - 1) / 2) * width,
                       [r["relative_change"] or 0.0 for r in blocks], width, label=f"{ref} (other: {rest})"[:110])
        bottom.set(xlabel="layer (block k's output)", ylabel="relative weight change")
        bottom.grid(alpha=0.3)
        bottom.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    save_png(fig, path)


def _wanted(encoder, layers: list, drift: bool) -> list:
    """The layers to extract: the requested ones (None = the default) and, for drift, all."""
    asked = [encoder.layer if layer is None else layer for layer in layers]
    return list(dict.fromkeys(asked + (_drift_layers(encoder) if drift else [])))


class AlignProbe(Probe):
    name = "align"
    needs = Needs(data=("classification",))  # any --data dataset: only the images are read
    Config = AlignConfig

    def run(self, ctx, cfg: AlignConfig) -> ProbeResult:
        encoder = ctx.encoder
        dataset = _dataset(ctx, cfg)  # bad data fails before any reference is loaded or anything extracted
        references = [ctx.reference(spec, cfg.reference_view) for spec in cfg.reference]
        device = ctx.device_for(cfg)  # where the n x n work runs
        names = ["reference"] if len(references) == 1 else [f"ref{i}" for i in range(len(references))]
        layers = cfg.layers or [None]
        state = encoder.module.state_dict()
        shared = [same_architecture(state, ref.module.state_dict()) for ref in references]
        ours, rows, test_set = _features(ctx, encoder, dataset, cfg, _wanted(encoder, layers, any(shared)))
        keep = _subset(len(rows), cfg)
        intervals = cfg.bootstrap and len(keep) >= 2 * MIN_HALF  # halves the unbiased CKA can score

        metrics, columns, nulls_table, curves, drift = {}, {}, {}, {}, {}
        for ref, name, same in zip(references, names, shared):
            theirs, ref_rows, ref_set = _features(ctx, ref, dataset, cfg, _wanted(ref, layers, same))
            if not np.array_equal(rows, ref_rows):
                raise DataError(f"{test_set.path} and {ref_set.path}: the encoders saw different images "
                                f"({len(rows)} vs {len(ref_rows)} rows); alignment needs the same images")
            prefix = "" if len(references) == 1 else f"{name}:"
            curve = curves[name] = {"layers": [encoder.layer if layer is None else layer for layer in layers]}
            label = f"{ctx.label} vs {short_spec(ref.spec)}"
            for layer, shown in zip(layers, curve["layers"]):
                x, y = ours[shown][keep], theirs[ref.layer if layer is None else layer][keep]
                suffix = "" if len(layers) == 1 else f"@L{layer}"
                halved = cka_half_samples(x, y, cfg.bootstrap, device=device) if intervals else {}
                for metric in _metrics(cfg, device):
                    prepared = (metric.prepare(x), metric.prepare(y))
                    nulls = [permutation_null(metric, x, y, cfg.repeats, cfg.seed + s, ctx.progress, prepared,
                                              label=label) for s in range(cfg.seeds)]
                    key = f"{prefix}{metric.name}{suffix}"
                    if metric.name == "mutual_knn":  # a mean over images: the runner bootstraps its items
                        columns[key] = knn_overlaps(*prepared)[None]
                        metrics[key] = Metric(nulls[0].score, statistic={"name": "mean", "column": key})
                    else:
                        ci = cka_interval(nulls[0].score, halved[metric.name]) if halved else None
                        metrics[key] = Metric(nulls[0].score, ci95=ci, ci={**CKA_CI, "B": cfg.bootstrap, "n": int(len(keep))}
                                              if ci is not None else None)
                    zs = [n.z for n in nulls if n.z is not None]  # a null without spread has no z
                    if zs:
                        metrics[f"{key}_z"] = over_seeds(zs)
                    metrics[f"{key}_calibrated"] = over_seeds([n.calibrated for n in nulls])
                    nulls_table[key] = nulls[0].as_dict()
                    curve.setdefault(metric.name, []).append(nulls[0].score)
            if same:
                every = _drift_layers(encoder)
                drift[name] = {"layers": every, "weights": weight_drift(ref.module.state_dict(), state),
                               **{m.name: [m(ours[layer][keep], theirs[layer][keep]) for layer in every]
                                  for m in _metrics(cfg, device)}}

        artifacts = {}
        shown = drift or (curves if len(layers) > 1 else {})
        if shown and ctx.out is not None:
            artifacts["plot"] = ctx.out / "align.png"
            plot(shown, {name: d["weights"] for name, d in drift.items()}, artifacts["plot"],
                 f"{encoder.spec}: alignment per layer" + (" and weight drift" if drift else ""))
        details = {
            "null": nulls_table, "curves": curves, "drift": drift,
            "layers": [encoder.resolve_layer(layer) for layer in curves[names[0]]["layers"]],
            "references": {name: {"spec": str(ref.spec), "fingerprint": ref.fingerprint, "layer": ref.layer,
                                  "same_architecture": same, "view": getattr(ref, "view", "base"),
                                  "input_size": list(ref.preprocess.size)}
                           for name, ref, same in zip(names, references, shared)},
            "data": {"images": int(len(keep)), "split": cfg.split, "root": test_set.root}}
        return ProbeResult(metrics=metrics, items=Items(ctx.item_ids(dataset, rows[keep]), columns),
                           details=details, artifacts=artifacts)
