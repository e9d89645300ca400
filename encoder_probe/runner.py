"""Runs a suite of probes on encoders and writes one results.json per encoder, atomically.

The record follows the versioned schema in ``encoder_probe.report.schema``: what was measured
(encoder, data with content hashes, probe configs and their hashes) sits beside the numbers,
so a report can tell whether two results are comparable without rerunning anything.
"""
from __future__ import annotations

import json
import platform
import time
import traceback
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .cache import atomic_write_json, cache_root
from .encoders import load_encoder
from .errors import DataError, EncoderProbeError
from .probe import get_probe, resolve_suite
from .report.schema import SCHEMA_VERSION, check_probe, validate

PACKAGES = ("encoder-probe", "torch", "torchvision", "timm", "transformers", "open_clip_torch", "scikit-learn",
            "numpy", "safetensors", "pillow")
DEFAULT_DATA = {"imagenet": None, "ade20k": None}  # the built-in demo data, in both of its layouts
SPLITS = ("train", "val")


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
    memo = Path(cache if cache is not None else cache_root() / "features") / ".file-hashes"
    described = {}
    for name, root in (data or DEFAULT_DATA).items():
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


def _run_probe(name: str, encoder, data, options: dict, context: dict) -> dict:
    start = time.perf_counter()
    try:
        result = {"status": "ok", **dict(get_probe(name).run(encoder, data, options, context))}
    except EncoderProbeError:
        raise  # bad input (data, spec): one line, exit 2, no results.json for this encoder
    except Exception as e:  # a probe's own failure is recorded; the other probes still run
        result = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc(limit=5)}
    result["wall_s"] = round(time.perf_counter() - start, 3)
    try:
        check_probe(name, result)
        json.dumps(result)
    except (ValueError, TypeError) as e:  # a probe that breaks the results schema has failed, as one that raised
        result = {"status": "failed", "error": f"result breaks the results.json schema: {e}",
                  "wall_s": result["wall_s"]}
    return result


def run_suite(encoders: str | list[str], suite, out: str | Path, *, device=None, dtype=None, data=None,
              seeds: int = 1, options: dict | None = None, cache=None, progress: bool = True,
              **load_options) -> list[dict]:
    """Run every probe of ``suite`` on each encoder spec; a failing probe is recorded, the rest still run.

    ``options`` (per_class, solver, pool, ...) go to every probe, which takes the ones it knows;
    extracted features are cached in ``cache`` (default: the user cache), so reruns are cheap.
    Returns the records written to ``out/<fingerprint[:16]>/results.json``.
    """
    encoders = [encoders] if isinstance(encoders, str) else list(encoders)
    names = resolve_suite(suite)
    out = Path(out)
    shared = {"seeds": seeds, "device": device, **(options or {})}
    results = []
    for spec in encoders:
        start = time.perf_counter()
        encoder = load_encoder(spec, device=device, dtype=dtype, **load_options)
        loaded = time.perf_counter()
        record = {"schema_version": SCHEMA_VERSION, "created": datetime.now(timezone.utc).isoformat(),
                  "encoder": {"spec": spec, "source": encoder.source, "fingerprint": encoder.fingerprint,
                              "layer": encoder.layer, "pooling": shared.get("pool") or "mean",
                              "n_params": encoder.n_params},
                  "data": {},
                  "options": {k: v for k, v in shared.items() if v is not None},
                  "env": environment(encoder), "probes": {}}
        context = {"out": out, "cache": cache, "progress": progress}
        for name in names:
            record["probes"][name] = _run_probe(name, encoder, data, shared, context)
        # after the probes, so that a probe's own message about unusable data is the one shown
        record["data"] = describe_data(data, cache, shared.get("per_class"))
        record["config_hashes"] = {name: p["config_hash"] for name, p in record["probes"].items()
                                   if p.get("config_hash")}
        record["timings"] = {"load_s": round(loaded - start, 3),
                             "probes_s": {name: p["wall_s"] for name, p in record["probes"].items()},
                             "total_s": round(time.perf_counter() - start, 3)}
        validate(record, out / encoder.fingerprint[:16] / "results.json")  # the runner's own blocks
        atomic_write_json(out / encoder.fingerprint[:16] / "results.json", record)
        results.append(record)
    return results
