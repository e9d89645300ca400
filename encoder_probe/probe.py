"""The probe registry: probes register under the ``encoder_probe.probes`` entry point group
(built-in ones in probes/, third-party ones from their own packages) or in-process."""
from __future__ import annotations

from importlib.metadata import entry_points

from .errors import SpecError

_IN_PROCESS: dict[str, object] = {}


def register_probe(name: str, probe) -> None:
    """Register a probe object in this process (notebooks, tests, plugins not installed as packages)."""
    _IN_PROCESS[name] = probe


def available_probes() -> dict[str, str]:
    """name -> where it comes from, without importing the probes."""
    found = {ep.name: ep.value for ep in entry_points(group="encoder_probe.probes")}
    found.update({name: f"{type(p).__module__}.{type(p).__qualname__} (in-process)" for name, p in _IN_PROCESS.items()})
    return dict(sorted(found.items()))


def get_probe(name: str):
    if name in _IN_PROCESS:
        return _IN_PROCESS[name]
    for ep in entry_points(group="encoder_probe.probes"):
        if ep.name == name:
            obj = ep.load()
            return obj() if isinstance(obj, type) else obj
    installed = ", ".join(available_probes()) or "none installed yet"
    raise SpecError(f"unknown probe {name!r} (available: {installed})")


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
    return names
