"""The `probe` command: list, inspect, run, demo."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import EncoderProbeError, SpecError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub


def _load_options(args) -> dict:
    options = {}
    if getattr(args, "vision_config", None):
        options["vision_config"] = args.vision_config
    if getattr(args, "image_size", None):
        options["image_size"] = args.image_size
    return options


def _sample_pixels(encoder, n: int = 2):
    import torch
    from .toy import demo_images
    return torch.stack([encoder.transform(image) for image in demo_images(n, size=max(encoder.preprocess.size))])


def cmd_list(args) -> int:
    from .encoders import list_sources
    from .encoders.known_towers import KNOWN_TOWERS
    from .probe import available_probes

    print("Encoder sources (spec forms: SOURCE:TARGET[@WEIGHTS], or a checkpoint directory):")
    for source in list_sources():
        print(f"  {source.name:<10} {source.description}")
    print(f"\nKnown vision towers for LLaVA/PIVOT checkpoints ({len(KNOWN_TOWERS)}):")
    for hub_id, cfg in KNOWN_TOWERS.items():
        print(f"  {hub_id:<42} {cfg['model_type'].split('_')[0]:<7} {cfg['num_hidden_layers']} blocks, "
              f"D={cfg['hidden_size']}, patch {cfg['patch_size']}, {cfg['image_size']}px")
    probes = available_probes()
    print("\nProbes (entry point group encoder_probe.probes):")
    for name, where in probes.items():
        print(f"  {name:<10} {where}")
    if not probes:
        print("  none installed yet")
    return 0


def cmd_inspect(args) -> int:
    import torch
    from .encoders import load_encoder

    encoder = load_encoder(args.spec, device=args.device, dtype=args.dtype, layer=args.layer,
                           with_projector=args.with_projector, **_load_options(args))
    with torch.inference_mode():
        tokens = encoder.forward_tokens(_sample_pixels(encoder))
    info = encoder.describe()
    info.update(patches=list(tokens.patches.shape), prefix=list(tokens.prefix.shape),
                grid=f"{tokens.grid[0]}x{tokens.grid[1]}", fingerprint=encoder.fingerprint)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    layer = info["layer"]
    where = f"{layer} of {info['depth']}" if isinstance(layer, int) else layer
    rows = [("spec", info["spec"]), ("source", info["source"]), ("architecture", info.get("architecture", "")),
            ("layer", f"{where}  ({info['layer_note']})"),
            ("tokens", f"patches {tuple(info['patches'])}  prefix {tuple(info['prefix'])}  grid {info['grid']}"),
            ("projected", "yes (projector output)" if info["with_projector"] else "no"),
            ("preprocess", info["preprocess"]), ("params", f"{info['n_params']:,}"),
            ("device", f"{info['device']} {info['dtype']}"), ("fingerprint", info["fingerprint"])]
    shown = {"spec", "source", "architecture", "layer", "layer_note", "depth", "patches", "prefix", "grid",
             "with_projector", "preprocess", "n_params", "device", "dtype", "fingerprint", "available_layers"}
    rows += [(k, str(v)) for k, v in info.items() if k not in shown]
    for key, value in rows:
        print(f"{key:<18}{value}")
    return 0


def cmd_run(args) -> int:
    from .runner import run_suite

    data = None
    if args.data:
        malformed = [kv for kv in args.data if "=" not in kv or not kv.split("=", 1)[0]]
        if malformed:
            raise SpecError(f"--data {malformed[0]!r}: expected NAME=ROOT, e.g. imagenet=/data/imagenet")
        data = dict(kv.split("=", 1) for kv in args.data)
    results = run_suite(args.encoder, args.suite, args.out, device=args.device, dtype=args.dtype, data=data,
                        seeds=args.seeds, **_load_options(args))
    failed = [(r["encoder"]["spec"], name) for r in results for name, p in r["probes"].items()
              if p["status"] != "ok"]
    for spec, name in failed:
        print(f"probe {name} failed on {spec}", file=sys.stderr)
    print(f"results in {args.out}")
    return 1 if failed else 0


def cmd_demo(args) -> int:
    """Until the demo data and probes land: tiny checkpoints of each layout, tokens of generated images."""
    import torch
    from . import toy
    from .encoders import load_encoder

    root = Path(args.out)
    checkpoints = {"pivot": lambda d: toy.write_pivot(d), "llava-onevision": lambda d: toy.write_hf_mllm(d, "llava_onevision"),
                   "qwen2.5-vl": lambda d: toy.write_hf_mllm(d, "qwen2_5_vl"), "internvl": lambda d: toy.write_hf_mllm(d, "internvl")}
    specs = ["timm:vit_tiny_patch16_224"]
    for name, write in checkpoints.items():
        if not (root / name / "config.json").is_file():
            write(root / name)
        specs.append(str(root / name))
    print(f"{'encoder':<40} {'source':<9} {'layer':<6} {'patches':<16} {'prefix':<14} grid   projected")
    for spec in specs:
        options = {"image_size": 32} if "qwen" in spec else {}
        encoder = load_encoder(spec, **options)
        pixels = _sample_pixels(encoder, 4)
        with torch.inference_mode():
            tokens = encoder.forward_tokens(pixels)
            projected = encoder.project(tokens).patches.shape if encoder.projector is not None else "-"
        print(f"{spec:<40} {encoder.source:<9} {str(encoder.layer):<6} {str(tuple(tokens.patches.shape)):<16} "
              f"{str(tuple(tokens.prefix.shape)):<14} {tokens.grid[0]}x{tokens.grid[1]:<4} "
              f"{tuple(projected) if projected != '-' else '-'}")
    print(f"\ntoy checkpoints in {root}; inspect one with: probe inspect {specs[1]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probe", description="How good is a vision encoder, and what did "
                                     "post-training do to it?")
    sub = parser.add_subparsers(dest="command", required=True)

    def loading(p):
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...")
        p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
        p.add_argument("--vision-config", help="local dir with the tower's config (LLaVA/PIVOT checkpoints)")
        p.add_argument("--image-size", type=int, help="input size for dynamic-resolution towers (Qwen2-VL)")

    p = sub.add_parser("list", help="sources, known towers and installed probes")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("inspect", help="what was detected: source, layer, token layout, grid, dims, fingerprint")
    p.add_argument("spec")
    p.add_argument("--layer", help="override the default layer (int, negative from the end, or 'final')")
    p.add_argument("--with-projector", action="store_true", help="show the projector's output tokens")
    p.add_argument("--json", action="store_true")
    loading(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("run", help="run a probe suite on one or more encoders")
    p.add_argument("--encoder", action="append", required=True)
    p.add_argument("--suite", required=True, help="comma-separated probe names, e.g. imagenet,seg,gradcam")
    p.add_argument("--data", action="append", help="NAME=ROOT")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=1)
    loading(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="the built-in demo (no data or network needed)")
    p.add_argument("--out", default=".cache/demo")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EncoderProbeError as e:
        print(f"probe: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
