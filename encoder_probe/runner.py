"""Runs a suite of probes on encoders and writes one results.json per encoder, atomically.

The record follows the versioned schema in ``encoder_probe.report.schema``: what was measured
(encoder, data with content hashes, probe configs and their hashes) sits beside the numbers,
so a report can tell whether two results are comparable without rerunning anything.

The runner owns what every probe would otherwise repeat: option routing and validation
(:mod:`encoder_probe.options`), before the first encoder is loaded; timing; hashing of the
protocol fields only; provenance; a bootstrap 95% CI over the evaluation items for every metric
(:mod:`encoder_probe.bootstrap`) and the per-item outcomes written beside results.json
(``OUT/<fingerprint[:16]>/items/<probe>.npz``) for paired comparisons. Probes read their inputs
through a :class:`~encoder_probe.context.RunContext`; a probe another one needs runs first,
whatever the suite order. The encoder block records the view (``base`` or ``full``) and the tokens
per image; the ``data`` block describes the datasets the probes actually opened.
"""
from __future__ import annotations

import json
import platform
import time
import traceback
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .cache import atomic_write_json, check_writable_dir, feature_cache
from .encoders import load_encoder
from .context import Run
from .errors import DataError, EncoderProbeError, SpecError
from .probe import config_hash, get_probe, provenance, resolve_suite, seed_interval, split_config

PACKAGES = ("encoder-probe", "torch", "torchvision", "timm", "transformers", "open_clip_torch", "scikit-learn",
            "numpy", "safetensors", "pillow")
DEFAULT_DATA = {"imagenet": None, "ade20k": None}  # the built-in demo data, in both of its layouts
SPLITS = ("train", "val")
DEFAULT_BOOTSTRAP = 1000
RESERVED = {"status", "metrics", "config", "runtime", "config_hash", "probe", "items", "artifacts",
            "warnings", "undefined_metrics", "unscored", "wall_s", "error", "traceback", "view", "needed_by"}


def check_view(spec: str | None, view) -> str:
    """A --view value that ``spec`` can give, before anything is loaded: base, or full for the sources
    that have a full view (MLLM checkpoints); the checkpoint itself is checked when it is loaded."""
    from .encoders.registry import check_view as source_view, parse_spec
    try:
        return source_view(parse_spec(spec).source if spec is not None else None, spec or "", view)
    except SpecError as e:
        raise SpecError(f"--view{'' if str(e).startswith('unknown view') else ' ' + str(view)}: {e}") from None


def tokens_per_image(encoder, features_read: dict | None = None) -> dict:
    """{"visual": {min, mean, max}, "lm": {...}, "images": n}: the tokens per image of the images the
    probes read (visual = patch tokens, lm = what the MLLM's LM reads, image_newline tokens included);
    when no probe read cached features, those of one example photo."""
    import numpy as np

    from .features import token_summary
    from .encoders.views import single_view
    counts = {"visual": [], "lm": []}
    for features in (features_read or {}).values():
        found = features.token_counts()
        if not features.ragged and features.grid is not None:  # one grid for every image: the LM's count of it
            lm = encoder.lm_layout(single_view(features.grid, features.grid)).lm_tokens
            found["lm"] = np.full_like(found["visual"], lm)
        for kind, values in found.items():
            counts[kind].append(np.asarray(values))
    if counts["visual"] and sum(len(v) for v in counts["visual"]):
        out = {kind: token_summary(np.concatenate(values)) for kind, values in counts.items()}
        return {**out, "images": int(sum(len(v) for v in counts["visual"]))}
    import torch

    from .assets import photo
    try:
        with torch.inference_mode():
            layout = encoder.encode(photo("astronaut")).layout
    except Exception:  # a count is a note beside the results, never a reason to lose them
        return None
    return {"visual": token_summary([layout.num_tokens]), "lm": token_summary([encoder.lm_layout(layout).lm_tokens]),
            "images": 1, "example": "astronaut"}


def environment(encoder) -> dict:
    """Package versions and where the encoder ran: enough to tell two runs' software apart."""
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            pass
    import torch
    packages["torch"] = torch.__version__  # with its build tag (+cu130, +cpu)
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": packages,
            "device": str(encoder.device), "dtype": str(encoder.dtype).removeprefix("torch.")}


