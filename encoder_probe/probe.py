"""The probe contract and the probe registry.

A probe is a class with a ``name``, what it ``needs`` (data kinds, other probes' outputs), a
``Config`` dataclass and ``run(ctx, cfg) -> ProbeResult``::

    @dataclass
    class KNNConfig:
        ks: list[int] = protocol([10, 20], min=1)
        batch_size: int = runtime(64, min=1)

    class KNNProbe(Probe):
        name, needs, Config = "knn", Needs(data=("classification",)), KNNConfig

        def run(self, ctx, cfg):
            ...
            return ProbeResult(metrics={"top1": Metric(0.91, statistic={"name": "mean", "column": "top1"})},
                               items=Items(ids, {"top1": hits[None]}))

Config fields are *protocol* (hashed; two results compare only when these match) or *runtime*
(device, batch sizes, how many pictures: recorded, never hashed). The runner routes
``--option key=value`` to every probe that declares ``key`` and ``--option probe.key=value`` to
one, validates types and ranges before any work, times, hashes, bootstraps the metrics over
the items and writes results.json; a probe does none of that itself.

Probes register under the ``encoder_probe.probes`` entry point group (the built-in ones in
probes/, third-party ones from their own packages) or in-process with :func:`register_probe`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import numpy as np

from .errors import SpecError
from .items import Items

PROTOCOL, RUNTIME = "protocol", "runtime"


# -- config fields -----------------------------------------------------------------------------
def _field(kind: str, default, choices, min, max, gt, lt, help):
    metadata = {"kind": kind, "choices": tuple(choices) if choices is not None else None, "min": min, "max": max,
                "gt": gt, "lt": lt, "help": help}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def protocol(default=None, *, choices=None, min=None, max=None, gt=None, lt=None, help: str = ""):
    """A config field that is part of the protocol: hashed, and must match for two results to compare."""
    return _field(PROTOCOL, default, choices, min, max, gt, lt, help)


def runtime(default=None, *, choices=None, min=None, max=None, gt=None, lt=None, help: str = ""):
    """A config field that says how the probe runs, not what it measures (device, batch size,
    pictures shown): recorded beside the result, never hashed."""
    return _field(RUNTIME, default, choices, min, max, gt, lt, help)


def field_kind(f: dataclasses.Field) -> str:
    """protocol or runtime (a plain dataclass field counts as protocol: hashing too much is safe)."""
    return f.metadata.get("kind", PROTOCOL)


def split_config(cfg) -> tuple[dict, dict]:
    """(protocol fields, runtime fields) of a config instance, JSON-able."""
    parts = {PROTOCOL: {}, RUNTIME: {}}
    for f in dataclasses.fields(cfg):
        parts[field_kind(f)][f.name] = getattr(cfg, f.name)
    return parts[PROTOCOL], parts[RUNTIME]


def config_hash(config: dict) -> str:
    """16 hex digits of sha256 over the protocol settings (sorted JSON)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- what a probe declares and returns ---------------------------------------------------------
@dataclass(frozen=True)
class Needs:
    """``data``: the data kinds a probe reads (classification, segmentation, vqa); ``probes``: the
    probes whose outputs it may ask the run context for (``ctx.output(name)``)."""

    data: tuple[str, ...] = ()
    probes: tuple[str, ...] = ()


@dataclass
class Metric:
    """One number and how to judge it. ``statistic`` says how the bootstrap recomputes it from the
    probe's per-item outcomes (``{"name": "mean", "column": "top1"}``); ``values`` holds one value
    per seed when the probe reran its training with several seeds (``value`` is their mean);
    ``ci95`` (and ``ci``, saying how) is set only by a probe that computed its own interval."""

    value: float
    higher_is_better: bool = True
    statistic: dict | None = None
    values: list[float] | None = None
    ci95: list[float] | None = None
    ci: dict | None = None  # how a probe's own ci95 was made ({"method": "half-sampling", "B": ...})


@dataclass
class ProbeResult:
    """What ``Probe.run`` returns. ``details`` (sweeps, chosen C, per-class IoU...) are merged into
    the probe's results.json entry; ``protocol`` holds protocol facts resolved while running (the
    view, a resolved target kind, the grid), hashed with the config; ``outputs`` are in-memory
    objects for the probes that need this one (the linear probe's head), never written."""

    metrics: dict[str, Metric]
    items: Items | None = None
    details: dict = field(default_factory=dict)
    protocol: dict = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    undefined: dict[str, str] = field(default_factory=dict)
    unscored: dict[str, str] = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)


