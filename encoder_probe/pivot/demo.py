"""The end of `probe demo`: what SFT and DPO do to a vision tower, on the built-in data, in about two minutes.

demo VQA pairs -> a fresh tiny LLaVA-OneVision (SigLIP-style tower + Qwen2 LM with a real BPE tokenizer
and chat template, `probe train pretrain`: projector, then everything) -> SFT and DPO from that same base on
the same pairs (TRL, tower unfrozen) -> the probe suite on the base, SFT and DPO towers. The same code
path as a 7B run; every stage is a resumable run dir, so a second `probe demo` reuses what the first trained.
"""
from __future__ import annotations

import csv
from pathlib import Path

from .. import toy
from .data import demo_pairs
from .train import TrainConfig, train

# 64 px tiles, patch 8: an 8x8 token grid per view the CPU trains in seconds; SigLIP-style (no CLS, mean 0.5)
DEMO_TOWER = dict(image_size=64, patch_size=8, num_hidden_layers=3)
DEMO_PAIRS = 128
DEMO_SUITE = "imagenet,knn,gradcam"  # gradcam on an MLLM dir = PIVOT's map of the demo VQA records
DEMO_PER_CLASS = 12  # images per class for the probes (the demo data has 40 train / 10 val)
SHOWN = ("loss", "rewards/accuracies", "rewards/margins")  # last training step of each run
SUITE_SHOWN = ("top1", "top1@k=10", "pointing_game@gradient-norm", "energy_in_mask@gradient-norm")


def _last_row(run: Path) -> dict:
    with (run / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    return rows[-1] if rows else {}


def train_demo_models(out, *, pairs: int = DEMO_PAIRS, seed: int = 0, progress: bool = True) -> dict[str, Path]:
    """Base (stage 1), SFT and DPO run dirs under ``out``; returns {name: save_pretrained MLLM dir}."""
    out = Path(out)
    tower, lm = out / "tower", out / "lm"
    if not (tower / "config.json").is_file():
        toy.write_siglip_dir(tower, seed=seed, **DEMO_TOWER)
    if not (lm / "config.json").is_file():
        toy.write_lm_dir(lm, seed=seed)
    common = dict(data=str(demo_pairs("train")), limit=pairs, batch_size=8, seed=seed, progress=progress,
                  warmup_ratio=0.0, lr=1e-3, save_every=0)
    runs = {"base": TrainConfig(stage="pretrain", out=str(out / "base"), vision=str(tower), lm=str(lm), **common)}
    runs["sft"] = TrainConfig(stage="sft", out=str(out / "sft"), init=runs["base"].out, **common)
    runs["dpo"] = TrainConfig(stage="dpo", out=str(out / "dpo"), init=runs["base"].out, beta=0.1, **common)
    return {name: train(config) for name, config in runs.items()}


def run_pivot_demo(out, cache=None, *, suite: str = DEMO_SUITE, pairs: int = DEMO_PAIRS, per_class: int = DEMO_PER_CLASS) -> dict[str, Path]:
    """Train the three models, run ``suite`` on their towers; returns {name: results dir}."""
    from ..runner import run_suite
    out = Path(out)
    print(f"\nPIVOT in miniature: a tiny LLaVA-OneVision (SigLIP-style tower, {DEMO_TOWER['image_size']} px tiles; "
          f"Qwen2 LM) trained with TRL on {pairs} demo VQA preference pairs")
    models = train_demo_models(out / "models", pairs=pairs)
    print(f"  {'model':<6}{'stage':<10}" + "".join(f"{k:>20}" for k in SHOWN))
    for name, run in models.items():
        row = _last_row(run)
        cells = [f"{float(row[k]):>20.3f}" if row.get(k) else f"{'-':>20}" for k in SHOWN]
        print(f"  {name:<6}{'pretrain' if name == 'base' else name:<10}" + "".join(cells))
    results = {}
    for name, run in models.items():
        record, = run_suite([str(run)], suite, out / "results", options={"per_class": per_class, "limit": 24},
                            cache=cache, progress=False)
        results[name] = out / "results" / record["encoder"]["fingerprint"][:16]
    print(f"\n  suite {suite} on the towers ({per_class} images per class):")
    metrics = [m for m in SUITE_SHOWN if any(m in p.get("metrics", {}) for r in _records(results)
                                             for p in r["probes"].values())]
    print(f"  {'tower':<6}" + "".join(f"{m:>30}" for m in metrics))
    for name, record in zip(results, _records(results)):
        values = {m: p["metrics"][m]["value"] for p in record["probes"].values() for m in p.get("metrics", {})}
        print(f"  {name:<6}" + "".join(f"{values[m]:>30.3f}" if m in values else f"{'-':>30}" for m in metrics))
    print("  (all metrics, with the other map methods, in the comparison report)")
    print(f"\n  checkpoints in {out / 'models'} (probe inspect {models['dpo']} --mllm); results in {out / 'results'}")
    return results


def pivot_report(results: dict[str, Path], out) -> Path:
    """The base / SFT / DPO comparison report (base is the reference column)."""
    from ..report import compare
    return compare(list(results.values()), out).files["report.html"]


def _records(results: dict[str, Path]) -> list[dict]:
    import json
    return [json.loads((path / "results.json").read_text()) for path in results.values()]