def describe_data(data: dict | None, cache=None, per_class: int | None = None) -> dict:
    """{name: {root, splits: {split: size}, content_hash}} of the datasets a suite reads.

    Content hashes share the feature cache's file-hash memo, so this costs a stat per file on
    a warm cache; with ``per_class`` only the subsample the probes read is hashed. Splits a
    dataset does not have are left out (real-masks: val only).
    """
    import hashlib
    import inspect

    from .data import DATASETS, open_dataset
    memo = feature_cache(cache) / ".file-hashes"
    described = {}
    for name, root in (DEFAULT_DATA if data is None else data).items():
        subset = {"per_class": per_class} if per_class and "per_class" in inspect.signature(DATASETS[name]).parameters \
            else {}
        splits, hashes, error = {}, [], None
        for split in SPLITS:
            try:
                dataset = open_dataset(name, root, split, **subset)
            except DataError as e:
                error = e
                continue
            splits[split] = len(dataset)
            hashes.append(f"{split}:{dataset.content_hash(memo)}")
            resolved = str(dataset.root)
        if not splits:
            raise error
        described[name] = {"root": resolved, "demo": root is None or str(root) == "demo", "splits": splits,
                           "content_hash": hashlib.sha256("\n".join(hashes).encode()).hexdigest(), **subset}
    return described


# -- one probe ---------------------------------------------------------------------------------
def _metric_entry(metric) -> dict:
    entry = {"value": None if metric.value is None else float(metric.value),
             "higher_is_better": bool(metric.higher_is_better)}
    if metric.statistic is not None:
        entry["statistic"] = dict(metric.statistic)
    if metric.values is not None and len(metric.values) > 1:
        entry["values"] = [float(v) for v in metric.values]
        entry["seed_ci95"] = seed_interval(metric.values)
    if metric.ci95 is not None:
        entry["ci95"] = [float(v) for v in metric.ci95]
        entry["ci"] = dict(metric.ci) if metric.ci else {"method": "probe"}
    return entry


def _artifact(path, encoder_dir: Path | None) -> str:
    """An artifact as a path relative to the encoder's results dir (probes may give absolute Paths)."""
    path = Path(path)
    if path.is_absolute() and encoder_dir is not None:
        return path.relative_to(encoder_dir).as_posix()
    return path.as_posix()


def probe_entry(name: str, probe, cfg, result, encoder, *, bootstrap: int, encoder_dir: Path | None) -> dict:
    """The probe's results.json entry: metrics with their bootstrap CIs, protocol config and hash,
    runtime settings, provenance and the probe's details."""
    from .bootstrap import metric_intervals
    protocol_fields, runtime_fields = split_config(cfg)
    view = getattr(encoder, "view", "base")
    config = {**protocol_fields, **result.protocol, **({"view": view} if view != "base" else {})}
    metrics = {m: _metric_entry(metric) for m, metric in result.metrics.items()}
    if result.items is not None and bootstrap:
        with_statistic = {m: e for m, e in metrics.items() if e.get("statistic") and "ci95" not in e}
        for m, interval in metric_intervals(with_statistic, result.items, bootstrap).items():
            metrics[m].update(interval)
    entry = {"status": "ok", "metrics": metrics, "view": view, "config": config, "runtime": runtime_fields,
             "config_hash": config_hash(config), "probe": provenance(probe)}
    clash = sorted(set(result.details) & RESERVED)
    if clash:
        raise ValueError(f"details use reserved key(s) {', '.join(clash)}")
    entry.update(result.details)
    if result.artifacts:
        entry["artifacts"] = {k: _artifact(v, encoder_dir) for k, v in result.artifacts.items()}
    for key, value in (("warnings", list(result.warnings)), ("undefined_metrics", dict(result.undefined)),
                       ("unscored", dict(result.unscored))):
        if value:
            entry[key] = value
    if result.items is not None:
        entry["items"] = {"n": len(result.items), "ids_sha256": result.items.ids_sha256}
        if encoder_dir is not None:
            entry["items"]["file"] = f"items/{name}.npz"
    return entry


def _execute(run: Run, name: str, probes: dict, entries: dict, bootstrap: int) -> None:
    """Run probe ``name`` (once) in ``run``: its result goes to ``run.results``, its entry to ``entries``;
    items files are written here, before results.json that names them."""
    from .report.schema import check_probe
    if name in run.results:
        return
    probe, cfg = probes[name], run.configs[name]
    run.running.append(name)
    start = time.perf_counter()
    try:
        result = probe.run(run.context(name, probe.needs), cfg)
        entry = probe_entry(name, probe, cfg, result, run.encoder, bootstrap=bootstrap, encoder_dir=run.encoder_dir)
        entry["wall_s"] = round(time.perf_counter() - start, 3)
        check_probe(name, entry)
        json.dumps(entry)
    except EncoderProbeError:
        raise  # bad input (data, spec): one line, exit 2, no results.json for this encoder
    except Exception as e:  # a probe's own failure is recorded; the other probes still run
        result = None
        entry = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=5),
                 "wall_s": round(time.perf_counter() - start, 3)}
    finally:
        run.running.remove(name)
    if result is not None and result.items is not None and run.encoder_dir is not None:
        result.items.save(run.encoder_dir / "items" / f"{name}.npz")
    run.results[name] = result
    entries[name] = entry