class Probe:
    """Base class of probes (subclassing is optional: the runner reads ``name``, ``needs``,
    ``Config`` and ``run``)."""

    name: str = ""
    needs: Needs = Needs()
    Config: type = None

    def run(self, ctx, cfg) -> ProbeResult:
        raise NotImplementedError


def seed_interval(values) -> list[float] | None:
    """95% t-interval of the mean over seeds; None for a single seed."""
    values = [float(v) for v in values]
    if len(values) < 2:
        return None
    from scipy import stats
    half = stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values))
    mean = float(np.mean(values))
    return [mean - half, mean + half]


def over_seeds(values, higher_is_better: bool = True, statistic: dict | None = None) -> Metric:
    """A metric from one value per seed: their mean, with the per-seed values kept when there are several."""
    values = [float(v) for v in values]
    return Metric(float(np.mean(values)), higher_is_better, statistic, values if len(values) > 1 else None)


# -- the registry ------------------------------------------------------------------------------
_IN_PROCESS: dict[str, object] = {}
GROUP = "encoder_probe.probes"


def register_probe(name: str, probe) -> None:
    """Register a probe (class or instance) in this process: notebooks, tests, unpackaged plugins."""
    _IN_PROCESS[name] = probe


def available_probes() -> dict[str, str]:
    """name -> where it comes from, without importing the probes."""
    found = {ep.name: ep.value for ep in entry_points(group=GROUP)}
    found.update({name: f"{_qualname(p)} (in-process)" for name, p in _IN_PROCESS.items()})
    return dict(sorted(found.items()))


def _qualname(probe) -> str:
    cls = probe if isinstance(probe, type) else type(probe)
    return f"{cls.__module__}:{cls.__qualname__}"


def get_probe(name: str):
    """The probe registered as ``name``, instantiated, checked against the contract."""
    if name in _IN_PROCESS:
        obj = _IN_PROCESS[name]
    else:
        for ep in entry_points(group=GROUP):
            if ep.name == name:
                try:
                    obj = ep.load()
                except Exception as e:  # a broken plugin names itself, in one line
                    raise SpecError(f"probe {name!r} ({ep.value}) failed to import: {type(e).__name__}: {e}") from None
                break
        else:
            installed = ", ".join(available_probes()) or "none installed yet"
            raise SpecError(f"unknown probe {name!r} (available: {installed})")
    probe = obj() if isinstance(obj, type) else obj
    check_probe_class(name, probe)
    return probe


def check_probe_class(name: str, probe) -> None:
    """A plugin that does not follow the contract fails here, in one line, before any work."""
    where = f"probe {name!r} ({_qualname(probe)})"
    config = getattr(probe, "Config", None)
    if config is None or not dataclasses.is_dataclass(config):
        raise SpecError(f"{where}: needs a Config dataclass (see encoder_probe.probe)")
    if not callable(getattr(probe, "run", None)):
        raise SpecError(f"{where}: needs run(ctx, cfg) -> ProbeResult")
    needs = getattr(probe, "needs", Needs())
    if not isinstance(needs, Needs):
        raise SpecError(f"{where}: needs must be an encoder_probe.probe.Needs, got {type(needs).__name__}")


def provenance(probe) -> dict:
    """Which code ran: the probe class and the version of the package that ships it."""
    from importlib.metadata import PackageNotFoundError, packages_distributions, version
    module = type(probe).__module__
    out = {"class": _qualname(probe)}
    top = module.split(".")[0]
    for dist in packages_distributions().get(top, []):
        try:
            out.update(package=dist, version=version(dist))
        except PackageNotFoundError:
            pass
        break
    return out


def resolve_suite(suite: str | list[str]) -> list[str]:
    """Split and validate a suite ('imagenet,seg,gradcam') before any work starts."""
    names = [s.strip() for s in (suite.split(",") if isinstance(suite, str) else suite) if s.strip()]
    if not names:
        raise SpecError("empty --suite")
    available = available_probes()
    unknown = [n for n in names if n not in available]
    if unknown:
        listed = ", ".join(available) or "none installed yet"
        raise SpecError(f"unknown probe(s) {', '.join(unknown)} (available: {listed})")
    return list(dict.fromkeys(names))


def last_layers(encoder, k: int) -> list:
    """The encoder's layer alone (k = 1), or the last k blocks up to it (DINOv2's last-k concatenation)."""
    last = encoder.layer if encoder.layer != "final" else encoder.layers.available
    return [encoder.layer] if k == 1 else list(range(last - k + 1, last + 1))


def topk_defined(n_classes: int, k: int) -> bool:
    """top-k says something only with more than k classes (else it is 1.0 by construction)."""
    return n_classes > k
