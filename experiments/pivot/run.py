"""Run one stage of a JSON experiment config (paper.json) with the PIVOT trainer.

    torchrun --nproc_per_node 8 experiments/pivot/run.py experiments/pivot/paper.json dpo

Each stage is ``common`` updated by ``stages[NAME]``; ``${VAR}`` is read from the environment.
``--dry-run`` prints the resolved TrainConfig without touching any weights.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict, fields

from encoder_probe.errors import SpecError
from encoder_probe.pivot.train import TrainConfig, train

_VAR = re.compile(r"\$\{(\w+)\}")


def resolve(value, missing: set):
    if isinstance(value, str):
        def sub(match):
            if match.group(1) not in os.environ:
                missing.add(match.group(1))
                return match.group(0)
            return os.environ[match.group(1)]
        return _VAR.sub(sub, value)
    return value


def stage_config(path: str, stage: str, *, strict: bool = True) -> TrainConfig:
    """The TrainConfig of ``stage``; with ``strict``, unset ${VARS} are a one-line SpecError."""
    spec = json.loads(open(path).read())
    if stage not in spec["stages"]:
        raise SpecError(f"{path}: no stage {stage!r} (has {', '.join(spec['stages'])})")
    merged = {**spec.get("common", {}), **spec["stages"][stage]}
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise SpecError(f"{path}: stage {stage}: unknown keys {', '.join(unknown)}")
    missing: set = set()
    values = {k: resolve(v, missing) for k, v in merged.items()}
    if missing and strict:
        raise SpecError(f"{path}: stage {stage} needs environment variable(s) {', '.join(sorted(missing))}")
    return TrainConfig(**{k: v for k, v in values.items() if v is not None})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("stage")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    try:
        config = stage_config(args.config, args.stage, strict=not args.dry_run)
        if args.dry_run:
            print(json.dumps(asdict(config), indent=2))
            return 0
        train(config)
    except SpecError as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
