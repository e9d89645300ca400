"""The results.json schema (versioned) and its validation.

Everything a report shows comes from these files, so a malformed one stops a report in one
line that names the file and the field, before anything is written.

Version 3 (written by the runner)::

    schema_version  3
    created         ISO time (UTC)
    encoder         {spec, source, fingerprint, layer, pooling, n_params, view?, tokens_per_image?}
                    view: "base" | "full" (absent in older files: base);
                    tokens_per_image: {visual: {min, mean, max}, lm: {min, mean, max}, images: n} over the
                    images the probes read (lm: what the MLLM's LM reads, image_newline tokens included),
                    or null when they could not be counted
    data            {dataset name: {root, splits: {split: size}, content_hash}}
    options         the suite's options (seeds, bootstrap, per_class, ...)
    probes          {name: {status: "ok",
                            metrics: {metric: {value, higher_is_better, statistic?: {name, **params},
                                               ci95?, ci?: {method: "bootstrap", over: "items", B, n, seed}
                                                    | {method: "probe"},
                                               values? (one per seed), seed_ci95? (t-interval over seeds)}},
                            items?: {file?: "items/<probe>.npz" (beside results.json), n, ids_sha256},
                            config (protocol settings only: hashed), config_hash, runtime (device, batch
                            sizes...: never hashed), data, wall_s, artifacts?: {kind: relative path},
                            undefined_metrics?: {metric: why it is left out for this data},
                            unscored?: {metric: why no item could be scored}, ...}
                     | {status: "failed", error, traceback, wall_s}}
    config_hashes   {probe: config_hash}
    env             {python, packages: {name: version}, device, dtype}
    timings         {load_s, probes_s: {probe: s}, total_s}

Version 2 files (no statistic/ci/items/runtime; ci95 is the t-interval over seeds and config holds
runtime settings too) and version 1 files (no data/env/timings blocks) still read: the report
only needs encoder.spec, encoder.fingerprint and probes.

Order: a run dir's results.json files are read in the order they were run (their ``created``
time, so ``probe run --encoder A --encoder B`` reads A first), not in the order of their
fingerprint-named directories; files and dirs named one by one keep the order they are given in.
"""
from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

from ..errors import DataError

SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
STATUSES = ("ok", "failed")
VIEWS = ("base", "full")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_interval(where: str, ci) -> None:
    if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(_number(c) for c in ci)
                               and ci[0] <= ci[1]):
        raise ValueError(f"{where}: must be [low, high] with low <= high, got {ci!r}")


def _check_relative(where: str, path) -> None:
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}: must be a path relative to the results.json dir")
    if Path(path).is_absolute() or ".." in Path(path).parts:
        raise ValueError(f"{where}: paths must be relative to the results.json dir, got {path!r}")


def _check_ci_block(where: str, ci) -> None:
    """How ci95 was made: a bootstrap over items (B resamples of n items, seeded) or the probe's own."""
    if not (isinstance(ci, dict) and isinstance(ci.get("method"), str) and ci["method"]):
        raise ValueError(f"{where}: must be an object with a method (bootstrap | probe)")
    if ci["method"] == "bootstrap":
        if not (_count(ci.get("B")) and ci["B"] >= 1 and _count(ci.get("n"))):
            raise ValueError(f"{where}: a bootstrap needs B >= 1 resamples and n items, got {ci!r}")
        if not isinstance(ci.get("over", "items"), str) or not isinstance(ci.get("seed", 0), int):
            raise ValueError(f"{where}: over must be a string and seed an integer, got {ci!r}")


