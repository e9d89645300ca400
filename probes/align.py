"""`align`: how close the encoder under test is to reference encoders on the same images.

For every reference (``--reference SPEC``, e.g. the base tower before SFT/DPO) and every
requested layer: mutual k-NN (k = 10, rows L2-normalised), linear CKA biased and unbiased, each
beside a permutation null (the reference's rows shuffled across images, ``repeats`` times) as a
z-value and a calibrated difference (score - null mean), since raw scores grow with width and
depth. ``seeds > 1`` draws new permutation sets: the z-values get a 95% interval.

When a reference has the test encoder's architecture (same state-dict keys and shapes, e.g. SFT
vs DPO tower) the probe also measures drift: CKA and mutual k-NN at every layer, and the
relative weight change of every block, drawn as one plot.

Metric names: ``mutual_knn``, ``cka_linear``, ``cka_unbiased``, each with ``_z`` and
``_calibrated`` twins; ``@L<layer>`` when several layers are asked for, ``ref<i>:`` in front
when several references are (``references`` in the result maps i to the spec).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from encoder_probe.alignment import LinearCKA, MutualKNN, permutation_null, same_architecture, weight_drift
from encoder_probe.errors import DataError, EncoderProbeError, SpecError
from encoder_probe.probe import artifact_dir, checked_features, config_from, config_hash, summarize
from encoder_probe.encoders.registry import short_spec


@dataclass
class AlignConfig:
    reference: list = field(default_factory=list)  # encoder specs (a single string is one reference)
    k: int = 10
    repeats: int = 100  # permutations in the null
    seeds: int = 1  # independent permutation sets (z-values get a 95% CI)
    seed: int = 0
    layers: list | None = None  # None: each encoder's default layer; else the same indices on both sides
    pool: str = "mean"
    split: str = "val"
    per_class: int | None = None
    max_images: int | None = 5000  # a seeded subset above this (the Gram matrices are n x n)
    batch_size: int = 64
    device: str | None = None
    reference_view: str | None = None  # None: the test encoder's view where a reference has it, else base

    @classmethod
    def from_options(cls, options: dict | None) -> "AlignConfig":
        config = config_from(cls, options)
        if isinstance(config.reference, str):
            config.reference = [config.reference]
        if isinstance(config.layers, (int, str)):
            config.layers = [config.layers]
        if not config.reference:
            raise SpecError("align probe: needs a reference encoder (--reference SPEC, repeatable)")
        if config.reference_view not in (None, "base", "full"):
            raise SpecError(f"align probe: reference_view must be base or full, got {config.reference_view!r}")
        if config.k < 1 or config.repeats < 2 or config.seeds < 1 or (config.max_images or 4) < 4:
            raise SpecError(f"align probe: need k >= 1, repeats >= 2, seeds >= 1 and max_images >= 4, got "
                            f"k={config.k}, repeats={config.repeats}, seeds={config.seeds}, "
                            f"max_images={config.max_images}")
        return config


def _dataset(data: dict | None, config: AlignConfig):
    """The images both sides see: the first --data dataset (any task), default the demo data."""
    from encoder_probe.data import open_dataset
    from encoder_probe.runner import note_dataset_read
    name, root = note_dataset_read(*(next(iter(data.items())) if data else ("imagenet", None)))
    dataset = open_dataset(name, root, config.split, per_class=config.per_class)
    n = min(len(dataset), config.max_images or len(dataset))
    if not config.k < n or n < 4:
        raise DataError(f"{dataset.root}: split {config.split!r} has {len(dataset)} images; the align probe needs "
                        f"at least 4 and more than k={config.k} (use max_images/per_class/split)")
    return dataset


def _load_reference(spec: str, encoder, view: str | None = None):
    """A reference on the test encoder's device and dtype, so both sides are computed alike; in the
    ``view`` asked for, else the test encoder's view where the reference's source has it, else base."""
    from encoder_probe.encoders import load_encoder
    from encoder_probe.runner import check_view
    wanted = view or getattr(encoder, "view", "base")
    if view is None and wanted != "base":
        try:
            check_view(spec, wanted)
        except EncoderProbeError:
            wanted = "base"  # a plain encoder (timm, open_clip) as reference: its only view
    try:
        try:
            return load_encoder(spec, device=encoder.device, dtype=encoder.dtype,
                                **({"view": wanted} if wanted != "base" else {}))
        except SpecError:
            if view is not None or wanted == "base":
                raise
            return load_encoder(spec, device=encoder.device, dtype=encoder.dtype)  # no full view: base
    except EncoderProbeError as e:
        raise type(e)(f"align reference {spec!r}: {e}") from None


def _features(encoder, data, config, context, layers) -> tuple[dict, np.ndarray, object]:
    """{requested layer: (n, d) float32 pooled features}, the dataset rows they belong to, the FeatureSet."""
    from encoder_probe.features import extract
    resolved = {layer: encoder.resolve_layer(layer) for layer in layers}
    features = extract(encoder, _dataset(data, config), out=context.get("cache"),
                       layers=list(dict.fromkeys(resolved.values())), pool=[config.pool],
                       batch_size=config.batch_size, progress=context.get("progress", True))
    return ({layer: checked_features(features, config.pool, [r]) for layer, r in resolved.items()},
            np.asarray(features.index), features)


def _subset(n: int, config: AlignConfig) -> np.ndarray:
    if config.max_images is None or n <= config.max_images:
        return np.arange(n)
    return np.sort(np.random.default_rng(config.seed).choice(n, config.max_images, replace=False))


def _metrics(config: AlignConfig, device):
    return [MutualKNN(config.k, device), LinearCKA(False, device), LinearCKA(True, device)]


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


class AlignProbe:
    name = "align"
    needs = ()

    def run(self, encoder, data, options=None, context=None) -> dict:
        start = time.perf_counter()
        context = context or {}
        config = AlignConfig.from_options(options)
        _dataset(data, config)  # bad data fails before any reference is loaded or anything extracted
        references = [_load_reference(spec, encoder, config.reference_view) for spec in config.reference]
        device = config.device or encoder.device  # where the n x n work runs
        names = ["reference"] if len(references) == 1 else [f"ref{i}" for i in range(len(references))]
        layers = config.layers or [None]
        state = encoder.module.state_dict()
        shared = [same_architecture(state, ref.module.state_dict()) for ref in references]
        ours, rows, test_set = _features(encoder, data, config, context, _wanted(encoder, layers, any(shared)))
        keep = _subset(len(rows), config)

        metrics, nulls_table, curves, drift = {}, {}, {}, {}
        for ref, name, same in zip(references, names, shared):
            theirs, ref_rows, ref_set = _features(ref, data, config, context, _wanted(ref, layers, same))
            if not np.array_equal(rows, ref_rows):
                raise DataError(f"{test_set.path} and {ref_set.path}: the encoders saw different images "
                                f"({len(rows)} vs {len(ref_rows)} rows); alignment needs the same images")
            prefix = "" if len(references) == 1 else f"{name}:"
            curve = curves[name] = {"layers": [encoder.layer if layer is None else layer for layer in layers]}
            for layer, shown in zip(layers, curve["layers"]):
                x, y = ours[shown][keep], theirs[ref.layer if layer is None else layer][keep]
                suffix = "" if len(layers) == 1 else f"@L{layer}"
                for metric in _metrics(config, device):
                    prepared = (metric.prepare(x), metric.prepare(y))
                    label = f"{short_spec(encoder.spec)} vs {short_spec(ref.spec)}"
                    nulls = [permutation_null(metric, x, y, config.repeats, config.seed + s,
                                              context.get("progress", True), prepared, label=label)
                             for s in range(config.seeds)]
                    key = f"{prefix}{metric.name}{suffix}"
                    metrics[key] = summarize([nulls[0].score])
                    zs = [n.z for n in nulls if n.z is not None]  # a null without spread has no z
                    if zs:
                        metrics[f"{key}_z"] = summarize(zs)
                    metrics[f"{key}_calibrated"] = summarize([n.calibrated for n in nulls])
                    nulls_table[key] = nulls[0].as_dict()
                    curve.setdefault(metric.name, []).append(nulls[0].score)
            if same:
                every = _drift_layers(encoder)
                drift[name] = {"layers": every, "weights": weight_drift(ref.module.state_dict(), state),
                               **{m.name: [m(ours[layer][keep], theirs[layer][keep]) for layer in every]
                                  for m in _metrics(config, device)}}

        artifacts = {}
        folder = artifact_dir(encoder, context, self.name)
        shown = drift or (curves if len(layers) > 1 else {})
        if shown and folder is not None:
            plot(shown, {name: d["weights"] for name, d in drift.items()}, folder / "align.png",
                 f"{encoder.spec}: alignment per layer" + (" and weight drift" if drift else ""))
            artifacts["plot"] = f"{self.name}/align.png"
        used = {**asdict(config), "layers": curves[names[0]]["layers"]}
        if used["reference_view"] is None:  # the default: base configs keep their hash
            del used["reference_view"]
        if getattr(encoder, "view", "base") != "base":
            used["view"] = encoder.view
        return {"metrics": metrics, "null": nulls_table, "curves": curves, "drift": drift,
                "view": getattr(encoder, "view", "base"),
                "references": {name: {"spec": ref.spec, "fingerprint": ref.fingerprint, "layer": ref.layer,
                                      "same_architecture": same, "view": getattr(ref, "view", "base")}
                               for name, ref, same in zip(names, references, shared)},
                "data": {"images": int(len(keep)), "split": config.split, "root": test_set.meta["data"]["root"]},
                "config": used, "config_hash": config_hash(used), "artifacts": artifacts,
                "wall_s": round(time.perf_counter() - start, 3)}
