"""Runs a suite of probes on encoders and writes one results.json per encoder, atomically.

The record follows the versioned schema in ``encoder_probe.report.schema``: what was measured
(encoder, data with content hashes, probe configs and their hashes) sits beside the numbers,
so a report can tell whether two results are comparable without rerunning anything.

Everything a suite could refuse (out and cache directories, device, dtype, probe names, every
encoder spec and the view each must give) is checked before the first encoder is loaded. The
encoder block records the view (``base`` or ``full``) and the tokens per image (visual and LM
tokens, min/mean/max over the images the probes read). The ``data`` block describes the
datasets the probes actually opened (``probe.pick_dataset`` reports them via
:func:`note_dataset_read`).
"""
from __future__ import annotations

import json
import platform
import time
import traceback
from contextvars import ContextVar
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .cache import atomic_write_json, cache_root, check_writable_dir
from .encoders import load_encoder
from .errors import DataError, EncoderProbeError, SpecError
from .probe import get_probe, resolve_suite

PACKAGES = ("encoder-probe", "torch", "torchvision", "timm", "transformers", "open_clip_torch", "scikit-learn",
            "numpy", "safetensors", "pillow")
DEFAULT_DATA = {"imagenet": None, "ade20k": None}  # the built-in demo data, in both of its layouts
SPLITS = ("train", "val")

# (name -> root) of the datasets the running suite's probes opened; None outside run_suite
_DATASETS_READ: ContextVar[dict | None] = ContextVar("encoder_probe_datasets_read", default=None)


def note_dataset_read(name: str, root) -> tuple[str, object]:
    """Record that a probe of the running suite reads dataset ``name`` at ``root`` (None = built-in
    data); returns ``(name, root)``. A no-op outside :func:`run_suite` (a notebook calling a probe)."""
    read = _DATASETS_READ.get()
    if read is not None:
        read.setdefault(name, root)
    return name, root


# (encoder fingerprint -> {data key: FeatureSet}) of the entries the running suite's probes read
_FEATURES_READ: ContextVar[dict | None] = ContextVar("encoder_probe_features_read", default=None)


def note_features_read(fingerprint: str, features) -> None:
    """Record that a probe of the running suite read ``features`` of the encoder ``fingerprint``
    (``features.extract`` calls it); a no-op outside :func:`run_suite`."""
    read = _FEATURES_READ.get()
    if read is not None:
        data = json.dumps(features.meta["key"]["data"], sort_keys=True)  # the same images once, whatever the layers
        read.setdefault(fingerprint, {}).setdefault(data, features)


def check_view(spec: str | None, view) -> str:
    """A --view value that ``spec`` can give, before anything is loaded: base, or full for the sources
    that have a full view (MLLM checkpoints); the checkpoint itself is checked when it is loaded."""
    from .encoders.registry import check_view as source_view, parse_spec
    try:
        return source_view(parse_spec(spec)[0] if spec is not None else None, spec or "", view)
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
    memo = Path(cache if cache is not None else cache_root() / "features") / ".file-hashes"
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


def _run_probe(name: str, encoder, data, options: dict, context: dict) -> dict:
    from .report.schema import check_probe
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
    from .report.schema import SCHEMA_VERSION, validate
    encoders = [encoders] if isinstance(encoders, str) else list(encoders)
    names = resolve_suite(suite)
    _check_inputs(encoders, out, cache, device=device, dtype=dtype, seeds=seeds, options=options,
                  load_options=load_options)
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
                              "n_params": encoder.n_params, "view": encoder.view},
                  "data": {},
                  "options": {k: v for k, v in shared.items() if v is not None},
                  "env": environment(encoder), "probes": {}}
        context = {"out": out, "cache": cache, "progress": progress}
        read: dict = {}
        features_read: dict = {}
        token, features_token = _DATASETS_READ.set(read), _FEATURES_READ.set(features_read)
        try:
            for name in names:
                record["probes"][name] = _run_probe(name, encoder, data, shared, context)
        finally:
            _DATASETS_READ.reset(token)
            _FEATURES_READ.reset(features_token)
        record["encoder"]["tokens_per_image"] = tokens_per_image(encoder, features_read.get(encoder.fingerprint))
        # after the probes, so that a probe's own message about unusable data is the one shown; only what
        # they opened (a probe that does not report its data through pick_dataset: the --data given, if any)
        record["data"] = describe_data(read or data or {}, cache, shared.get("per_class"))
        record["config_hashes"] = {name: p["config_hash"] for name, p in record["probes"].items()
                                   if p.get("config_hash")}
        record["timings"] = {"load_s": round(loaded - start, 3),
                             "probes_s": {name: p["wall_s"] for name, p in record["probes"].items()},
                             "total_s": round(time.perf_counter() - start, 3)}
        validate(record, out / encoder.fingerprint[:16] / "results.json")  # the runner's own blocks
        atomic_write_json(out / encoder.fingerprint[:16] / "results.json", record)
        results.append(record)
    return results


def _check_inputs(encoders: list, out, cache, *, device, dtype, seeds, options, load_options) -> None:
    """Everything a suite could refuse, before the first encoder is loaded: a bad 2nd spec or an
    unwritable out fails in a second, not after the 1st encoder's probes."""
    from .encoders.registry import parse_device, parse_dtype, parse_image_size, parse_spec
    if not encoders:
        raise SpecError("no encoder given")
    check_writable_dir(out, "out")
    check_writable_dir(cache if cache is not None else cache_root() / "features", "cache")
    parse_device(device)
    parse_dtype(dtype)
    if load_options.get("image_size") is not None:
        parse_image_size(load_options["image_size"])
    for spec in encoders:
        check_view(spec, load_options.get("view"))
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise SpecError(f"seeds must be an integer >= 1, got {seeds!r}")
    references = (options or {}).get("reference") or []
    for spec in [*encoders, *([references] if isinstance(references, str) else references)]:
        parse_spec(spec)


def _fmt(value) -> str:
    if value is None:
        return "-"
    value = float(value)
    return f"{value:.3f}" if abs(value) < 1e4 else f"{value:.4g}"


def summary_table(records: list[dict]) -> str:
    """One row per encoder x probe x metric: value, and its 95% CI when the record has one
    (``0.812 [0.790, 0.834]``); a failed probe is one row saying so. Plain text, for the terminal."""
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
                rows.append((spec, probe, metric, text))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * max(len(row[3]) for row in rows))
    return "\n".join(line.rstrip() for line in lines) + "\n"