def _check_metric(where: str, metric) -> None:
    if not isinstance(metric, dict):
        raise ValueError(f"{where}: must be an object with 'value' and 'higher_is_better'")
    if "value" not in metric or not (_number(metric["value"]) or metric["value"] is None):
        raise ValueError(f"{where}.value: must be a number")
    if _number(metric["value"]) and not math.isfinite(metric["value"]):
        raise ValueError(f"{where}.value: must be finite, got {metric['value']}")
    if not isinstance(metric.get("higher_is_better"), bool):
        raise ValueError(f"{where}.higher_is_better: must be true or false")
    _check_interval(f"{where}.ci95", metric.get("ci95"))
    _check_interval(f"{where}.seed_ci95", metric.get("seed_ci95"))
    values = metric.get("values")
    if values is not None and not (isinstance(values, list) and all(_number(v) for v in values)):
        raise ValueError(f"{where}.values: must be a list of numbers")
    statistic = metric.get("statistic")
    if statistic is not None and not (isinstance(statistic, dict) and isinstance(statistic.get("name"), str)
                                      and statistic["name"]):
        raise ValueError(f"{where}.statistic: must be an object with a name (e.g. {{\"name\": \"mean\", "
                         f"\"column\": \"top1\"}}), got {statistic!r}")
    if "ci" in metric:
        _check_ci_block(f"{where}.ci", metric["ci"])


def _check_items(where: str, items) -> None:
    """The per-item outcomes file a probe left beside results.json (what compare pairs)."""
    if not isinstance(items, dict):
        raise ValueError(f"{where}: must be an object with file, n and ids_sha256")
    if "file" in items:
        _check_relative(f"{where}.file", items["file"])
    if not _count(items.get("n")):
        raise ValueError(f"{where}.n: must be a count of items, got {items.get('n')!r}")
    digest = items.get("ids_sha256")
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise ValueError(f"{where}.ids_sha256: must be 64 hex digits, got {digest!r}")


def check_probe(name: str, probe) -> None:
    where = f"probes.{name}"
    if not isinstance(probe, dict):
        raise ValueError(f"{where}: must be an object")
    if probe.get("status") not in STATUSES:
        raise ValueError(f"{where}.status: must be one of {', '.join(STATUSES)}, got {probe.get('status')!r}")
    if probe["status"] == "failed":
        if not isinstance(probe.get("error"), str):
            raise ValueError(f"{where}.error: a failed probe must say why (a string)")
        return
    if not isinstance(probe.get("metrics"), dict):
        raise ValueError(f"{where}.metrics: must be an object of metrics")
    for metric, value in probe["metrics"].items():
        _check_metric(f"{where}.metrics.{metric}", value)
    for block in ("config", "runtime"):
        if block in probe and not isinstance(probe[block], dict):
            raise ValueError(f"{where}.{block}: must be an object")
    if "items" in probe:
        _check_items(f"{where}.items", probe["items"])
    if "config_hash" in probe and not isinstance(probe["config_hash"], str):
        raise ValueError(f"{where}.config_hash: must be a string")
    artifacts = probe.get("artifacts", {})
    if not (isinstance(artifacts, dict) and all(isinstance(v, str) for v in artifacts.values())):
        raise ValueError(f"{where}.artifacts: must map kind -> relative path")
    for kind, path in artifacts.items():
        _check_relative(f"{where}.artifacts.{kind}", path)
    warnings = probe.get("warnings", [])
    if not (isinstance(warnings, list) and all(isinstance(w, str) for w in warnings)):
        raise ValueError(f"{where}.warnings: must be a list of strings")
    for key in ("undefined_metrics", "unscored"):
        reasons = probe.get(key, {})
        if not (isinstance(reasons, dict) and all(isinstance(v, str) for v in reasons.values())):
            raise ValueError(f"{where}.{key}: must map metric -> why it is left out")


