"""Runs a suite of probes on encoders and writes one results.json per encoder, atomically."""
from __future__ import annotations

import platform
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from .cache import atomic_write_json
from .encoders import load_encoder
from .errors import EncoderProbeError
from .probe import get_probe, resolve_suite

SCHEMA_VERSION = 1


def _env(encoder) -> dict:
    import torch
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "device": str(encoder.device), "dtype": str(encoder.dtype).removeprefix("torch.")}


def run_suite(encoders: list[str], suite, out: str | Path, *, device=None, dtype=None, data=None,
              seeds: int = 1, options: dict | None = None, cache=None, **load_options) -> list[dict]:
    """Run every probe of ``suite`` on each encoder spec; a failing probe is recorded, the rest still run.

    ``options`` (per_class, solver, pool, ...) go to every probe, which takes the ones it knows;
    extracted features are cached in ``cache`` (default: the user cache), so reruns are cheap.
    """
    names = resolve_suite(suite)
    out = Path(out)
    results = []
    for spec in encoders:
        encoder = load_encoder(spec, device=device, dtype=dtype, **load_options)
        record = {"schema_version": SCHEMA_VERSION, "created": datetime.now(timezone.utc).isoformat(),
                  "encoder": {"spec": spec, "source": encoder.source, "fingerprint": encoder.fingerprint,
                              "layer": encoder.layer, "n_params": encoder.n_params},
                  "data": data or {}, "env": _env(encoder), "probes": {}}
        for name in names:
            start = time.perf_counter()
            try:
                result = get_probe(name).run(encoder, data, {"seeds": seeds, "device": device, **(options or {})},
                                             {"out": out, "cache": cache})
                record["probes"][name] = {"status": "ok", **dict(result)}
            except EncoderProbeError:
                raise  # bad input (data, spec): one line, exit 2, no results.json for this encoder
            except Exception as e:  # a probe's own failure is recorded; the other probes still run
                record["probes"][name] = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                          "traceback": traceback.format_exc(limit=5)}
            record["probes"][name]["wall_s"] = round(time.perf_counter() - start, 3)
        atomic_write_json(out / encoder.fingerprint[:16] / "results.json", record)
        results.append(record)
    return results
