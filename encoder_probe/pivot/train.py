"""PIVOT's post-training on TRL: SFT and DPO from a real MLLM checkpoint, the LLaVA recipe and transplant.

Every stage is TRL's own trainer (``SFTTrainer``, ``DPOTrainer``) on the checkpoint's transformers class
with its own processor and chat template; accelerate does the scale-out (``accelerate launch`` or
``torchrun``: DDP, FSDP2, DeepSpeed ZeRO). What this module adds is what PIVOT fixes and TRL leaves open:
which parts train and at which learning rate (the vision tower has its own), the DPO objective exactly as
the paper ran it (sigmoid, beta 0.1, summed response log-probs, the frozen ``--init`` as reference, SFT
term weight 0 unless given), multi-phase stages, resumable run dirs and the per-step log.

A run dir OUT ends as a ``save_pretrained`` dir of the same class (read by ``load_mllm``, ``load_encoder``
and every probe) with ``pivot_train.json`` (the config, written last: the run is finished), ``log.csv``
and ``snapshots/``. While it runs, ``OUT/checkpoints/checkpoint-N`` are the Trainer's checkpoints; a
rerun with the same OUT resumes from the newest complete one (the data order is a function of the seed
and the RNG state is restored, so a killed and resumed run ends with the same weights).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..cache import atomic_write_json
from ..errors import DataError, SpecError
from .data import check_images, completion_dataset, demo_pairs, preference_dataset, read_pairs

STAGES = ("pretrain", "sft", "dpo", "transplant")
PARTS = ("vision", "projector", "lm")
FINISHED = "pivot_train.json"  # written last into a finished run dir


@dataclass
class TrainConfig:
    """Everything a run depends on (saved in OUT/pivot_train.json)."""

    stage: str
    out: str
    init: str | None = None  # sft/dpo: any dir load_mllm reads (DPO: also the frozen reference)
    vision: str | None = None  # pretrain: a vision-tower dir (or an MLLM dir: its tower)
    lm: str | None = None  # pretrain/transplant: a causal-LM dir with its tokenizer
    vision_from: str | None = None  # transplant: the MLLM whose refined tower is reused, frozen
    kind: str = "llava_onevision"  # pretrain/transplant: the family of the fresh MLLM
    vision_feature_layer: int | None = None  # pretrain/transplant: the tower layer the LM reads (default: family's)
    data: str | None = None  # JSONL of {image, question, chosen, rejected}; None = the demo VQA pairs
    image_root: str | None = None
    limit: int | None = None  # use the first N records
    epochs: float = 1.0
    projector_epochs: float = 1.0  # pretrain/transplant: projector-only epochs first
    projector_phase_lr: float = 1e-3  # pretrain/transplant: the projector-only phase's lr (LLaVA's stage 1)
    max_steps: int | None = None  # stop each phase after N optimizer steps
    batch_size: int = 8  # pairs per optimizer step over all processes (the effective batch)
    micro_batch_size: int | None = None  # pairs per forward per process; the rest by gradient accumulation
    lr: float = 1e-5  # projector and LM
    vision_lr: float | None = None  # the vision tower's own learning rate (default: lr)
    freeze: tuple[str, ...] = ()  # parts kept frozen: vision, projector, lm
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    beta: float = 0.1  # DPO, sigmoid loss
    sft_weight: float = 0.0  # DPO: weight of TRL's "sft" term on the chosen answers (PIVOT: 0)
    seed: int = 0
    save_every: int = 50  # optimizer steps between resumable checkpoints (0: none)
    keep_checkpoints: int = 2
    snapshot_every: int = 0  # steps between gradient-map snapshots (0: none)
    snapshot_records: int = 4
    bf16: bool = False
    gradient_checkpointing: bool = False
    deepspeed: str | None = None  # a DeepSpeed JSON config (optional extra)
    device: str | None = None  # cpu, cuda, cuda:N (default: what accelerate picks)
    dataloader_workers: int = 0
    export: str | None = None  # "llava": also write OUT/llava in the LLaVA-NeXT / PIVOT layout
    progress: bool = True
    trainable: tuple[str, ...] | None = field(default=None, repr=False)  # a phase's parts (set by the stage)

    def check(self) -> None:
        if self.stage not in STAGES:
            raise SpecError(f"unknown stage {self.stage!r}; choose {', '.join(STAGES)}")
        needs = {"sft": ("init",), "dpo": ("init",), "pretrain": ("vision", "lm"), "transplant": ("vision_from", "lm")}
        for name in needs[self.stage]:
            if not getattr(self, name):
                raise SpecError(f"train {self.stage} needs --{name.replace('_', '-')} DIR")
        for name in ("init", "vision", "lm", "vision_from", "deepspeed"):
            value = getattr(self, name)
            if value and not Path(value).exists():
                raise SpecError(f"--{name.replace('_', '-')} {value}: no such file or directory")
        unknown = [p for p in self.freeze if p not in PARTS]
        if unknown:
            raise SpecError(f"--freeze {','.join(unknown)}: unknown part; choose from {', '.join(PARTS)}")
        if self.batch_size < 1 or (self.micro_batch_size is not None and self.micro_batch_size < 1):
            raise SpecError("--batch-size and --micro-batch-size must be >= 1")
        if self.epochs <= 0 or self.projector_epochs < 0 or (self.max_steps is not None and self.max_steps < 1):
            raise SpecError("--epochs must be > 0, --projector-epochs >= 0 and --max-steps >= 1")
        for name in ("lr", "vision_lr", "beta", "projector_phase_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise SpecError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if self.sft_weight < 0 or not 0 <= self.warmup_ratio < 1:
            raise SpecError("--sft-weight must be >= 0 and --warmup-ratio in [0, 1)")
        if self.export not in (None, "llava"):
            raise SpecError(f"--export {self.export!r}: only 'llava' (the LLaVA-NeXT / PIVOT layout)")
        if self.deepspeed:
            _check_deepspeed(self.deepspeed)


def _check_deepspeed(path: str) -> None:
    """Before any weights load: transformers fails deep inside TrainingArguments on either."""
    import importlib.util
    try:
        json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SpecError(f"--deepspeed {path}: not a readable JSON file ({' '.join(str(e).split())})") from None
    if importlib.util.find_spec("deepspeed") is None:
        raise SpecError(f"--deepspeed {path}: DeepSpeed is not installed (pip install 'encoder-probe[deepspeed]')")


# -- which parameters are which ---------------------------------------------------------------------
def part_of(name: str) -> str:
    """vision | projector | lm for a parameter name of any supported family (Qwen's merger is its projector)."""
    dotted = f".{name}"
    if ".multi_modal_projector." in dotted or ".merger." in dotted or name.endswith("image_newline"):
        return "projector"
    if ".vision_tower." in dotted or ".visual." in dotted:
        return "vision"
    return "lm"


def set_trainable(model, parts) -> dict[str, int]:
    """requires_grad on exactly ``parts``; returns the parameter count of each part."""
    counts = dict.fromkeys(PARTS, 0)
    for name, p in model.named_parameters():
        part = part_of(name)
        p.requires_grad_(part in parts)
        counts[part] += p.numel()
    if not counts["vision"] or not counts["projector"]:
        raise SpecError(f"{type(model).__name__}: cannot tell its vision tower and projector apart "
                        f"(parameters per part: {counts})")
    return counts


def _mixin(base):
    """``base`` (a TRL trainer) with one AdamW group per trainable part, each with its own learning rate."""

    class PivotTrainer(base):
        part_lrs: dict = {}

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                model = self.model if model is None else model
                decay = set(self.get_decay_parameter_names(model))
                groups = {}
                for name, p in model.named_parameters():
                    if p.requires_grad:
                        part = part_of(name)
                        key = (part, name in decay)
                        groups.setdefault(key, {"params": [], "lr": self.part_lrs[part], "part": part,
                                                "weight_decay": self.args.weight_decay if key[1] else 0.0})
                        groups[key]["params"].append(p)
                cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
                kwargs.pop("lr", None)
                self.optimizer = cls(list(groups.values()), **kwargs)
            return self.optimizer

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            """The checkpoint's weights through the class's own loader. transformers 5 saves MLLMs with their
            checkpoint key names (``save_original_format``) but the Trainer reloads them with
            ``load_state_dict(strict=False)``, which silently keeps the initial weights (transformers#43701);
            FSDP and DeepSpeed keep their own sharded formats and their own loaders."""
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            model = self.accelerator.unwrap_model(self.model if model is None else model)
            saved = type(model).from_pretrained(resume_from_checkpoint, local_files_only=True, use_safetensors=True,
                                                dtype=model.dtype)
            model.load_state_dict(saved.state_dict(), strict=True)
            del saved

    PivotTrainer.__name__ = PivotTrainer.__qualname__ = f"Pivot{base.__name__}"
    return PivotTrainer


# -- run dirs ---------------------------------------------------------------------------------------
def is_finished(out) -> bool:
    return (Path(out) / FINISHED).is_file()


def latest_checkpoint(out, clean: bool = False) -> Path | None:
    """The newest complete Trainer checkpoint under OUT/checkpoints (trainer_state.json is written last);
    ``clean``: remove the incomplete ones after it (a kill mid-save)."""
    root = Path(out) / "checkpoints"
    found = sorted((p for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    while found and not (found[-1] / "trainer_state.json").is_file():
        partial = found.pop()
        if clean:
            shutil.rmtree(partial, ignore_errors=True)
    return found[-1] if found else None


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _finish(trainer, out: Path, config: TrainConfig, mllm) -> None:
    """The final save_pretrained dir (model, processor, chat template), then pivot_train.json last."""
    tmp = out / ".final"
    trainer.save_model(str(tmp))  # every process: FSDP / ZeRO-3 gather the weights here
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        _publish(tmp, out, trainer, config, mllm)
    trainer.accelerator.wait_for_everyone()  # the next phase loads OUT on every process


def _publish(tmp: Path, out: Path, trainer, config: TrainConfig, mllm) -> None:
    """The main process: the saved files into OUT, config.json then pivot_train.json last."""
    import transformers

    import trl
    from ..mllm.convert import CONVERSION, record_conversion
    if mllm.details.get("converted_from") or (Path(mllm.path) / CONVERSION).is_file():
        record_conversion(tmp, mllm.path)  # the PIL-backend processor of a converted PIVOT dir, as `probe convert`
    (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the config is in pivot_train.json
    for file in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):  # config.json last
        os.replace(file, out / file.name)
    tmp.rmdir()
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    atomic_write_json(out / FINISHED, {"stage": config.stage, "config": asdict(config), "step": trainer.state.global_step,
                                       "trl": trl.__version__, "transformers": transformers.__version__,
                                       "finished": True})


# -- one phase: a TRL trainer from a checkpoint dir ------------------------------------------------------
def _batches(config: TrainConfig) -> tuple[int, int]:
    """(per-process micro batch, gradient accumulation steps) for the effective batch over all processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if config.batch_size % world:
        raise SpecError(f"--batch-size {config.batch_size} does not split over {world} processes")
    share = config.batch_size // world
    micro = min(config.micro_batch_size or share, share)
    if share % micro:
        raise SpecError(f"--micro-batch-size {micro} does not divide the per-process batch {share}")
    return micro, share // micro


def _records(config: TrainConfig, need_rejected: bool) -> list[dict]:
    source = config.data or demo_pairs("train")
    records = read_pairs(source, config.image_root, config.limit, need_rejected=need_rejected)
    check_images(records, source)
    if len(records) < config.batch_size:
        raise DataError(f"{source}: {len(records)} records, fewer than one batch ({config.batch_size} pairs per step)")
    return records


def _place_device(config: TrainConfig) -> dict:
    if config.device is None:
        return {}
    if config.device == "cpu":
        return {"use_cpu": True}
    import torch
    if not config.device.startswith("cuda") or not torch.cuda.is_available():
        raise SpecError(f"--device {config.device}: not available here (cpu, cuda or cuda:N with a GPU)")
    if ":" in config.device:  # one process on a chosen GPU: accelerate uses the current device
        torch.cuda.set_device(torch.device(config.device))
    return {}


def build_trainer(config: TrainConfig, objective: str, init: str, out: Path, *, phase: str, callbacks=()):
    """TRL's trainer for ``init`` with ``objective`` (sft | dpo) on ``config.trainable``, writing into the run
    dir ``out``; returns (trainer, the loaded MLLM)."""
    import trl
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ..mllm.model import load_mllm
    from .callbacks import Bar, CSVLog, GradientMaps

    records = _records(config, need_rejected=objective == "dpo")
    micro, accumulate = _batches(config)
    device_args = _place_device(config)
    mllm = load_mllm(init)
    model = mllm.model
    counts = set_trainable(model, config.trainable)
    model.train()
    common = dict(output_dir=str(out / "checkpoints"), per_device_train_batch_size=micro,
                  gradient_accumulation_steps=accumulate, num_train_epochs=config.epochs,
                  max_steps=config.max_steps or -1, learning_rate=config.lr, weight_decay=config.weight_decay,
                  warmup_steps=config.warmup_ratio, lr_scheduler_type="cosine", max_grad_norm=config.max_grad_norm,
                  logging_steps=1, save_strategy="steps" if config.save_every else "no",
                  save_steps=config.save_every or 500, save_total_limit=config.keep_checkpoints, seed=config.seed,
                  data_seed=config.seed, bf16=config.bf16, activation_checkpointing=config.gradient_checkpointing,
                  report_to=[], disable_tqdm=True, deepspeed=config.deepspeed, max_length=None,
                  dataloader_num_workers=config.dataloader_workers, ddp_find_unused_parameters=True,
                  dataloader_pin_memory=_on_gpu(config),
                  **device_args)
    if objective == "dpo":
        losses, weights = ["sigmoid"], [1.0]
        if config.sft_weight:  # TRL's "sft" term: token-mean NLL of the chosen answers
            losses, weights = ["sigmoid", "sft"], [1.0, config.sft_weight]
        args = trl.DPOConfig(beta=config.beta, loss_type=losses, loss_weights=weights, **common)
        reference = load_mllm(init).model.eval().requires_grad_(False)  # the --init model, its tower included
        trainer = _mixin(trl.DPOTrainer)(model=model, ref_model=reference, args=args,
                                         train_dataset=preference_dataset(records), processing_class=mllm.processor)
    else:
        args = trl.SFTConfig(completion_only_loss=True, **common)
        trainer = _mixin(trl.SFTTrainer)(model=model, args=args, train_dataset=completion_dataset(records),
                                         processing_class=mllm.processor)
    trainer.part_lrs = {"vision": config.vision_lr or config.lr, "projector": config.lr, "lm": config.lr}
    for default in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(default)
    out.mkdir(parents=True, exist_ok=True)
    trainer.add_callback(CSVLog(out / "log.csv", phase))
    trainer.add_callback(Bar(f"train {phase}", enabled=config.progress))
    if config.snapshot_every:
        trainer.add_callback(GradientMaps(out / "snapshots", records[:config.snapshot_records], mllm.processor,
                                          mllm.family, config.snapshot_every))
    for callback in callbacks:
        trainer.add_callback(callback)
    if _main_process():
        trained = ", ".join(f"{p} {counts[p] / 1e6:.2f}M" for p in config.trainable)
        print(f"{phase}: {type(model).__name__} from {init}; training {trained}; "
              f"{config.batch_size} pairs per step ({micro} x {accumulate} accumulated per process)")
    return trainer, mllm


def _on_gpu(config: TrainConfig) -> bool:
    import torch
    return torch.cuda.is_available() and config.device != "cpu"


def run_phase(config: TrainConfig, objective: str, init: str, out: Path, *, phase: str, callbacks=()) -> Path:
    """Train one phase into the run dir ``out``, resuming from its newest checkpoint; a finished dir is kept."""
    if is_finished(out):
        print(f"{out}: already trained ({phase}); nothing to do")
        return out
    trainer, mllm = build_trainer(config, objective, init, out, phase=phase, callbacks=callbacks)
    checkpoint = latest_checkpoint(out, clean=_main_process())
    if checkpoint is not None and _main_process():
        print(f"{phase}: resuming from {checkpoint}")
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    _finish(trainer, out, config, mllm)
    return out


# -- stages -----------------------------------------------------------------------------------------
def train(config: TrainConfig, *, callbacks=()) -> Path:
    """Run one stage into ``config.out``; returns the finished run dir (a save_pretrained MLLM dir)."""
    config.check()
    out = Path(config.out)
    if config.export:
        from .export import check_exportable
        if config.init:
            check_exportable(config.init)
    if config.stage in ("sft", "dpo"):
        result = run_phase(replace(config, trainable=_trainable(PARTS, config.freeze)), config.stage, config.init, out, phase=config.stage,
                           callbacks=callbacks)
    else:
        from .compose import compose_mllm
        from accelerate import PartialState

        from ..cache import atomic_dir
        fresh = out / "phases" / "fresh"  # the composed MLLM, saved once: every phase starts from a dir
        with PartialState(cpu=config.device == "cpu").main_process_first():  # the state the Trainer reuses
            if not (fresh / "config.json").is_file():
                model, processor = compose_mllm(config.vision_from or config.vision, config.lm, kind=config.kind,
                                                vision_feature_layer=config.vision_feature_layer, seed=config.seed)
                with atomic_dir(fresh) as tmp:
                    model.save_pretrained(tmp)
                    processor.save_pretrained(tmp)
        init = str(fresh)
        if config.projector_epochs:
            projector = out / "phases" / "projector"
            run_phase(replace(config, trainable=("projector",), epochs=config.projector_epochs,
                              lr=config.projector_phase_lr), "sft", init,
                      projector, phase="projector", callbacks=callbacks)
            init = str(projector)
        second = ("projector", "lm") if config.stage == "transplant" else PARTS  # the refined tower stays frozen
        phase = "full" if config.stage == "pretrain" else "projector+lm"
        result = run_phase(replace(config, trainable=_trainable(second, config.freeze)), "sft", init, out,
                           phase=phase, callbacks=callbacks)
    if config.export == "llava" and _main_process() and not (out / "llava").exists():
        from .export import export_llava
        export_llava(out, out / "llava")
    return result


def _trainable(parts, frozen) -> tuple[str, ...]:
    kept = tuple(p for p in parts if p not in frozen)
    if not kept:
        raise SpecError(f"--freeze {','.join(frozen)} leaves nothing to train (this phase trains {', '.join(parts)})")
    return kept
