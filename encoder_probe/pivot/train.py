"""Training stages: pretrain (projector only, then full), SFT, DPO, transplant.

One loop serves all of them; a stage only decides where the model comes from, what is trainable
in each phase and which objective runs. Runs are resumable: every ``save_every`` steps a whole
checkpoint (weights, optimizer, step) is built under a temporary name and renamed into
``OUT/checkpoints/``; a rerun with the same ``out`` continues from the newest one, and the data
order is a function of (seed, epoch), so a killed and resumed run ends with the same weights
as one that never stopped. Under torchrun the global batch is split across ranks and gradients
are averaged by DistributedDataParallel (gloo on CPU, nccl on GPU).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..cache import atomic_dir, atomic_write_bytes, atomic_write_json
from ..errors import DataError, SpecError
from .data import PreferenceDataset, collate, demo_pairs, read_pairs, texts_of
from .losses import dpo_loss
from .model import TINY_ENCODER, MLLM, build_mllm, is_mllm_checkpoint, load_mllm, read_mllm_config, save_mllm

STAGES = ("pretrain", "sft", "dpo", "transplant")
LOG_FIELDS = ("step", "epoch", "phase", "lr", "loss", "reward_accuracy", "margin", "chosen_reward", "rejected_reward")


@dataclass
class TrainConfig:
    """Everything a run depends on (saved in every checkpoint's config.json under "train")."""

    stage: str
    out: str
    data: str | None = None  # JSONL of {image, question, chosen, rejected}; None = the demo pairs
    image_root: str | None = None
    init: str | None = None  # sft/dpo: the checkpoint to start from (and DPO's frozen reference)
    encoder: str = TINY_ENCODER  # pretrain: the tower spec of the fresh MLLM
    encoder_layer: int | str | None = None  # the tower layer the LM reads (default: the loader's)
    lm: str | None = None  # pretrain/transplant: a local HF causal-LM dir (default: tiny Qwen2 + word tokenizer)
    vision_from: str | None = None  # transplant: the checkpoint whose refined tower is reused, frozen
    epochs: int = 1
    projector_epochs: int = 1  # pretrain/transplant: projector-only epochs before the full phase
    max_steps: int | None = None  # stop after this many optimizer steps (all phases)
    batch_size: int = 8  # pairs per optimizer step, over all ranks
    micro_batch_size: int | None = None  # per forward pass (gradient accumulation); default: the rank's share
    lr: float = 1e-4
    vision_lr: float | None = None  # the vision tower's own learning rate (default: lr)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    beta: float = 0.1
    sft_weight: float = 0.0  # DPO: weight of an SFT term on the chosen answer (PIVOT: 0)
    seed: int = 0
    limit: int | None = None  # use the first N records
    save_every: int = 0  # steps between resumable checkpoints (0: only the final model)
    keep_checkpoints: int = 2
    snapshot_every: int = 0  # steps between gradient-map snapshots (0: none)
    snapshot_records: int = 4
    bf16: bool = False
    gradient_checkpointing: bool = False
    device: str | None = None
    progress: bool = True

    def check(self) -> None:
        if self.stage not in STAGES:
            raise SpecError(f"unknown stage {self.stage!r}; choose {', '.join(STAGES)}")
        if self.stage in ("sft", "dpo") and not self.init:
            raise SpecError(f"train {self.stage} needs --init CKPT (the model to start from, e.g. a pretrain output)")
        if self.stage == "transplant" and not self.vision_from:
            raise SpecError("train transplant needs --vision-from CKPT (the checkpoint with the refined tower)")
        for name in ("init", "vision_from"):
            value = getattr(self, name)
            if value and not is_mllm_checkpoint(value):
                raise SpecError(f"--{name.replace('_', '-')} {value}: not a PIVOT trainer checkpoint "
                                "(no config.json with 'pivot_mllm')")
        if self.batch_size < 1 or self.epochs < 0 or self.projector_epochs < 0:
            raise SpecError("batch_size must be >= 1 and epochs >= 0")


# -- distributed --------------------------------------------------------------------------------------
def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _device(requested, world: int) -> torch.device:
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0)
    return torch.device("cpu")


def _init_distributed(device: torch.device, world: int) -> None:
    import torch.distributed as dist
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def _all_mean(values: dict[str, float], world: int) -> dict[str, float]:
    if world == 1:
        return values
    import torch.distributed as dist
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t)}


