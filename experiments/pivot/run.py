"""Run stages of paper.json: its command lines with ``${VAR}`` taken from the environment.

    RUNS=... SIGLIP2_DIR=... python experiments/pivot/run.py pretrain dpo
    python experiments/pivot/run.py dpo --dry-run    # print the command only

Run from the repo root (the commands name experiments/pivot/*.yaml). An unset variable is a one-line
error naming every one the stages need; with ``--dry-run`` they are left as ``${VAR}`` in what is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

PAPER = Path(__file__).with_name("paper.json")
_VAR = re.compile(r"\$\{(\w+)\}")


def command(spec: dict, stage: str, env=os.environ) -> tuple[str, set[str]]:
    """The stage's command line with the set variables filled in, and the names of the unset ones."""
    line = spec["stages"][stage]
    missing = {name for name in _VAR.findall(line) if name not in env}
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), line), missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stages", nargs="+", metavar="STAGE", help="stages to run, in the order given")
    parser.add_argument("--config", default=str(PAPER), help="the experiment file (default: paper.json)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.config).read_text())
    unknown = [s for s in args.stages if s not in spec["stages"]]
    if unknown:
        return _fail(f"{args.config}: no stage {', '.join(unknown)} (has {', '.join(spec['stages'])})")
    lines, missing = zip(*(command(spec, s) for s in args.stages))
    missing = sorted(set().union(*missing))
    if missing and not args.dry_run:
        return _fail(f"{args.config}: stage {' '.join(args.stages)} needs environment variables {', '.join(missing)}")
    for stage, line in zip(args.stages, lines):
        print(line, flush=True)
        if not args.dry_run:
            done = subprocess.run(shlex.split(line))
            if done.returncode:
                _fail(f"stage {stage} failed (exit {done.returncode}): {line}")
                return done.returncode
    return 0


def _fail(message: str) -> int:
    print(f"run.py: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
