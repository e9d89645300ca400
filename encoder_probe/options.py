"""Probe options: routed to the probes that declare them, typed and range-checked before any work.

``--option key=value`` goes to every probe of the run whose Config declares ``key``;
``--option probe.key=value`` to that probe alone. A key no probe of the run declares, a value of
the wrong type and a value out of range are one-line SpecErrors (exit 2) raised before the first
encoder is loaded; nothing is dropped silently.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing

from .errors import SpecError


def _unwrap(annotation):
    """(base type, element type or None, optional?) of a field annotation (strings resolved)."""
    origin = typing.get_origin(annotation)
    optional = False
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else object
        origin = typing.get_origin(annotation)
    if origin is list or annotation is list:
        args = typing.get_args(annotation)
        return list, (args[0] if args else None), optional
    return annotation, None, optional


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _number(value):
    """An int or float from a number or its text (never a bool), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value)
            except ValueError:
                pass
    return None


def _scalar(value, kind, describe: str):
    if kind in (None, object, typing.Any):
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif kind in (int, float):
        number = _number(value)
        if number is not None and (kind is float or float(number).is_integer()):
            return kind(number)
    elif kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. layer names given as numbers stay the user's text
    else:
        return value
    raise SpecError(f"{describe} must be {_NAMES.get(kind, kind.__name__)}, got {value!r}")


def _check_range(value, meta: dict, describe: str) -> None:
    if value is None:
        return
    values = value if isinstance(value, list) else [value]
    for v in values:
        if meta.get("choices") is not None and v not in meta["choices"]:
            raise SpecError(f"{describe} must be one of {', '.join(map(str, meta['choices']))}, got {v!r}")
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        for key, ok, word in (("min", lambda a, b: a >= b, ">="), ("max", lambda a, b: a <= b, "<="),
                              ("gt", lambda a, b: a > b, ">"), ("lt", lambda a, b: a < b, "<")):
            bound = meta.get(key)
            if bound is not None and not ok(v, bound):
                raise SpecError(f"{describe} must be {word} {bound}, got {v!r}")


def coerce(f: dataclasses.Field, value, describe: str, hints: dict):
    """``value`` as field ``f`` types it (JSON from the command line, or a Python value), range-checked."""
    kind, element, optional = _unwrap(hints.get(f.name, f.type))
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and kind is not str):
        if optional or f.default is None:
            return None
        raise SpecError(f"{describe} cannot be null")
    if kind is list:
        given = value
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = [v.strip() for v in value.split(",") if v.strip()]
            value = parsed
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            value = [value]
        if element is not None:
            try:
                value = [_scalar(v, element, describe) for v in value]
            except SpecError:
                raise SpecError(f"{describe} must be a list of {_NAMES.get(element, 'values').split(' ', 1)[-1]}s, "
                                f"got {given!r}") from None
    else:
        value = _scalar(value, kind, describe)
    _check_range(value, f.metadata, describe)
    return value


def option_keys(config_cls) -> list[str]:
    return [f.name for f in dataclasses.fields(config_cls)]


def build_config(probe_name: str, config_cls, given: dict, *, origin: dict | None = None):
    """A validated Config of ``probe_name`` from ``given`` {key: value}; ``origin`` maps a key to how the
    user wrote it (``--option ks=abc``) for the error."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    values = {}
    for key, value in given.items():
        if key not in fields:
            raise SpecError(f"{(origin or {}).get(key, key)}: probe {probe_name!r} takes no option {key!r} "
                            f"(its options: {', '.join(fields)})")
        where = (origin or {}).get(key)
        describe = f"{where}: {probe_name}.{key}" if where else f"{probe_name}.{key}"
        values[key] = coerce(fields[key], value, describe, hints)
    try:
        cfg = config_cls(**values)
    except TypeError as e:
        raise SpecError(f"probe {probe_name!r}: {e}") from None
    check = getattr(cfg, "check", None)
    if callable(check):
        try:
            check()
        except (ValueError, TypeError) as e:
            raise SpecError(f"probe {probe_name!r}: {e}") from None
    return cfg


def route(options: dict | None, probes: dict, *, run_level: dict | None = None,
          origin: dict | None = None) -> dict:
    """{probe name: validated Config} for the probes of a run.

    ``options``: {key or "probe.key": value}; a plain key goes to every probe declaring it and must
    be declared by at least one, a dotted key goes to that probe. ``run_level`` ({"seeds": 3,
    "device": "cuda"}) fills the fields of those names where a probe declares them and the user
    did not route the key. ``origin`` maps an option key to the user's text, for errors."""
    options = dict(options or {})
    origin = dict(origin or {})
    per_probe: dict[str, dict] = {name: {} for name in probes}
    origins: dict[str, dict] = {name: {} for name in probes}
    declared = {name: set(option_keys(p.Config)) for name, p in probes.items()}
    for key, value in options.items():
        shown = origin.get(key, f"option {key!r}")
        head, dot, rest = key.partition(".")
        if dot:
            if head not in probes:
                raise SpecError(f"{shown}: no probe {head!r} in this run (probes: {', '.join(probes)})")
            per_probe[head][rest] = value
            origins[head][rest] = shown
            continue
        takers = [name for name, keys in declared.items() if key in keys]
        if not takers:
            listed = "; ".join(f"{name}: {', '.join(sorted(keys))}" for name, keys in declared.items())
            raise SpecError(f"{shown}: no probe of this run takes {key!r} ({listed})")
        for name in takers:
            per_probe[name].setdefault(key, value)
            origins[name].setdefault(key, shown)
    for key, value in (run_level or {}).items():
        if value is None:
            continue
        for name in probes:
            if key in declared[name] and key not in per_probe[name]:
                per_probe[name][key] = value
                origins[name][key] = f"--{key.replace('_', '-')} {value}"
    return {name: build_config(name, probe.Config, per_probe[name], origin=origins[name])
            for name, probe in probes.items()}


def parse_option_items(items) -> tuple[dict, dict]:
    """``KEY=VALUE`` strings (repeatable ``--option``) -> ({key: value}, {key: the item as typed}).
    Values are JSON where they parse (numbers, lists, true/false/null), else strings; a repeated key
    collects a list; dashes in keys become underscores."""
    options: dict = {}
    origin: dict = {}
    for item in items or []:
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--option {item!r}: expected KEY=VALUE (or PROBE.KEY=VALUE)")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        key = key.strip().replace("-", "_")
        if key in options:
            value = (options[key] if isinstance(options[key], list) else [options[key]]) + [value]
        options[key] = value
        origin[key] = f"--option {item}"
    return options, origin


def describe(config_cls) -> list[str]:
    """One line per option: ``name  kind  type  default  help`` (what `probe list --options` prints)."""
    hints = typing.get_type_hints(config_cls)
    lines = []
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        hint = hints.get(f.name, f.type)
        shown = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        rules = [f"{k} {f.metadata[k]}" for k in ("min", "max", "gt", "lt") if f.metadata.get(k) is not None]
        if f.metadata.get("choices"):
            rules.append("one of " + "|".join(map(str, f.metadata["choices"])))
        extra = f" ({', '.join(rules)})" if rules else ""
        text = f.metadata.get("help", "")
        lines.append(f"{f.name:<16} {f.metadata.get('kind', 'protocol'):<8} {shown:<12} "
                     f"{json.dumps(default)}{extra}{'  ' + text if text else ''}")
    return lines