# -- objectives -----------------------------------------------------------------------------------
class Objective(nn.Module):
    """The loss of one micro-batch; the module DDP wraps (the reference is deliberately not a submodule)."""

    def __init__(self, policy: MLLM, kind: str, reference: MLLM | None = None, beta: float = 0.1,
                 sft_weight: float = 0.0):
        super().__init__()
        self.policy, self.kind, self.beta, self.sft_weight = policy, kind, beta, sft_weight
        object.__setattr__(self, "reference", reference)

    def forward(self, pixels, questions, chosen, rejected) -> dict:
        tokens = self.policy.image_tokens(pixels)
        if self.kind == "sft":
            return {"loss": self.policy.sft_loss(tokens, questions, chosen)}
        b = len(questions)
        logp, count = self.policy.answer_logprobs(torch.cat([tokens, tokens]), questions * 2, chosen + rejected)
        with torch.no_grad():
            ref_tokens = self.reference.image_tokens(pixels)
            ref = self.reference.response_logprob(torch.cat([ref_tokens, ref_tokens]), questions * 2, chosen + rejected)
        sft = -logp[:b].sum() / count[:b].sum() if self.sft_weight else None
        out = dpo_loss(logp[:b], logp[b:], ref[:b], ref[b:], beta=self.beta, sft_loss=sft, sft_weight=self.sft_weight)
        out["chosen_reward"], out["rejected_reward"] = out.pop("chosen_rewards").mean(), out.pop("rejected_rewards").mean()
        return out


def _phases(config: TrainConfig) -> list[tuple[str, int, dict]]:
    """(name, epochs, trainable parts) in order."""
    full = dict(vision=True, projector=True, lm=True)
    if config.stage == "pretrain":
        return [("projector", config.projector_epochs, dict(vision=False, projector=True, lm=False)),
                ("full", config.epochs, full)]
    if config.stage == "transplant":  # the refined tower stays frozen throughout
        return [("projector", config.projector_epochs, dict(vision=False, projector=True, lm=False)),
                ("projector+lm", config.epochs, dict(vision=False, projector=True, lm=True))]
    return [(config.stage, config.epochs, full)]


def _build(config: TrainConfig, records, checkpoint: Path | None) -> tuple[MLLM, MLLM | None]:
    if checkpoint is not None:  # resuming: the weights so far (optimizer and step are restored later)
        policy = load_mllm(checkpoint)
    elif config.stage in ("sft", "dpo"):
        policy = load_mllm(config.init)
    elif config.stage == "transplant":
        policy = build_mllm(str(config.vision_from), lm=config.lm, texts=texts_of(records), seed=config.seed)
    else:
        policy = build_mllm(config.encoder, lm=config.lm, texts=texts_of(records), seed=config.seed,
                            layer=config.encoder_layer)
    reference = None
    if config.stage == "dpo":
        reference = load_mllm(config.init).eval().requires_grad_(False)
    return policy, reference


