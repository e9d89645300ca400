"""`probe train pretrain|sft|dpo|transplant|export`: the trainer's command line (torchrun-ready)."""
from __future__ import annotations

import argparse
from dataclasses import fields

from .model import TINY_ENCODER

_HELP = {
    "pretrain": "stage 1: a fresh MLLM (--encoder, --lm); projector only, then everything",
    "sft": "SFT on the chosen answers from --init, vision tower unfrozen",
    "dpo": "sigmoid DPO (beta 0.1) from --init against a frozen copy of it, vision tower unfrozen",
    "transplant": "a fresh MLLM around the refined tower of --vision-from (frozen) with a new projector",
}


def _common(p) -> None:
    p.add_argument("--out", required=True, help="run dir: checkpoint (load_encoder reads it), log.csv, snapshots/")
    p.add_argument("--data", help="JSONL of {image, question, chosen, rejected} (default: the demo VQA pairs)")
    p.add_argument("--image-root", help="where relative image paths start (default: the JSONL's dir or its parent)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the data")
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps (default: all epochs)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step over all ranks")
    p.add_argument("--micro-batch-size", type=int, help="pairs per forward pass, the rest by gradient accumulation "
                   "(default: the rank's share of --batch-size, no accumulation)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (AdamW)")
    p.add_argument("--vision-lr", type=float, help="learning rate of the vision tower (default: --lr)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="fraction of steps of linear warm-up")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order")
    p.add_argument("--limit", type=int, help="use the first N records (default: all records)")
    p.add_argument("--save-every", type=int, default=0, help="steps between resumable checkpoints")
    p.add_argument("--snapshot-every", type=int, default=0, help="steps between gradient-map snapshots (npz)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass: less memory, more compute")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available; LOCAL_RANK under torchrun)")
    p.add_argument("--export", choices=["llava"], help="also write the result in the LLaVA/PIVOT layout to OUT/llava (default: no export)")


def _layer(value: str):
    return int(value) if value.lstrip("-").isdigit() else value


def add_train_parser(subparsers) -> None:
    """Hook ``probe train ...`` into the main parser."""
    train = subparsers.add_parser("train", help="minimal PIVOT trainer: pretrain, sft, dpo, transplant, export")
    stages = train.add_subparsers(dest="stage", required=True)
    for stage, text in _HELP.items():
        p = stages.add_parser(stage, help=text, description=text)
        _common(p)
        if stage in ("pretrain", "transplant"):
            p.add_argument("--projector-epochs", type=int, default=1, help="projector-only epochs first")
            p.add_argument("--lm", help="a local HF causal-LM dir (default: a tiny Qwen2 with a word tokenizer)")
        if stage == "pretrain":
            p.add_argument("--encoder", default=TINY_ENCODER, help=f"vision tower spec (default {TINY_ENCODER})")
            p.add_argument("--encoder-layer", type=_layer, help="tower layer the LM reads (default: the loader's; "
                           "-2 = LLaVA-NeXT's SigLIP choice, last block removed)")
        if stage in ("sft", "dpo"):
            p.add_argument("--init", required=True, help="checkpoint to start from (DPO: also the frozen reference)")
        if stage == "dpo":
            p.add_argument("--beta", type=float, default=0.1, help="DPO beta (sigmoid loss)")
            p.add_argument("--sft-weight", type=float, default=0.0, help="weight of an SFT term (PIVOT: 0)")
        if stage == "transplant":
            p.add_argument("--vision-from", required=True, help="checkpoint whose refined tower is reused")
        p.set_defaults(func=cmd_train)
    p = stages.add_parser("export", help="write a checkpoint in the LLaVA/PIVOT key layout")
    p.add_argument("checkpoint", help="a `probe train` run dir")
    p.add_argument("--to", choices=["llava"], default="llava", help="layout to write")
    p.add_argument("--out", required=True, help="where to write the exported checkpoint")
    p.set_defaults(func=cmd_export)


def cmd_train(args) -> int:
    from .train import TrainConfig, train
    known = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in known and v is not None})
    if args.export == "llava":  # refuse before training, not after
        _check_exportable(config)
    out = train(config)
    if args.export == "llava":
        cmd_export(argparse.Namespace(checkpoint=out, out=out / "llava"))
    print(f"checkpoint in {out} (log {out / 'log.csv'}); probe it with: probe run --encoder {out} --suite ...")
    return 0


def _check_exportable(config) -> None:
    from ..encoders import load_encoder
    from .export import check_exportable
    from .model import read_mllm_config
    if config.init:
        vision = read_mllm_config(config.init)["vision"]
    else:
        vision = {"spec": config.vision_from or config.encoder, "layer": None if config.vision_from else config.encoder_layer}
    check_exportable(load_encoder(vision["spec"], layer=vision["layer"], **vision.get("options", {})), vision["spec"])


def cmd_export(args) -> int:
    from .export import export_llava
    from .train import _world
    if _world()[0] == 0:
        out = export_llava(args.checkpoint, args.out)
        print(f"LLaVA/PIVOT layout in {out}; load it with --vision-config {out / 'vision_tower'}")
    return 0
