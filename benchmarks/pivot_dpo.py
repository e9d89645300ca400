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

Models: the demo's tiny LLaVA-OneVision (a SigLIP-style tower at 64 px tiles, patch 8, 3 blocks, width 64,
composed with the toy Qwen2 LM, 2 x 64, by ``pivot.compose.compose_mllm``; a demo 96 px image becomes base +
2x2 tiles, 374 prompt positions) and a small-width LLaVA-OneVision at the published geometry
(``toy.write_hf_mllm(..., geometry="published")``: SigLIP/14 at 384 px, 729 tokens a tile, anyres_max_9
pinpoints, tower 2 x 32, LM 1 x 64; a demo image becomes base + one 384 px tile, 1523 prompt positions).
Data: the first ``--pairs`` demo VQA preference records.

Time: seconds per optimizer step from the end of the first step to the end of the last (start-up, model
loading and the first step's warm-up left out). Two designs, because this shared 2-core box drifts by
+-10% from one run to the next even when nothing else runs: (1) ``--rounds`` rounds of one fresh process
per side, back to back, the order swapped every round (these also give the memory figures); (2)
``--turns`` processes that each run a discarded warm-up and then ours and the peer by turns (ABBA, or BAAB
in every other process), each run a fresh trainer and a fresh load through the same call as (1). A
ratio is the median of the paired ours / peer ratios (adjacent runs); the pooled row gives the geometric
mean of all pairs with its 95% t-interval. Before a run starts the parent waits until other processes
use under ``--max-foreign`` cores, and reruns it (up to 3 times) if they used more meanwhile; a run
records the cores they used. Memory: VmHWM of the fresh child process. It is reset after the common
imports (torch, transformers, trl, datasets, PIL); "peak" is the highest resident set from there to the
end of training (imports and loading included; "above the imports" subtracts the resident set after
the imports), "training peak" the highest resident set from the start of training (VmHWM reset again
there, the models and data already loaded) to its end.

    .venv/bin/python benchmarks/pivot_dpo.py                 # --rounds 3 --turns 4 --pairs 64 --models tiny,published
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
MODELS = {"tiny": (8, 32), "published": (4, 12)}
ALTERNATION = ("ours", "peer", "peer", "ours", "ours", "peer", "peer", "ours")  # ABBA: a drift cancels in pairs
OTHER = {"ours": "peer", "peer": "ours"}


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
            self.steps, self.cpu, self.losses, self.mem = [], [], [], {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.mem["load_peak_mb"] = _status_mb("VmHWM")
            self.mem["train_begin_mb"] = _status_mb("VmRSS")
            _reset_peak()
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(time.perf_counter())
            self.cpu.append(time.process_time())

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
    original = getattr(pivot_train.train, "func", pivot_train.train)  # a previous run's partial
    pivot_train.train = partial(original, callbacks=[timer])  # cmd_train imports it at call time
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
    if side.startswith("turns-"):  # ours and the peer by turns in this one process: time only
        order = ALTERNATION if side == "turns-ours" else [OTHER[x] for x in ALTERNATION]
        return _alternate(init, out, batch, steps, pairs, result, order)
    start = time.perf_counter()
    timer = _timer()
    run = _ours if side == "ours" else _peer
    if profile:
        import cProfile
        cProfile.runctx("run(init, out, batch, steps, pairs, timer)", globals(), locals(), profile)
    else:
        run(init, out, batch, steps, pairs, timer)
    wall = time.perf_counter() - start
    Path(result).write_text(json.dumps({
        "side": side, **_per_step(timer), "first_step_s": timer.steps[0] - timer.begin, "wall_s": wall,
        "imports_mb": imports_mb, **timer.mem,
        "peak_mb": max(timer.mem["load_peak_mb"], timer.mem["train_peak_mb"]),
        "peak_above_imports_mb": max(timer.mem["load_peak_mb"], timer.mem["train_peak_mb"]) - imports_mb}))


def _per_step(timer) -> dict:
    gaps = [b - a for a, b in zip(timer.steps, timer.steps[1:])]
    return {"s_per_step": (timer.steps[-1] - timer.steps[0]) / len(gaps), "median_step_s": statistics.median(gaps),
            "cpu_per_step_s": (timer.cpu[-1] - timer.cpu[0]) / len(gaps), "gaps": gaps, "losses": timer.losses}


def _alternate(init: str, out: str, batch: int, steps: int, pairs: int, result: str, order) -> None:
    """A warm-up run of the side that does not start (discarded: the first training run in a process was often the
    slowest in trials), then ``order``."""
    import shutil
    runs = []
    for i, side in enumerate([OTHER[order[0]], *order]):
        timer = _timer()
        (_ours if side == "ours" else _peer)(init, f"{out}-{i}", batch, steps, pairs, timer)
        shutil.rmtree(f"{out}-{i}", ignore_errors=True)
        runs.append({"side": side, **_per_step(timer)})
    Path(result).write_text(json.dumps({"side": "turns", "warm_up": runs[0], "runs": runs[1:]}))


# -- the parent: rounds, medians, the table -------------------------------------------------------------
def _busy_s() -> float:
    """CPU seconds all processes on the box have used (/proc/stat: user nice system irq softirq)."""
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    import resource
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _wait_quiet(cores: float, patience: float) -> None:
    """Until the box's other processes have used under ``cores`` cores for 5 s (at most ``patience`` s)."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        busy = _busy_s()
        time.sleep(5)
        if (_busy_s() - busy) / 5 < cores:
            return


def run_child(side: str, init: Path, work: Path, batch: int, steps: int, pairs: int, tag: str,
              profile: str | None = None, max_foreign: float = 0.25, tries: int = 3, patience: float = 600) -> dict:
    """One run in a fresh process, started when the box is quiet; rerun (up to ``tries``) when other processes
    used more than ``max_foreign`` cores on average meanwhile (the box is shared: such a run times them)."""
    for attempt in range(1, tries + 1):
        _wait_quiet(max_foreign, patience)
        busy, mine, start = _busy_s(), _children_cpu_s(), time.perf_counter()
        got = _run_child(side, init, work, batch, steps, pairs, tag, profile)
        wall = time.perf_counter() - start
        got["foreign_cores"] = max(0.0, (_busy_s() - busy) - (_children_cpu_s() - mine)) / wall
        if got["foreign_cores"] <= max_foreign or profile:
            break
        print(f"  ({tag} {side}: other processes used {got['foreign_cores']:.2f} cores meanwhile; "
              f"{'rerunning' if attempt < tries else 'kept'})", flush=True)
    return got


def _run_child(side: str, init: Path, work: Path, batch: int, steps: int, pairs: int, tag: str,
               profile: str | None) -> dict:
    import shutil
    out = work / "runs" / f"{tag}-{side}"
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = out.parent / f"{tag}-{side}.json"
    cmd = [sys.executable, __file__, "--child", side, "--init", str(init), "--out", str(out), "--batch", str(batch),
           "--steps", str(steps), "--pairs", str(pairs), "--result", str(result)]
    cmd += ["--prof", profile] if profile else []
    with (out.parent / f"{tag}-{side}.log").open("w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{side} run failed ({done.returncode}): see {out.parent / f'{tag}-{side}.log'}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(result.read_text())


def _ratios(pairs) -> str:
    """median ours / peer over the pairs, and their range"""
    r = sorted(o / q for o, q in pairs)
    return f"{statistics.median(r):.3f}", f"{r[0]:.3f}-{r[-1]:.3f}"


def _pooled(ratios) -> tuple[float, float, float]:
    """Geometric mean of the ratios and its 95% t-interval."""
    import math

    from scipy.stats import t
    logs = [math.log(r) for r in ratios]
    mean, half = statistics.mean(logs), t.ppf(0.975, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def report(fresh: dict, turns: dict) -> None:
    """The table: medians of each side; ratio = median of the paired ours / peer ratios (and their range)."""
    print(f"\n{'model':<10}{'figure':<44}{'ours':>9}{'peer':>9}{'ratio':>8}{'range':>14}{'target':>9}")
    for model in fresh:
        ours, peer = fresh[model]["ours"], fresh[model]["peer"]
        rows = []
        if turns.get(model):
            pairs = turns[model]
            rows.append((f"s per step, by turns in one process ({len(pairs)} pairs)",
                         [o["s_per_step"] for o, _ in pairs], [q["s_per_step"] for _, q in pairs], "<= 1.05"))
        for label, key, target in (
                (f"s per step, fresh processes ({len(ours)} rounds)", "s_per_step", "<= 1.05"),
                ("CPU s per step (2 threads), fresh", "cpu_per_step_s", "-"),
                ("peak RSS MiB (after-import RSS included)", "peak_mb", "<= 1.05"),
                ("peak RSS MiB above the imports", "peak_above_imports_mb", "-"),
                ("training peak RSS MiB (from train begin)", "train_peak_mb", "<= 1.05"),
                ("RSS at train begin MiB (models + data)", "train_begin_mb", "-"),
                ("first step s (warm-up)", "first_step_s", "-"),
                ("process wall s after the imports", "wall_s", "-")):
            rows.append((label, [x[key] for x in ours], [x[key] for x in peer], target))
        for label, o, q, target in rows:
            ratio, spread = _ratios(zip(o, q))
            print(f"{model:<10}{label:<44}{statistics.median(o):>9.3f}{statistics.median(q):>9.3f}{ratio:>8}"
                  f"{spread:>14}{target:>9}")
        every = [(o, q) for o, q in zip(ours, peer)] + list(turns.get(model, []))
        if len(every) > 2:
            mean, low, high = _pooled([o["s_per_step"] / q["s_per_step"] for o, q in every])
            print(f"{model:<10}{f's per step, all {len(every)} pairs pooled':<44}{'':>18}{mean:>8.3f}"
                  f"{f'[{low:.3f}, {high:.3f}]':>16}{'<= 1.05':>9}")
        diff = max(abs(x - y) for o, q in every for x, y in zip(o["losses"], q["losses"]))
        batch, steps = MODELS[model]
        print(f"{model:<10}batch {batch}, {steps} steps; after-import RSS {ours[0]['imports_mb']:.0f} / "
              f"{peer[0]['imports_mb']:.0f} MiB; max |loss ours - peer| at any step of any pair: {diff:.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="fresh-process rounds (ours and the peer each; memory, time)")
    p.add_argument("--turns", type=int, default=4, help="processes that run ours and the peer by turns "
                   f"(a warm-up run, then {len(ALTERNATION)} runs, ABBA or BAAB; time only)")
    p.add_argument("--pairs", type=int, default=64, help="demo records used (the first N)")
    p.add_argument("--models", default="tiny,published")
    p.add_argument("--work", default="/tmp/pivot_dpo_bench", help="where the model dirs and run logs go")
    p.add_argument("--max-foreign", type=float, default=0.25,
                   help="start a run when other processes use fewer cores than this; rerun it (up to 3 times) "
                   "when they used more meanwhile")
    p.add_argument("--profile", metavar="MODEL", help="one cProfile'd run of each side on MODEL instead of the rounds")
    p.add_argument("--child", choices=["ours", "peer", "turns-ours", "turns-peer"], help=argparse.SUPPRESS)
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
    models = a.models.split(",")
    fresh = {m: {"ours": [], "peer": []} for m in models}
    turns = {m: [] for m in models}
    for r in range(a.rounds):
        for model in models:
            batch, steps = MODELS[model]
            for side in ("ours", "peer") if r % 2 == 0 else ("peer", "ours"):
                got = run_child(side, dirs[model], work, batch, steps, a.pairs, f"{model}-r{r}",
                                max_foreign=a.max_foreign)
                fresh[model][side].append(got)
                print(f"fresh round {r} {model:<9} {side}: {got['s_per_step']:.4f} s/step, "
                      f"peak {got['peak_mb']:.0f} MiB, "
                      f"training peak {got['train_peak_mb']:.0f} MiB; other processes {got['foreign_cores']:.2f} "
                      f"cores, load {os.getloadavg()[0]:.2f}", flush=True)
    for t in range(a.turns):
        for model in models:
            batch, steps = MODELS[model]
            got = run_child("turns-ours" if t % 2 == 0 else "turns-peer", dirs[model], work, batch, steps, a.pairs,
                            f"{model}-t{t}", max_foreign=a.max_foreign)
            runs = got["runs"]
            for i in range(0, len(runs) - 1, 2):  # ABBA: each adjacent pair holds one of each
                o, q = sorted(runs[i:i + 2], key=lambda x: x["side"] != "ours")
                turns[model].append((o, q))
            print(f"by turns {t} {model:<9}: (warm-up {got['warm_up']['side']} {got['warm_up']['s_per_step']:.4f}) "
                  + ", ".join(f"{x['side']} {x['s_per_step']:.4f}" for x in runs)
                  + f" s/step; other processes {got['foreign_cores']:.2f} cores", flush=True)
    report(fresh, turns)


if __name__ == "__main__":
    main()