def with_needs(names: list[str]) -> dict:
    """{name: probe} of the suite and, after it, every probe they need (transitively)."""
    probes: dict = {}
    todo = list(names)
    while todo:
        name = todo.pop(0)
        if name in probes:
            continue
        probes[name] = get_probe(name)
        todo += [needed for needed in probes[name].needs.probes if needed not in probes]
    return probes


def run_level(seeds: int, device=None, bootstrap: int = DEFAULT_BOOTSTRAP) -> dict:
    """The run's own settings that fill probe fields of the same name (unless routed explicitly)."""
    return {"seeds": seeds, "device": None if device is None else str(device), "bootstrap": bootstrap}


def plan(suite, options: dict | None = None, *, seeds: int = 1, device=None, bootstrap: int = DEFAULT_BOOTSTRAP,
         origin: dict | None = None):
    """(suite names, {name: probe}, {name: validated Config}): everything decided before any work."""
    from .options import route
    names = resolve_suite(suite)
    probes = with_needs(names)
    configs = route(options, probes, run_level=run_level(seeds, device, bootstrap), origin=origin)
    return names, probes, configs


def run_probe(probe, encoder, *, data=None, options: dict | None = None, out=None, cache=None,
              progress: bool = False, seeds: int = 1, bootstrap: int = DEFAULT_BOOTSTRAP) -> dict:
    """One probe on a loaded encoder (a notebook, a test): its results.json entry, the probe's
    options routed and validated as ``probe run`` does (``key`` or ``probe.key``). ``probe``: a
    registered name or a probe object; with ``out``, artifacts and the items file are written."""
    from .probe import check_probe_class
    if isinstance(probe, str):
        names, probes, configs = plan(probe, options, seeds=seeds, bootstrap=bootstrap)
    else:
        from .options import route
        check_probe_class(getattr(probe, "name", "?"), probe)
        name = probe.name
        probes = {name: probe, **with_needs(list(probe.needs.probes))}
        configs = route(options, probes, run_level=run_level(seeds, bootstrap=bootstrap))
        names = [name]
    entries: dict = {}
    run = Run(encoder, data=data, out=out, cache=cache, progress=progress, configs=configs)
    run.execute = lambda name: _execute(run, name, probes, entries, bootstrap)
    run.execute(names[0])
    return entries[names[0]]


# -- a suite -------------------------------------------------------------------------------------
def run_suite(encoders: str | list[str], suite, out: str | Path, *, device=None, dtype=None, data=None,
              seeds: int = 1, options: dict | None = None, cache=None, progress: bool = True,
              bootstrap: int = DEFAULT_BOOTSTRAP, option_origin: dict | None = None, **load_options) -> list[dict]:
    """Run every probe of ``suite`` on each encoder spec; a failing probe is recorded, the rest still run.

    ``options``: {key: value} to every probe that declares ``key``, {"probe.key": value} to one;
    every key is validated before the first encoder is loaded. ``seeds`` reruns what is stochastic
    in training; ``bootstrap`` is the number of resamples of the evaluation items behind each 95% CI
    (0: none). Extracted features are cached in ``cache`` (default: the user cache), so reruns are
    cheap. Returns the records written to ``out/<fingerprint[:16]>/results.json``.
    """
    from .report.schema import SCHEMA_VERSION, validate
    encoders = [encoders] if isinstance(encoders, str) else list(encoders)
    _check_inputs(encoders, out, cache, device=device, dtype=dtype, seeds=seeds, bootstrap=bootstrap,
                  load_options=load_options)
    names, probes, configs = plan(suite, options, seeds=seeds, device=device, bootstrap=bootstrap,
                                  origin=option_origin)
    for name, cfg in configs.items():  # references are encoder specs too: a bad one fails now
        for spec in _references(cfg):
            _check_spec(spec, f"{name}.reference")
    out = Path(out)
    results = []
    for spec in encoders:
        start = time.perf_counter()
        encoder = load_encoder(spec, device=device, dtype=dtype, **load_options)
        loaded = time.perf_counter()
        entries: dict = {}
        run = Run(encoder, data=data, out=out, cache=cache, progress=progress, load_options=load_options,
                  configs=configs)
        run.execute = lambda name, run=run, entries=entries: _execute(run, name, probes, entries, bootstrap)
        for name in names:
            run.execute(name)
        ordered = {name: entries[name] for name in names}
        for name, entry in entries.items():  # probes that ran because another one needs them
            if name not in ordered:
                entry["needed_by"] = [n for n in names if name in probes[n].needs.probes]
                ordered[name] = entry
        pooling = next((getattr(cfg, "pool") for cfg in configs.values() if hasattr(cfg, "pool")), "mean")
        record = {"schema_version": SCHEMA_VERSION, "created": datetime.now(timezone.utc).isoformat(),
                  "encoder": {"spec": str(spec), "source": encoder.source, "fingerprint": encoder.fingerprint,
                              "layer": encoder.layer, "pooling": pooling, "n_params": encoder.n_params,
                              "view": encoder.view},
                  "data": {},
                  "options": {"seeds": seeds, "bootstrap": bootstrap,
                              **({"device": str(device)} if device is not None else {}),
                              **{k: v for k, v in (options or {}).items() if v is not None}},
                  "env": environment(encoder), "probes": ordered}
        record["encoder"]["tokens_per_image"] = tokens_per_image(encoder, run.features_read.get(encoder.fingerprint))
        # after the probes, so that a probe's own message about unusable data is the one shown; only what
        # they opened (a probe that opened nothing through its context: the --data given, if any)
        per_class = next((getattr(cfg, "per_class") for cfg in configs.values()
                          if getattr(cfg, "per_class", None)), None)
        record["data"] = describe_data(run.datasets_read or data or {}, cache, per_class)
        record["config_hashes"] = {name: p["config_hash"] for name, p in ordered.items() if p.get("config_hash")}
        record["timings"] = {"load_s": round(loaded - start, 3),
                             "probes_s": {name: p["wall_s"] for name, p in ordered.items()},
                             "total_s": round(time.perf_counter() - start, 3)}
        validate(record, out / encoder.fingerprint[:16] / "results.json")  # the runner's own blocks
        atomic_write_json(out / encoder.fingerprint[:16] / "results.json", record)
        results.append(record)
    return results


