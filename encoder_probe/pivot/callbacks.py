"""What a training run writes as it goes: log.csv, a progress bar, PIVOT's gradient maps.

transformers' Trainer calls these on every process; only the main process writes. The gradient
maps run on every process because under FSDP / ZeRO-3 a forward is a collective.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from tqdm import tqdm
from transformers import TrainerCallback

from ..cache import atomic_write_bytes

# TRL's names for what PIVOT tracks (DPO); SFT logs the subset it has
LOG_FIELDS = ("step", "epoch", "phase", "loss", "grad_norm", "lr/vision", "lr/projector", "lr/lm",
              "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected", "mean_token_accuracy", "num_tokens")
SHOWN = {"loss": "loss", "rewards/accuracies": "acc", "rewards/margins": "margin"}


class CSVLog(TrainerCallback):
    """One row per optimizer step in ``path``; on resume the rows past the checkpoint's step are dropped,
    so the file always matches the weights."""

    def __init__(self, path: Path, phase: str):
        self.path, self.phase, self.file = Path(path), phase, None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        rows = []
        if state.global_step and self.path.is_file():
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= state.global_step]
        text = io.StringIO()
        writer = csv.DictWriter(text, LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.path, text.getvalue().encode())
        self.file = self.path.open("a", newline="")
        self.writer = csv.DictWriter(self.file, LOG_FIELDS, extrasaction="ignore")

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # the rates this step used (the Trainer logs the scheduler's next one)
        self.lrs = {f"lr/{g.get('part', 'lm')}": f"{g['lr']:.6g}" for g in getattr(optimizer, "param_groups", ())}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.file is None or not logs or "loss" not in logs:
            return
        row = {"step": state.global_step, "epoch": f"{state.epoch:.4g}", "phase": self.phase}
        row.update({k: f"{v:.6g}" for k, v in logs.items() if isinstance(v, (int, float))})
        row.update(getattr(self, "lrs", {}))
        self.writer.writerow(row)
        self.file.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self.file is not None:
            self.file.close()
            self.file = None


class Bar(TrainerCallback):
    """A tqdm bar over optimizer steps with loss / reward accuracy / margin (in place of the Trainer's, which
    prints every log dict as a line)."""

    def __init__(self, desc: str, enabled: bool = True):
        self.desc, self.enabled, self.bar = desc, enabled, None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.enabled:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc, unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs:
            self.bar.set_postfix({short: f"{logs[k]:.3f}" for k, short in SHOWN.items() if k in logs})

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class GradientMaps(TrainerCallback):
    """PIVOT's training hook: every ``every`` steps (and at the start and the end), the gradient of the chosen
    answer's summed log-likelihood at the visual tokens the LM reads, for a fixed set of records; its per-token
    L1 norm over the base view is the map. Written to ``out/step-NNNNNNN.npz`` (maps, grids, records)."""

    def __init__(self, out: Path, records: list[dict], processor, family: str, every: int):
        self.out, self.records, self.processor, self.family, self.every = Path(out), records, processor, family, every

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self._write(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._write(state, model)

    def _write(self, state, model) -> None:
        from ..data.images import load_rgb
        from ..mllm.model import MLLM, base_view, keep_view
        model = getattr(model, "module", model)  # DDP's wrapper; FSDP2 and ZeRO keep the module itself
        flags, training = [p.requires_grad for p in model.parameters()], model.training
        try:
            mllm = MLLM(model, self.processor, family=self.family, path=self.out, template_from="checkpoint")
            maps, grids = [], []
            for record in self.records:
                g = mllm.logprob_gradient(mllm.example(load_rgb(record["image"]), record["question"], record["chosen"]))
                g = keep_view(g, base_view(g.layout))
                grid = g.layout.views[0].grid
                maps.append(g.grad.abs().sum(-1).reshape(grid).numpy())
                grids.append(grid)
        finally:
            for p, flag in zip(model.parameters(), flags):
                p.requires_grad_(flag)
            model.train(training)
            model.zero_grad(set_to_none=True)
        if not state.is_world_process_zero:
            return
        buffer = io.BytesIO()
        np.savez(buffer, step=state.global_step, grids=np.array(grids),
                 images=np.array([r["image"] for r in self.records]),
                 questions=np.array([r["question"] for r in self.records]),
                 answers=np.array([r["chosen"] for r in self.records]),
                 **{f"map_{i}": m for i, m in enumerate(maps)})
        atomic_write_bytes(self.out / f"step-{state.global_step:07d}.npz", buffer.getvalue())
