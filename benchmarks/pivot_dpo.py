"""Seconds per DPO step and peak memory: `probe train dpo` vs a plain script on TRL's DPOTrainer.

Ours: the real command line (``encoder_probe.cli.main(["train", "dpo", ...])``, what ``python -m
encoder_probe`` runs) in a fresh process; the only addition is a timing callback, handed to
``encoder_probe.pivot.train.train`` (``cmd_train`` calls it; the CLI has no hook of its own).
Peer: what a user writes with transformers and TRL alone: ``<Class>.from_pretrained`` twice (policy and
reference), ``AutoProcessor``, a ``datasets.Dataset`` of the same records in TRL's conversational format
(PIL images, prompt, chosen, rejected), ``trl.DPOConfig`` with the hyperparameters our trainer passes
(sigmoid, beta 0.1, lr, cosine, warm-up ratio, max_grad_norm, seed, bf16 off, no checkpointing, no
saving, max_length None, log every step) and ``DPOTrainer(...).train()``. The two runs see the same
records in the same order and do the same arithmetic: their per-step losses are compared (the table
says the largest difference).

Models: the demo's tiny LLaVA-OneVision (a SigLIP-style tower at 64 px tiles, patch 8, 3 blocks, composed
with the toy Qwen2 LM by ``pivot.compose.compose_mllm``; the demo's 96 px images become base + 2x2 tiles)
and a small-width LLaVA-OneVision at the published geometry (``toy.write_hf_mllm(..., geometry=
"published")``: SigLIP/14 at 384 px, 729 tokens a tile, anyres_max_9 pinpoints; the demo images become
base + one 384 px tile). Data: the first ``--pairs`` demo VQA preference records.

Time: seconds per optimizer step from the end of the first step to the end of the last (start-up, model
loading and the first step's warm-up left out), one fresh process per run, ours and the peer back to back
(the order swapped every round), ``--rounds`` rounds, medians; ratios ours / peer. Memory: VmHWM of the
child process. It is reset after the common imports (torch, transformers, trl, datasets, PIL); "peak"
is the highest resident set from there to the end of training (loading included), "training peak" the
highest above... nothing: VmHWM reset again when training begins, read when it ends (the loaded models,
data and optimizer state resident), so loading spikes do not hide it.

    .venv/bin/python benchmarks/pivot_dpo.py                 # --rounds 3 --pairs 64
    .venv/bin/python benchmarks/pivot_dpo.py --profile tiny  # cProfile of one ours / peer run each: where time goes
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LR, BETA, WARMUP, SEED = 1e-5, 0.1, 0.03, 0
# model: (pairs per step, optimizer steps)
MODELS = {"tiny": (8, 24), "published": (4, 8)}


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


# -- the models (written once) ------------------------------------------------------------------------
def build(work: Path) -> dict[str, Path]:
    from encoder_probe import toy
    from encoder_probe.pivot.compose import compose_mllm
    from encoder_probe.pivot.demo import DEMO_TOWER
    dirs = {"tiny": work / "tiny", "published": work / "published"}
    if not (dirs["tiny"] / "processor_config.json").is_file():
        tower, lm = toy.write_siglip_dir(work / "tower", **DEMO_TOWER), toy.write_lm_dir(work / "lm")
        model, processor = compose_mllm(tower, lm)
        model.save_pretrained(dirs["tiny"])
        processor.save_pretrained(dirs["tiny"])
    if not (dirs["published"] / "processor_config.json").is_file():
        toy.write_hf_mllm(dirs["published"], "llava_onevision", geometry="published", processor=True)
    return dirs


# -- one run, in a fresh process ----------------------------------------------------------------------
def _timer():
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        """Step end times, the losses, and the resident set at the start / peak of training."""

        def __init__(self):
            self.steps, self.losses, self.mem = [], [], {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.mem["load_peak_mb"] = _status_mb("VmHWM")
            self.mem["train_begin_mb"] = _status_mb("VmRSS")
            _reset_peak()
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def on_train_end(self, args, state, control, **kwargs):
            self.mem["train_peak_mb"] = _status_mb("VmHWM")

    return Timer()


def _ours(init: str, out: str, batch: int, steps: int, pairs: int, timer) -> None:
    from functools import partial

    import encoder_probe.pivot.train as pivot_train
    from encoder_probe.cli import main
    from encoder_probe.pivot.data import demo_pairs
    pivot_train.train = partial(pivot_train.train, callbacks=[timer])  # cmd_train imports it at call time
    code = main(["train", "dpo", "--init", init, "--out", out, "--data", str(demo_pairs("train")),
                 "--limit", str(pairs), "--batch-size", str(batch), "--max-steps", str(steps), "--lr", str(LR),
                 "--beta", str(BETA), "--warmup-ratio", str(WARMUP), "--seed", str(SEED), "--device", "cpu",
                 "--save-every", "0"])
    if code:
        raise SystemExit(code)


def _peer(init: str, out: str, batch: int, steps: int, pairs: int, timer) -> None:
    import datasets
    import transformers
    from PIL import Image

    import trl
    from encoder_probe.pivot.data import demo_pairs  # only where the demo's JSONL is
    path = demo_pairs("train")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:pairs]
    root = path.parent.parent  # the demo's image paths start at its root
    data = datasets.Dataset.from_dict({
        "images": [[Image.open(root / r["image"]).convert("RGB")] for r in records],
        "prompt": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}]
                   for r in records],
        "chosen": [[{"role": "assistant", "content": [{"type": "text", "text": r["chosen"]}]}] for r in records],
        "rejected": [[{"role": "assistant", "content": [{"type": "text", "text": r["rejected"]}]}] for r in records],
    })
    cls = getattr(transformers, json.loads((Path(init) / "config.json").read_text())["architectures"][0])
    model = cls.from_pretrained(init)
    reference = cls.from_pretrained(init)
    processor = transformers.AutoProcessor.from_pretrained(init)
    args = trl.DPOConfig(output_dir=out, beta=BETA, loss_type=["sigmoid"], per_device_train_batch_size=batch,
                         max_steps=steps, learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=WARMUP,
                         max_grad_norm=1.0, weight_decay=0.0, seed=SEED, data_seed=SEED, use_cpu=True, bf16=False,
                         gradient_checkpointing=False, report_to=[], save_strategy="no", max_length=None,
                         logging_steps=1)
    trl.DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=data, processing_class=processor,
                   callbacks=[timer]).train()


def child(side: str, init: str, out: str, batch: int, steps: int, pairs: int, result: str, profile: str | None) -> None:
    import datasets  # noqa: F401  (the imports both sides share are not part of the memory figures)
    import PIL.Image  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import trl  # noqa: F401
    imports_mb = _status_mb("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    timer = _timer()
    run = _ours if side == "ours" else _peer
    if profile:
        import cProfile
        cProfile.runctx("run(init, out, batch, steps, pairs, timer)", globals(), locals(), profile)
    else:
        run(init, out, batch, steps, pairs, timer)
    wall = time.perf_counter() - start
    gaps = [b - a for a, b in zip(timer.steps, timer.steps[1:])]
    Path(result).write_text(json.dumps({
        "side": side, "steps": len(timer.steps), "s_per_step": (timer.steps[-1] - timer.steps[0]) / len(gaps),
        "gaps": gaps, "first_step_s": timer.steps[0] - timer.begin, "wall_s": wall, "losses": timer.losses,
        "imports_mb": imports_mb, **timer.mem,
        "peak_mb": max(timer.mem["load_peak_mb"], timer.mem["train_peak_mb"])}))


# -- the parent: rounds, medians, the table -------------------------------------------------------------
def run_child(side: str, init: Path, work: Path, batch: int, steps: int, pairs: int, tag: str,
              profile: str | None = None) -> dict:
    import shutil
    out = work / "runs" / f"{tag}-{side}"
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = out.parent / f"{tag}-{side}.json"
    cmd = [sys.executable, __file__, "--child", side, "--init", str(init), "--out", str(out), "--batch", str(batch),
           "--steps", str(steps), "--pairs", str(pairs), "--result", str(result)] + (["--prof", profile] if profile else [])
    with (out.parent / f"{tag}-{side}.log").open("w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{side} run failed ({done.returncode}): see {out.parent / f'{tag}-{side}.log'}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pairs", type=int, default=64, help="demo records used (the first N)")
    p.add_argument("--models", default="tiny,published")
    p.add_argument("--work", default="/tmp/pivot_dpo_bench", help="where the model dirs and run logs go")
    p.add_argument("--profile", metavar="MODEL", help="one cProfile'd run of each side on MODEL instead of the rounds")
    p.add_argument("--child", choices=["ours", "peer"], help=argparse.SUPPRESS)
    for name in ("init", "out", "result", "prof"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child, a.init, a.out, a.batch, a.steps, a.pairs, a.result, a.prof)
    work = Path(a.work)
    dirs = build(work)
    if a.profile:
        batch, steps = MODELS[a.profile]
        for side in ("ours", "peer"):
            stats = work / f"profile-{a.profile}-{side}.prof"
            r = run_child(side, dirs[a.profile], work, batch, steps, a.pairs, f"profile-{a.profile}", str(stats))
            print(f"{side}: {r['s_per_step']:.4f} s/step (profiled); stats in {stats}")
        return
    results = {m: {"ours": [], "peer": []} for m in a.models.split(",")}
    for r in range(a.rounds):
        for model in results:
            batch, steps = MODELS[model]
            for side in ("ours", "peer") if r % 2 == 0 else ("peer", "ours"):
                got = run_child(side, dirs[model], work, batch, steps, a.pairs, f"{model}-r{r}")
                results[model][side].append(got)
                print(f"round {r} {model:<9} {side}: {got['s_per_step']:.4f} s/step, peak {got['peak_mb']:.0f} MiB, "
                      f"training peak {got['train_peak_mb']:.0f} MiB, load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"\n{'model':<10}{'figure':<40}{'ours':>10}{'peer':>10}{'ratio':>8}{'range':>14}{'target':>9}")
    for model, runs in results.items():
        ours, peer = runs["ours"], runs["peer"]
        batch, steps = MODELS[model]
        rows = [("s per step", "s_per_step", "<= 1.05"),
                ("peak MiB above imports", "peak_mb", "<= 1.05"),
                ("training peak MiB (from train begin)", "train_peak_mb", "<= 1.05"),
                ("RSS at train begin MiB", "train_begin_mb", "-"),
                ("first step s (warm-up)", "first_step_s", "-"),
                ("process wall s (after imports)", "wall_s", "-")]
        for label, key, target in rows:
            o = statistics.median(x[key] for x in ours)
            q = statistics.median(x[key] for x in peer)
            ratios = [x[key] / y[key] for x, y in zip(ours, peer)]
            print(f"{model:<10}{label:<40}{o:>10.4f}{q:>10.4f}{o / q:>8.3f}"
                  f"{f'{min(ratios):.3f}-{max(ratios):.3f}':>14}{target:>9}")
        diff = max(abs(x - y) for o, q in zip(ours, peer) for x, y in zip(o["losses"], q["losses"]))
        print(f"{model:<10}{'imports MiB (both)':<40}{ours[0]['imports_mb']:>10.0f}{peer[0]['imports_mb']:>10.0f}")
        print(f"{model:<10}batch {batch}, {steps} steps; max |loss ours - peer| over the steps: {diff:.2e}")


if __name__ == "__main__":
    main()