def _references(cfg) -> list[str]:
    value = getattr(cfg, "reference", None) or []
    return [value] if isinstance(value, str) else list(value)


def _check_spec(spec, where: str) -> None:
    from .encoders.registry import parse_spec
    try:
        parse_spec(spec)
    except EncoderProbeError as e:
        raise type(e)(f"{where}: {e}") from None


def _check_inputs(encoders: list, out, cache, *, device, dtype, seeds, bootstrap, load_options) -> None:
    """Everything a suite could refuse, before the first encoder is loaded: a bad 2nd spec or an
    unwritable out fails in a second, not after the 1st encoder's probes."""
    from .encoders.registry import parse_device, parse_dtype, parse_image_size, parse_spec
    if not encoders:
        raise SpecError("no encoder given")
    check_writable_dir(out, "out")
    check_writable_dir(feature_cache(cache), "cache")
    parse_device(device)
    parse_dtype(dtype)
    if load_options.get("image_size") is not None:
        parse_image_size(load_options["image_size"])
    for spec in encoders:
        check_view(spec, load_options.get("view"))
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise SpecError(f"seeds must be an integer >= 1, got {seeds!r}")
    if not isinstance(bootstrap, int) or isinstance(bootstrap, bool) or not (bootstrap == 0 or bootstrap >= 100):
        raise SpecError(f"bootstrap must be 0 (no intervals) or an integer >= 100 resamples, got {bootstrap!r}")
    for spec in encoders:
        parse_spec(spec)


def _fmt(value) -> str:
    if value is None:
        return "-"
    value = float(value)
    return f"{value:.3f}" if abs(value) < 1e4 else f"{value:.4g}"


def summary_table(records: list[dict]) -> str:
    """One row per encoder x probe x metric: value, its 95% CI over the evaluation images and, with
    ``--seeds``, over seeds (``0.812 [0.790, 0.834] seeds [0.805, 0.819]``); a failed probe is one row
    saying so. Plain text, for the terminal."""
    rows = [("encoder", "probe", "metric", "value")]
    for record in records:
        spec = record["encoder"]["spec"]
        for probe, result in record.get("probes", {}).items():
            if result.get("status") != "ok":
                rows.append((spec, probe, "-", f"failed: {str(result.get('error', '')).splitlines()[0][:60]}"
                             if result.get("error") else "failed"))
                continue
            for metric, m in result.get("metrics", {}).items():
                text = _fmt(m.get("value"))
                if m.get("ci95"):
                    low, high = m["ci95"]
                    text += f" [{_fmt(low)}, {_fmt(high)}]"
                if m.get("seed_ci95"):
                    low, high = m["seed_ci95"]
                    text += f" seeds [{_fmt(low)}, {_fmt(high)}]"
                rows.append((spec, probe, metric, text))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * max(len(row[3]) for row in rows))
    return "\n".join(line.rstrip() for line in lines) + "\n"
