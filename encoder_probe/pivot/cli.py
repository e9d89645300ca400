"""`probe train pretrain|sft|dpo|transplant|export`: the trainer's command line (accelerate / torchrun-ready)."""
from __future__ import annotations

import os
from dataclasses import fields

_HELP = {
    "pretrain": "the LLaVA recipe: a fresh MLLM from --vision and --lm; projector only, then everything",
    "sft": "SFT on the chosen answers from --init (TRL SFTTrainer), vision tower unfrozen",
    "dpo": "sigmoid DPO (beta 0.1) from --init against a frozen copy of it (TRL DPOTrainer), vision tower unfrozen",
    "transplant": "a fresh MLLM around the refined tower of --vision-from (frozen): projector, then projector + LM",
}


def _common(p) -> None:
    p.add_argument("--out", required=True, help="run dir: the trained save_pretrained MLLM, log.csv, snapshots/")
    p.add_argument("--data", help="JSONL of {image, question, chosen, rejected} (default: the demo VQA pairs)")
    p.add_argument("--image-root", help="where relative image paths start (default: the JSONL's dir or its parent)")
    p.add_argument("--limit", type=int, help="use the first N records (default: all)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps (default: all epochs)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step over all processes (default 8)")
    p.add_argument("--micro-batch-size", type=int, help="pairs per forward per process; the rest is accumulated "
                   "(default: the process's share of --batch-size)")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate of the projector and the LM (AdamW, cosine)")
    p.add_argument("--vision-lr", type=float, help="learning rate of the vision tower (default: --lr)")
    p.add_argument("--freeze", default="", help="comma-separated parts kept frozen: vision, projector, lm")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="fraction of steps of linear warm-up")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order")
    p.add_argument("--save-every", type=int, default=50, help="steps between resumable checkpoints (0: none)")
    p.add_argument("--snapshot-every", type=int, default=0, help="steps between gradient-map snapshots (0: none)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass")
    p.add_argument("--deepspeed", help="a DeepSpeed JSON config, e.g. experiments/pivot/zero3.json (default: none, "
                   "plain DDP / what accelerate launch configured)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: what accelerate picks)")
    p.add_argument("--export", choices=["llava"], help="also write OUT/llava in the LLaVA-NeXT / PIVOT layout (default: no export)")


def add_train_parser(subparsers) -> None:
    """Hook ``probe train ...`` into the main parser."""
    train = subparsers.add_parser("train", help="the PIVOT trainer on TRL: pretrain, sft, dpo, transplant, export")
    stages = train.add_subparsers(dest="stage", required=True)
    for stage, text in _HELP.items():
        p = stages.add_parser(stage, help=text, description=text)
        _common(p)
        if stage in ("sft", "dpo"):
            p.add_argument("--init", required=True, help="any checkpoint load_mllm reads (DPO: also the frozen reference)")
        if stage == "dpo":
            p.add_argument("--beta", type=float, default=0.1, help="DPO beta (sigmoid loss; default 0.1)")
            p.add_argument("--sft-weight", type=float, default=0.0, help="weight of an SFT term on the chosen "
                           "answers (PIVOT: 0, the default; recorded in pivot_train.json)")
        if stage in ("pretrain", "transplant"):
            if stage == "pretrain":
                p.add_argument("--vision", required=True, help="a vision-tower dir (SigLIP / CLIP save_pretrained) "
                               "or an MLLM dir (its tower)")
            else:
                p.add_argument("--vision-from", required=True, help="the MLLM dir whose refined tower is reused, frozen")
            p.add_argument("--lm", required=True, help="a causal-LM dir with its tokenizer (e.g. Qwen2.5-1.5B-Instruct)")
            p.add_argument("--kind", default="llava_onevision", choices=["llava_onevision", "llava"],
                           help="family of the fresh MLLM (default llava_onevision, PIVOT's)")
            p.add_argument("--vision-feature-layer", type=int, help="tower layer the LM reads (default: -2 for a tower "
                           "dir, LLaVA's choice; the layer the MLLM read for an MLLM dir)")
            p.add_argument("--projector-epochs", type=float, default=1.0, help="projector-only epochs first (default 1)")
            p.add_argument("--projector-phase-lr", type=float, default=1e-3, help="learning rate of the projector-only "
                           "phase (default 1e-3, LLaVA's stage 1; --lr is the next phase's)")
        p.set_defaults(func=cmd_train)
    p = stages.add_parser("export", help="write a trained MLLM dir in the LLaVA-NeXT / PIVOT layout")
    p.add_argument("checkpoint", help="a save_pretrained LLaVA-OneVision or LLaVA dir (e.g. a `probe train` output)")
    p.add_argument("--to", choices=["llava"], default="llava", help="layout to write")
    p.add_argument("--out", required=True, help="where to write the exported dir")
    p.set_defaults(func=cmd_export)


def cmd_train(args) -> int:
    from .train import TrainConfig, train
    known = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in known and v is not None}
    values["freeze"] = tuple(p.strip() for p in (args.freeze or "").split(",") if p.strip())
    out = train(TrainConfig(**values))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained MLLM in {out} (log {out / 'log.csv'}); probe it with: probe run --encoder {out} --suite ...")
    return 0


def cmd_export(args) -> int:
    from .export import export_llava
    out = export_llava(args.checkpoint, args.out)
    print(f"LLaVA-NeXT / PIVOT layout in {out}; probe convert or load_mllm reads it back")
    return 0