def _optimizer(policy: MLLM, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the vision tower in its own group (its own learning rate)."""
    vision = list(policy.vision.parameters())
    ids = {id(p) for p in vision}
    rest = [p for p in policy.parameters() if id(p) not in ids]
    groups = [{"params": vision, "lr": config.vision_lr if config.vision_lr is not None else config.lr, "name": "vision"},
              {"params": rest, "lr": config.lr, "name": "projector+lm"}]
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    """Linear warmup then cosine decay to 0 (the LLaVA / PIVOT schedule); ``step`` is 0-based."""
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def _order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


# -- checkpoints ------------------------------------------------------------------------------------
def _latest(out: Path) -> Path | None:
    pointer = out / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = out / "checkpoints" / pointer.read_text().strip()
    return path if (path / "trainer_state.json").is_file() else None


def _save_checkpoint(out: Path, policy: MLLM, optimizer, step: int, config: TrainConfig) -> None:
    name = f"step-{step:07d}"
    root = out / "checkpoints"
    if (root / name).exists():
        shutil.rmtree(root / name)
    with atomic_dir(root / name) as tmp:
        save_mllm(policy, tmp, extra={"stage": config.stage, "train": asdict(config), "step": step})
        buffer = io.BytesIO()
        torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, buffer)
        atomic_write_bytes(tmp / "optimizer.pt", buffer.getvalue())
        atomic_write_json(tmp / "trainer_state.json", {"step": step})
    atomic_write_bytes(root / "latest", name.encode())
    for old in sorted(root.glob("step-*"))[:-max(1, config.keep_checkpoints)]:
        shutil.rmtree(old, ignore_errors=True)


def _restore(checkpoint: Path, optimizer) -> int:
    state = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return json.loads((checkpoint / "trainer_state.json").read_text())["step"]


def _write_snapshot(out: Path, policy: MLLM, records, transform, step: int, device) -> None:
    """The PIVOT training hook: gradient maps of the chosen answers of a fixed set of records."""
    batch = collate([PreferenceDataset(records, transform)[i] for i in range(len(records))])
    was_training = policy.training
    policy.eval()
    maps = policy.gradient_map(batch["pixels"].to(device), batch["question"], batch["chosen"])
    policy.train(was_training)
    policy.zero_grad(set_to_none=True)
    buffer = io.BytesIO()
    np.savez(buffer, maps=maps.detach().float().cpu().numpy(), step=step, images=np.array(batch["image"]),
             questions=np.array(batch["question"]), answers=np.array(batch["chosen"]))
    atomic_write_bytes(out / "snapshots" / f"step-{step:07d}.npz", buffer.getvalue())


class _Log:
    """The per-step CSV log; on resume, rows past the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        rows = []
        if resume_step and path.is_file():
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        text = io.StringIO()
        writer = csv.DictWriter(text, LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(path, text.getvalue().encode())
        self.file = path.open("a", newline="")
        self.writer = csv.DictWriter(self.file, LOG_FIELDS)

    def write(self, row: dict) -> None:
        self.writer.writerow({k: row.get(k, "") for k in LOG_FIELDS})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# -- the loop -----------------------------------------------------------------------------------
def train(config: TrainConfig, *, on_step=None) -> Path:
    """Run one stage; returns ``config.out``, a checkpoint directory that ``load_encoder`` reads.

    ``on_step(step, metrics)`` is called after every optimizer step (tests use it to kill a run).
    """
    config.check()
    out = Path(config.out)
    if is_mllm_checkpoint(out) and read_mllm_config(out).get("finished"):
        print(f"{out}: already trained ({read_mllm_config(out).get('stage')}); nothing to do")
        return out
    rank, world = _world()
    device = _device(config.device, world)
    _init_distributed(device, world)
    if config.batch_size % world:
        raise SpecError(f"batch_size {config.batch_size} does not split over {world} ranks")

    records = read_pairs(config.data or demo_pairs("train"), config.image_root, config.limit,
                         need_rejected=config.stage == "dpo")
    if len(records) < config.batch_size:
        raise DataError(f"{config.data or demo_pairs('train')}: {len(records)} records, fewer than one batch "
                        f"({config.batch_size} pairs per step)")
    checkpoint = _latest(out)
    policy, reference = _build(config, records, checkpoint)
    policy.to(device).train()
    if reference is not None:
        reference.to(device)
    if config.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    optimizer = _optimizer(policy, config)
    start = _restore(checkpoint, optimizer) if checkpoint is not None else 0
    if checkpoint is not None and rank == 0:
        print(f"resuming {config.stage} from {checkpoint} (step {start})")

    dataset = PreferenceDataset(records, policy.encoder.transform)
    per_epoch = max(1, len(records) // config.batch_size)  # the last partial batch is dropped
    phases = [(name, epochs, parts) for name, epochs, parts in _phases(config) if epochs > 0]
    schedule = [(name, parts, epoch) for name, epochs, parts in phases for epoch in range(epochs)]
    total = len(schedule) * per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    share = config.batch_size // world
    micro = min(config.micro_batch_size or share, share)
    kind = "dpo" if config.stage == "dpo" else "sft"
    snapshot_set = records[:config.snapshot_records]

    out.mkdir(parents=True, exist_ok=True)
    log = _Log(out / "log.csv", start) if rank == 0 else None
    bar = tqdm(total=total, initial=start, desc=f"train {config.stage}", unit="step",
               disable=rank != 0 or not config.progress)
    model, current = None, None
    step = start
    try:
        while step < total:
            epoch_index, in_epoch = divmod(step, per_epoch)
            phase, parts, epoch = schedule[epoch_index]
            if phase != current:  # (re)wrap for the phase's trainable set
                policy.set_trainable(**parts)
                objective = Objective(policy, kind, reference, config.beta, config.sft_weight)
                if world > 1:
                    from torch.nn.parallel import DistributedDataParallel
                    # towers carry parameters off the read path (a classifier head, a final norm LLaVA skips)
                    model = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                                    find_unused_parameters=True)
                else:
                    model = objective
                current = phase
            if config.snapshot_every and step % config.snapshot_every == 0 and rank == 0:
                _write_snapshot(out, policy, snapshot_set, policy.encoder.transform, step, device)
            indices = _order(len(records), config.seed, epoch_index)[in_epoch * config.batch_size:
                                                                      (in_epoch + 1) * config.batch_size]
            mine = indices[rank * share:(rank + 1) * share]
            chunks = [mine[i:i + micro] for i in range(0, len(mine), micro)]
            sums: dict[str, float] = {}
            for i, chunk in enumerate(chunks):
                batch = collate([dataset[int(j)] for j in chunk])
                sync = model.no_sync() if world > 1 and i < len(chunks) - 1 else contextlib.nullcontext()
                with sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    result = model(batch["pixels"].to(device), batch["question"], batch["chosen"], batch["rejected"])
                weight = len(chunk) / len(mine)
                (result["loss"] * weight).backward()
                for k, v in result.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) * weight
            factor = lr_factor(step, total, config.warmup_ratio)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.grad is not None], config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            metrics = _all_mean(sums, world)
            if rank == 0:
                log.write({"step": step, "epoch": epoch_index + 1, "phase": phase, "lr": optimizer.param_groups[1]["lr"],
                           **{k: f"{v:.6g}" for k, v in metrics.items()}})
                bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if k in ("loss", "reward_accuracy", "margin")})
                bar.update()
            if config.save_every and step % config.save_every == 0 and step < total and rank == 0:
                _save_checkpoint(out, policy, optimizer, step, config)
            if world > 1:
                torch.distributed.barrier()
            if on_step is not None:
                on_step(step, metrics)
        if config.snapshot_every and rank == 0:
            _write_snapshot(out, policy, snapshot_set, policy.encoder.transform, step, device)
        if rank == 0:
            save_mllm(policy, out, extra={"stage": config.stage, "train": asdict(config), "step": step,
                                          "finished": True})
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
    finally:
        bar.close()
        if log is not None:
            log.close()
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return out


