"""Toy SFT-vs-DPO experiment: does DPO change the tower differently from SFT, beyond seed noise?

For each seed: a tiny base MLLM (stage 1) on the demo VQA pairs, then SFT and DPO from that base
on the same pairs (the `probe demo` recipe, encoder_probe.pivot.demo), then the probe suite on
the base, SFT and DPO towers. Reported: each metric per tower (mean, 95% CI over seeds) and the
paired difference DPO - SFT with its 95% t-interval; an interval that holds 0 is "within noise".

    python experiments/pivot/toy_sft_vs_dpo.py --seeds 3 --out runs/toy-sft-vs-dpo
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from encoder_probe.cache import atomic_write_bytes, atomic_write_json
from encoder_probe.pivot.demo import DEMO_PAIRS, DEMO_PER_CLASS, DEMO_SUITE, train_demo_models
from encoder_probe.probe import seed_interval
from encoder_probe.runner import run_suite


def summarize(values) -> dict:
    """Mean over seeds and its 95% t-interval (none for one seed)."""
    values = [float(v) for v in values]
    return {"value": float(np.mean(values)), "values": values, "ci95": seed_interval(values)}


def metrics_of(record: dict) -> dict[str, float]:
    return {m: v["value"] for p in record["probes"].values() for m, v in p.get("metrics", {}).items()}


def run(out: Path, seeds: int, suite: str, pairs: int, per_class: int) -> dict:
    values: dict[str, list[dict]] = {"base": [], "sft": [], "dpo": []}
    for seed in range(seeds):
        models = train_demo_models(out / f"seed-{seed}", pairs=pairs, seed=seed)
        for name, run_dir in models.items():
            record, = run_suite([str(run_dir)], suite, out / f"seed-{seed}" / "results", cache=out / "features",
                                options={"per_class": per_class})
            values[name].append(metrics_of(record))
    names = sorted(set.intersection(*(set(v) for runs in values.values() for v in runs)))
    table = {}
    for metric in names:
        row = {tower: summarize([r[metric] for r in runs]) for tower, runs in values.items()}
        diff = np.array([d[metric] for d in values["dpo"]]) - np.array([s[metric] for s in values["sft"]])
        row["dpo-sft"] = summarize(diff)
        ci = row["dpo-sft"].get("ci95")
        row["within_noise"] = None if ci is None else bool(ci[0] <= 0 <= ci[1])
        table[metric] = row
    return {"seeds": seeds, "suite": suite, "pairs": pairs, "per_class": per_class, "metrics": table}


def markdown(result: dict) -> str:
    def cell(s):
        ci = s.get("ci95")
        return f"{s['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    lines = [f"Toy SFT vs DPO ({result['seeds']} seeds, {result['pairs']} pairs, suite {result['suite']}); "
             "mean [95% CI]", "", "| metric | base | SFT | DPO | DPO - SFT | within noise |",
             "|---|---|---|---|---|---|"]
    for metric, row in result["metrics"].items():
        noise = {None: "n/a (1 seed)", True: "yes", False: "no"}[row["within_noise"]]
        lines.append(f"| {metric} | {cell(row['base'])} | {cell(row['sft'])} | {cell(row['dpo'])} | "
                     f"{cell(row['dpo-sft'])} | {noise} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/toy-sft-vs-dpo")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--suite", default=DEMO_SUITE)
    parser.add_argument("--pairs", type=int, default=DEMO_PAIRS)
    parser.add_argument("--per-class", type=int, default=DEMO_PER_CLASS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    result = run(out, args.seeds, args.suite, args.pairs, args.per_class)
    atomic_write_json(out / "summary.json", result)
    text = markdown(result)
    atomic_write_bytes(out / "summary.md", text.encode())
    print(text, end="")
    print(f"summary in {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