def _check_token_counts(counts) -> None:
    where = "encoder.tokens_per_image"
    if counts is None:
        return
    if not isinstance(counts, dict):
        raise ValueError(f"{where}: must be an object with visual and lm, or null")
    for kind in ("visual", "lm"):
        summary = counts.get(kind)
        if summary is None:
            continue
        if not (isinstance(summary, dict) and all(_number(summary.get(k)) for k in ("min", "mean", "max"))):
            raise ValueError(f"{where}.{kind}: must be {{min, mean, max}} numbers")
        if not summary["min"] <= summary["mean"] <= summary["max"] or summary["min"] < 0:
            raise ValueError(f"{where}.{kind}: needs 0 <= min <= mean <= max, got {summary!r}")
    if counts.get("images") is not None and not (_number(counts["images"]) and counts["images"] >= 0):
        raise ValueError(f"{where}.images: must be a count of images")


def check_record(record) -> None:
    """Raise ValueError naming the first field that breaks the schema."""
    if not isinstance(record, dict):
        raise ValueError("top level must be an object")
    version = record.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"schema_version: {version!r} is not one this version reads "
                         f"({', '.join(map(str, READABLE_VERSIONS))})")
    encoder = record.get("encoder")
    if not isinstance(encoder, dict):
        raise ValueError("encoder: missing (an object with spec and fingerprint)")
    for key in ("spec", "fingerprint"):
        if not isinstance(encoder.get(key), str) or not encoder[key]:
            raise ValueError(f"encoder.{key}: must be a non-empty string")
    if "view" in encoder and encoder["view"] not in VIEWS:
        raise ValueError(f"encoder.view: must be one of {', '.join(VIEWS)}, got {encoder['view']!r}")
    _check_token_counts(encoder.get("tokens_per_image"))
    probes = record.get("probes")
    if not isinstance(probes, dict):
        raise ValueError("probes: missing (an object of probe results)")
    for name, probe in probes.items():
        check_probe(name, probe)
    for block in ("data", "env", "timings", "options", "config_hashes"):
        if block in record and not isinstance(record[block], dict):
            raise ValueError(f"{block}: must be an object")


def validate(record, path="results.json") -> dict:
    """The record, or DataError '<path>: <field>: <problem>'."""
    try:
        check_record(record)
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
    return record


def load_results(path: str | Path) -> dict:
    """Read and validate one results.json; the record gets ``_path`` (where it was read from)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    try:
        record = json.loads(text)
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    validate(record, path)
    record["_path"] = str(path)
    return record


def results_files(run: str | Path) -> list[Path]:
    """RUN = a results.json, or a run dir holding ``*/results.json`` (or a results.json itself).

    A dir's files come in path order here; :func:`load_runs` puts them in the order they were run."""
    run = Path(run)
    if run.is_file():
        return [run]
    if run.is_dir():
        found = sorted(run.glob("*/results.json")) or ([run / "results.json"] if (run / "results.json").is_file()
                                                       else [])
        if not found:
            raise DataError(f"{run}: no results.json in it or in its subdirectories")
        return found
    raise DataError(f"{run}: no such file or directory")


def created_at(record: dict) -> datetime | None:
    """When the run was made (``created``, timezone-aware; naive times are UTC), None if unknown."""
    try:
        when = datetime.fromisoformat(str(record["created"]))
    except (KeyError, TypeError, ValueError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def run_order(records: list[dict]) -> list[dict]:
    """Records in the order they were run: by ``created``, ties and records without one after
    the dated ones in their given order (a stable sort)."""
    def key(item):
        i, record = item
        when = created_at(record)
        return (0, when, i) if when is not None else (1, datetime.min.replace(tzinfo=timezone.utc), i)
    return [record for _, record in sorted(enumerate(records), key=key)]


def load_runs(runs) -> list[dict]:
    """Every results.json that the RUN arguments name, validated: arguments in the order given,
    the files inside one run dir in the order they were run (:func:`run_order`)."""
    if isinstance(runs, (str, Path, dict)):
        runs = [runs]
    records = []
    for run in runs:
        if isinstance(run, dict):
            records.append(validate(run, run.get("_path", "<record>")))
        else:
            found = results_files(run)
            loaded = [load_results(f) for f in found]
            records += run_order(loaded) if Path(run).is_dir() else loaded
    if not records:
        raise DataError("no results to read")
    return records
