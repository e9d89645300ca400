"""The `probe` command: list, inspect, extract, run, compare, check, demo, train.

Bad input is one line (``probe: error: ...``, exit 2) and is found before any work: ``--out``,
``--device``, ``--dtype`` and ``--image-size`` of every subcommand are checked before weights are
loaded. Ctrl-C is one line too (exit 130); what was finished is kept, so the same command resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import EncoderProbeError, SpecError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub

INTERRUPTED = "probe: interrupted; the same command resumes"


def _load_options(args) -> dict:
    options = {}
    if getattr(args, "vision_config", None):
        options["vision_config"] = args.vision_config
    if getattr(args, "image_size", None):
        options["image_size"] = args.image_size  # the string as given (448, 336x504): load_encoder parses it
    if getattr(args, "view", None) is not None:
        options["view"] = args.view
    return options


def _specs(args) -> list[str]:
    spec = getattr(args, "spec", None) or getattr(args, "encoder", None)
    return [] if spec is None else [spec] if isinstance(spec, str) else list(spec)


def check_args(args) -> None:
    """The checks every subcommand shares, before any compute: where it writes, where it runs, what size."""
    from .cache import check_writable_dir
    from .encoders.registry import parse_device, parse_dtype, parse_image_size
    for flag, value, check in (("--out", getattr(args, "out", None), lambda v: check_writable_dir(v, "--out")),
                               ("--device", getattr(args, "device", None), parse_device),
                               ("--dtype", getattr(args, "dtype", None), parse_dtype),
                               ("--image-size", getattr(args, "image_size", None), parse_image_size)):
        if value is None:
            continue
        try:
            check(value)
        except SpecError as e:
            message = str(e)
            raise SpecError(message if message.startswith(flag) else f"{flag}: {message}") from None
    if getattr(args, "view", None) is not None:  # a view the spec's source can give (full: MLLMs only)
        from .runner import check_view
        for spec in _specs(args) or [None]:
            check_view(spec, args.view)


def _sample_pixels(encoder, n: int = 2):
    import torch
    from .data.demo import render_scene
    return torch.stack([encoder.transform(render_scene(0, 0, i)[0]) for i in range(n)])


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
    from .data import DATASETS
    print("\nDatasets (--data NAME=ROOT; no ROOT, ROOT 'demo' or no --data = the built-in data):")
    for name, cls in DATASETS.items():
        print(f"  {name:<14} {cls.__doc__.strip().splitlines()[0]}")
    probes = available_probes()
    print("\nProbes (entry point group encoder_probe.probes):")
    for name, where in probes.items():
        print(f"  {name:<10} {where}")
        if getattr(args, "options", False):
            from .options import describe
            from .probe import get_probe
            probe = get_probe(name)
            needs = probe.needs
            if needs.data or needs.probes:
                print(f"      needs: {', '.join([*needs.data, *(f'probe {p}' for p in needs.probes)])}")
            for line in describe(probe.Config):
                print(f"      {line}")
    if not probes:
        print("  none installed yet")
    return 0


def cmd_inspect(args) -> int:
    import torch
    from .encoders import load_encoder

    if args.mllm:  # the whole MLLM (tower + projector + LM) as the gradient target: what it reads per photo
        from .assets import photo
        from .errors import CheckpointError
        from .mllm import load_mllm
        given = [flag for flag, value in (("--layer", args.layer), ("--with-projector", args.with_projector),
                                          ("--view", args.view), ("--image-size", args.image_size),
                                          ("--vision-config", args.vision_config)) if value]
        if given:
            raise SpecError(f"--mllm: {', '.join(given)} does not apply (the MLLM reads its processor's full "
                            "output; inspect without --mllm for the tower)")
        path = Path(args.spec)
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such directory (--mllm takes an MLLM checkpoint directory)")
        mllm = load_mllm(path, device=args.device, dtype=args.dtype)
        info = {"dir": str(path), **mllm.describe()}
        examples = []
        for name in EXAMPLE_PHOTOS:
            examples.append({"photo": name, **mllm.describe(photo(name))["example"]})
        info["examples"] = examples
        if args.json:
            print(json.dumps(info, indent=2, default=str))
            return 0
        names = {"family": "family", "model": "model class", "processor": "processor", "lm": "language model",
                 "chat_template": "chat template", "image_token": "image token"}
        shown = dict(info, chat_template="the checkpoint's own" if info["chat_template"] == "checkpoint"
                     else info["chat_template"])
        for key, label in names.items():
            print(f"{label:<18}{shown[key]}")
        for key, value in info.items():
            if key not in names and key not in ("dir", "examples"):
                print(f"{key:<18}{value}")
        for example in examples:
            print(f"\nphoto {example['photo']!r} ({example['image']}): {example['lm_positions']} LM positions")
            print(f"  {'view':<12}{'grid':<9}{'tokens':>8}{'newlines':>10}{'LM positions':>14}")
            for view in example["views"]:
                print(f"  {view['name']:<12}{view['grid']:<9}{view['tokens']:>8}{view['newlines']:>10}"
                      f"{view['tokens'] + view['newlines']:>14}")
            base = next((v for v in example["views"] if v["name"] == example["base_view"]), None)
            if base is not None:
                print(f"  base: {base['tokens'] + base['newlines']} LM positions ({base['name']} view); "
                      f"full: {example['lm_tokens']} (every view; the model always reads all of them)")
            else:
                print(f"  full: {example['lm_tokens']} LM positions (no base view)")
        return 0
    encoder = load_encoder(args.spec, device=args.device, dtype=args.dtype, layer=args.layer,
                           with_projector=args.with_projector, **_load_options(args))
    info = encoder.describe()
    if encoder.view == "full":
        examples = _full_view_examples(encoder)
        first = examples[0].pop("_tokens")
        for example in examples[1:]:
            example.pop("_tokens")
        info.update(patches=list(first.patches.shape), prefix=list(first.prefix.shape),
                    grid="+".join(view["grid"] for view in examples[0]["views"]), examples=examples)
    else:
        with torch.inference_mode():
            tokens = encoder.forward_tokens(_sample_pixels(encoder))
        info.update(patches=list(tokens.patches.shape), prefix=list(tokens.prefix.shape),
                    grid=f"{tokens.grid[0]}x{tokens.grid[1]}")
        size = encoder.base_preprocess.size
        info["token_counts"] = encoder.token_counts(encoder.base_layout(tuple(size), tokens.grid))
    info["fingerprint"] = encoder.fingerprint
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
             "with_projector", "preprocess", "n_params", "device", "dtype", "fingerprint", "available_layers",
             "view", "token_counts", "examples"}
    rows.insert(4, ("view", "full: every visual token the LM reads, through the checkpoint's own processor"
                    if encoder.view == "full" else "base: one view at the tower's input size (--view full: "
                    "every token the LM reads, for MLLMs)"))
    if "token_counts" in info:
        counts = info["token_counts"]
        rows.insert(6, ("token count", f"base view {counts['views'][0]['grid']}: {counts['visual_tokens']} "
                        f"visual tokens, {counts['lm_tokens']} LM tokens per image"))
    rows += [(k, str(v)) for k, v in info.items() if k not in shown]
    for key, value in rows:
        print(f"{key:<18}{value}")
    for example in info.get("examples", []):
        h, w = example["image_size"]
        print(f"\nexample photo {example['photo']!r} ({w}x{h}): {example['tile_grid']}")
        print(f"  {'view':<12}{'grid':<9}{'tokens':>8}{'newlines':>10}")
        for view in example["views"]:
            print(f"  {view['name']:<12}{view['grid']:<9}{view['tokens']:>8}{view['newlines']:>10}")
        newlines = sum(view["newlines"] for view in example["views"])
        merged = "" if example["lm_tokens"] == example["visual_tokens"] + newlines else \
            " (after the projector's merge / shrink)"
        print(f"  {'total':<21}{example['visual_tokens']:>8}{newlines:>10}  = {example['lm_tokens']} LM tokens{merged}")
    return 0


EXAMPLE_PHOTOS = ("astronaut", "chelsea")  # square 512x512, and 451x300


def _full_view_examples(encoder) -> list[dict]:
    """Per example photo: the views the model makes of it, their grids and token counts, the tiles."""
    import torch

    from .assets import photo
    out = []
    for name in EXAMPLE_PHOTOS:
        image = photo(name)
        processed = encoder.transform(image)
        with torch.inference_mode():
            tokens = encoder.forward_tokens([processed])[0]
        out.append({"photo": name, "image_size": [image.height, image.width],
                    "tile_grid": _tile_grid(encoder, processed), **encoder.token_counts(tokens.layout),
                    "_tokens": tokens})
    return out


def _tile_grid(encoder, processed) -> str:
    """What the processor cut: anyres / InternVL tiles (rows x cols), or Qwen's native patch grid."""
    views = getattr(encoder, "views", None)
    inputs = processed.pixel_values.shape[0]
    if "image_grid_thw" in processed.extra:
        t, h, w = (int(x) for x in processed.extra["image_grid_thw"])
        return f"native resolution: {h}x{w} patches of {processed.pixel_values.shape[-1]} values ({t} frame)"
    if views is not None and hasattr(views, "tile_grid"):
        rows, cols = views.tile_grid(tuple(processed.image_size))
        return f"tile grid {rows}x{cols} ({inputs} tower inputs of {'x'.join(map(str, processed.pixel_values.shape[-2:]))})"
    return f"{inputs} tower inputs"


def _parse_data(values) -> dict | None:
    """--data NAME[=ROOT] (repeatable) -> {name: root or None}; None when not given (built-in data)."""
    from .data import DATASETS
    if not values:
        return None
    data = {}
    for value in values:
        name, _, root = value.partition("=")
        if not name:
            raise SpecError(f"--data {value!r}: expected NAME[=ROOT], e.g. imagenet=/data/imagenet "
                            "(no ROOT or ROOT 'demo' = the built-in data)")
        if name not in DATASETS:
            raise SpecError(f"--data {value!r}: unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
        data[name] = root or None
    return data


def cmd_extract(args) -> int:
    from .data import open_dataset
    from .encoders import load_encoder
    from .features import extract

    data = _parse_data(args.data) or {"imagenet": "demo"}
    if len(data) != 1:
        raise SpecError("probe extract takes one --data NAME=ROOT")
    (name, root), = data.items()
    encoder = load_encoder(args.encoder, device=args.device, dtype=args.dtype, with_projector=args.with_projector, **_load_options(args))
    layers = [int(x) if x.lstrip("-").isdigit() else x for x in args.layer] if args.layer else None
    for split in args.split.split(","):
        subsample = {"per_class": args.per_class, "seed": args.seed} if args.per_class else {}
        dataset = open_dataset(name, root, split, **subsample)
        features = extract(encoder, dataset, out=args.out, layers=layers, pool=args.pool.split(","),
                           tokens=args.tokens, batch_size=args.batch_size, chunk_size=args.chunk_size,
                           num_workers=args.workers, on_bad_image=args.on_bad_image, autocast=args.autocast,
                           decode=args.decode)
        if int(os.environ.get("RANK", "0")) == 0:
            skipped = features.meta["skipped"]
            counts = features.meta.get("tokens_per_image") or {}
            tokens = "" if not counts.get("lm") else (
                f" (view full: {counts['visual']['min']}..{counts['visual']['max']} visual, "
                f"{counts['lm']['min']}..{counts['lm']['max']} LM tokens per image)")
            print(f"{name}/{split}: {len(features)} images -> {features.path}"
                  + (f" ({len(skipped)} unreadable skipped)" if skipped else "") + tokens)
    return 0


def cmd_run(args) -> int:
    from .options import parse_option_items
    from .runner import run_suite

    data = _parse_data(args.data)
    options, origin = parse_option_items(args.option)
    for flag, key, value in (("--per-class", "per_class", args.per_class), ("--solver", "solver", args.solver),
                             ("--pool", "pool", args.pool), ("--head", "head", args.head),
                             ("--reference", "reference", args.reference)):
        if value is not None:  # shorthands for --option KEY=VALUE, routed the same way
            options.setdefault(key, value)
            origin.setdefault(key, f"{flag} {' '.join(value) if isinstance(value, list) else value}")
    from .runtime import extraction_defaults
    extraction_defaults(autocast=args.autocast, decode=args.decode or "auto")  # every probe's features
    results = run_suite(args.encoder, args.suite, args.out, device=args.device, dtype=args.dtype, data=data,
                        seeds=args.seeds, options=options, option_origin=origin, bootstrap=args.bootstrap,
                        **_load_options(args))
    from .runner import summary_table
    failed = [(r["encoder"]["spec"], name, p.get("error", "")) for r in results for name, p in r["probes"].items()
              if p["status"] != "ok"]
    for spec, name, error in failed:
        print(f"probe {name} failed on {spec}: {error}", file=sys.stderr)
    for record in results:
        for name, p in record["probes"].items():
            for warning in p.get("warnings") or []:
                print(f"warning: {record['encoder']['spec']} {name}: {warning}", file=sys.stderr)
    print(summary_table(results), end="")
    print(f"results in {args.out}")
    return 1 if failed else 0


def cmd_compare(args) -> int:
    from .report import compare

    result = compare(args.runs, args.out, allow_mixed=args.allow_mixed, reference=args.reference,
                     bootstrap=args.bootstrap)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(result.files["table.md"].read_text(), end="")
    for run, probe, error in result.failures:
        print(f"probe {probe} failed on {run}: {error}", file=sys.stderr)
    print(f"report in {Path(args.out) / 'report.html'}")
    return 0


def cmd_check(args) -> int:
    from .report import check
    from .report.check import PASSING

    result = check(args.run, args.baseline, args.tolerance, allow_mixed=args.allow_mixed,
                   significant=args.significant, bootstrap=args.bootstrap)
    print(result.to_markdown(), end="")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    for key in result.unknown_tolerances:
        print(f"warning: --tolerance {key}: no such metric in the baseline", file=sys.stderr)
    bad = result.regressions
    if len(bad):
        print(f"{len(bad)} metric(s) regressed or missing: "
              + ", ".join(f"{r.probe}/{r.metric} ({r.status})" for r in bad.itertuples()), file=sys.stderr)
    else:
        status = result.table["status"]
        held, noisy = int(status.isin(PASSING).sum()), int((status == "inside noise").sum())
        undefined = int((status == "undefined").sum())
        extra = [f"{noisy} beyond the tolerance but inside the noise"] if noisy else []
        extra += [f"{undefined} undefined for this data, left out"] if undefined else []
        print(f"all {held} baseline metrics hold" + (f" ({'; '.join(extra)})" if extra else ""))
    return result.exit_code


def cmd_convert(args) -> int:
    """A LLaVA-NeXT / PIVOT training dir -> the transformers MLLM dir that reproduces its forward."""
    from .mllm.convert import describe, is_pivot_dir, load_processor, save_converted
    source, out = Path(args.dir), Path(args.out)
    if out.exists() or out.is_symlink():
        raise SpecError(f"--out {out}: already exists; convert writes a new directory")
    if not source.is_dir():
        raise SpecError(f"{source}: no such directory")
    if not is_pivot_dir(source):
        from .encoders.registry import read_config
        read_config(source)  # no config.json / not JSON: its own one-line error
        raise SpecError(f"{source / 'config.json'}: not a LLaVA-NeXT / PIVOT training dir (no mm_vision_tower); "
                        "transformers MLLM dirs load as they are")
    save_converted(source, out, vision_config=args.vision_config)
    import transformers
    config = transformers.AutoConfig.from_pretrained(out, local_files_only=True)
    print(f"{source} -> {out}\n  {describe(config, load_processor(out))}")
    return 0


def cmd_demo(args) -> int:
    """Tiny checkpoints of every layout, the demo data's features, real weights vs random twins on real data
    (probes, Grad-CAM, localisation), the PIVOT toy (base / SFT / DPO), and the comparison reports."""
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

    from .data import open_dataset
    from .data.demo import demo_data
    from .features import extract
    print(f"\nbuilt-in demo data: {demo_data()}")
    encoder = load_encoder(specs[0])
    for name, split, tokens in (("imagenet", "train", False), ("imagenet", "val", False), ("ade20k", "val", True)):
        features = extract(encoder, open_dataset(name, "demo", split), out=root / "features", tokens=tokens,
                           pool=["cls", "mean"], batch_size=32)
        extra = f", tokens {features.tokens().shape}, masks {features.masks.shape}" if tokens else ""
        print(f"  {name}/{split}: {len(features)} images, {features.num_classes} classes, "
              f"pooled {features.pooled('cls').shape}{extra} -> {features.path}")

    from . import walkthrough
    reports = walkthrough.run(root / "features", root)
    from .pivot.demo import pivot_report, run_pivot_demo
    reports.append(pivot_report(run_pivot_demo(root / "pivot-trainer", cache=root / "features"), root / "report-pivot"))
    print("\nComparison reports (tables, CI bars, gradient maps side by side; self-contained HTML):")
    for report in reports:
        print(f"  {report}")
    return 0


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help states its default: a plain default is appended (``(default: 64)``), a
    switch says ``(default: off)``; options whose default is not a value (None) say it in their text."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required and action.option_strings and "required" not in text:
            return text + " (required)"
        if not action.option_strings or action.required or "default" in text.lower() or \
                isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return text + " (default: off)"
        if action.default is not None and action.default is not argparse.SUPPRESS:
            return text + " (default: %(default)s)"
        return text


def parsers(parser: argparse.ArgumentParser):
    """The parser and every subparser below it (train's stages included), depth first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                yield from parsers(sub)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="probe", description="How good is a vision encoder, and what did "
                                     "post-training do to it?", formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"probe {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")

    def loading(p):
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cpu)")
        p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the weights' dtype "
                       "as loaded, float32 for random init)")
        p.add_argument("--vision-config", help="local dir with the tower's config, for LLaVA/PIVOT checkpoints "
                       "(default: the checkpoint's own, else the built-in known towers, else the weights' shapes)")
        p.add_argument("--image-size", metavar="N|HxW", help="input size for dynamic-resolution towers "
                       "(Qwen2-VL), e.g. 448 or 336x504 (default: the tower's own)")
        p.add_argument("--view", metavar="base|full", help="base: one view at the tower's input size; full "
                       "(MLLMs): every visual token the LM reads (anyres base + tiles, InternVL tiles + thumbnail, "
                       "Qwen native resolution) through the checkpoint's own processor (default: base)")

    spec_help = "encoder spec SOURCE:NAME[@WEIGHTS] (e.g. timm:vit_small_patch16_224) or a checkpoint directory"

    p = sub.add_parser("list", help="sources, known towers and installed probes")
    p.add_argument("--options", action="store_true", help="also each probe's options: protocol (hashed, must "
                   "match to compare) or runtime, type, default")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("inspect", help="what was detected: source, layer, token layout, grid, dims, fingerprint")
    p.add_argument("spec", help=spec_help)
    p.add_argument("--layer", help="override the default layer: int, negative from the end, or 'final' "
                   "(default: what the MLLM's projector reads, the encoder's final tokens for plain encoders)")
    p.add_argument("--with-projector", action="store_true", help="show the projector's output tokens")
    p.add_argument("--json", action="store_true", help="print everything detected as JSON")
    p.add_argument("--mllm", action="store_true", help="the whole MLLM of a checkpoint dir (tower + projector + "
                   "LM, as the mllm gradient targets load it): family, classes, LM size, chat template, image "
                   "token, and the LM positions the example photos take per view")
    loading(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("extract", help="extract features into the on-disk cache (torchrun shards it)")
    p.add_argument("--encoder", required=True, help=spec_help)
    p.add_argument("--data", action="append", help="NAME[=ROOT] (see `probe list`); no ROOT or ROOT 'demo' = "
                   "the built-in data (default: the demo data in the imagenet layout)")
    p.add_argument("--split", default="train,val", help="comma-separated splits")
    p.add_argument("--out", required=True, help="cache directory; entries are named by their key")
    p.add_argument("--layer", action="append", help="layer(s) to keep, repeatable (default: the encoder's)")
    p.add_argument("--pool", default="mean", help="comma-separated: cls, mean, cls+mean, head")
    p.add_argument("--tokens", action="store_true", help="also keep patch and prefix tokens (float16)")
    p.add_argument("--with-projector", action="store_true", help="features after the MLLM's projector")
    p.add_argument("--per-class", type=int, help="keep K images per class, seeded (default: all images)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-class draw")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--chunk-size", type=int, help="images per resumable chunk (default 1024, 256 with --tokens)")
    p.add_argument("--workers", type=int, help="DataLoader worker processes (default: balanced against torch "
                   "threads on CPU, min(8, cores) on GPU)")
    _extract_flags(p)
    p.add_argument("--on-bad-image", choices=["fail", "skip"], default="fail",
                   help="an unreadable image fails the run (default) or is skipped and counted")
    loading(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("run", help="run a probe suite on one or more encoders")
    p.add_argument("--encoder", action="append", required=True, help=spec_help + "; repeatable")
    p.add_argument("--suite", required=True, help="comma-separated probe names, e.g. imagenet,seg,gradcam")
    p.add_argument("--data", action="append", help="NAME[=ROOT], repeatable; each probe reads the first of its "
                   "task (default: the built-in demo data)")
    p.add_argument("--out", required=True, help="results directory: OUT/<fingerprint[:16]>/results.json per encoder")
    p.add_argument("--seeds", type=int, default=1, help="rerun what is stochastic in training (held-out split, "
                   "--per-class draw, head init, batch order) with N seeds: mean and a 95%% interval over seeds")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="B", help="resamples of the evaluation images "
                   "behind every metric's 95%% CI (0: no intervals)")
    p.add_argument("--per-class", type=int, help="K train/val images per class, few-shot subsets (default: all)")
    p.add_argument("--solver", choices=["torch", "sklearn"], help="linear probe solver, sklearn = the CLIP "
                   "recipe (default: torch)")
    p.add_argument("--pool", help="pooling of the classification probes: cls, mean, cls+mean, head (default: mean)")
    p.add_argument("--head", choices=["linear", "mlp"], help="segmentation head of the seg probe (default linear)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="a probe option, repeatable: KEY=VALUE goes to every probe of the suite that takes KEY, "
                   "PROBE.KEY=VALUE to that probe (e.g. knn.ks=10,20); `probe list --options` lists them; an unknown "
                   "key or a bad value stops the run before any work (default: none)")
    _extract_flags(p)
    p.add_argument("--reference", action="append", metavar="SPEC",
                   help="a reference encoder for the align probe (repeatable), e.g. the tower before SFT/DPO "
                   "(default: none)")
    loading(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="side-by-side report of runs: table (CSV, Markdown), plots, report.html")
    p.add_argument("runs", nargs="+", metavar="RUN", help="a results.json, or a run dir holding */results.json")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--allow-mixed", action="store_true", help="compare results run with different probe settings")
    p.add_argument("--reference", metavar="RUN", help="the run every delta is against: a run label, an encoder "
                   "spec or a fingerprint prefix (default: the first run, i.e. the first --encoder of probe run)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="B", help="bootstrap resamples of the evaluation "
                   "items behind each difference's 95%% CI and p-value (paired on the same items; default 1000)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("check", help="regression gate: exit 1 when a metric falls below baseline - tolerance")
    p.add_argument("run", metavar="RUN", help="a results.json, or a run dir holding */results.json")
    p.add_argument("--baseline", required=True, help="the baseline results.json")
    p.add_argument("--tolerance", action="append", metavar="METRIC=ABS",
                   help="allowed drop, repeatable; METRIC is probe/metric, metric or * (default 0)")
    p.add_argument("--allow-mixed", action="store_true", help="check against a baseline run with other settings")
    p.add_argument("--significant", action="store_true", help="a regression must also be outside the noise: the "
                   "bootstrap 95%% CI of run - baseline over the items excludes 0 on the bad side (a metric without "
                   "per-item outcomes counts as a regression)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="B", help="bootstrap resamples behind the delta "
                   "CI and p-value columns (default 1000)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("convert", help="a LLaVA-NeXT / PIVOT training dir -> the transformers MLLM dir "
                       "(LlavaForConditionalGeneration) that reproduces its forward")
    p.add_argument("dir", metavar="DIR", help="the training dir (config.json with mm_vision_tower)")
    p.add_argument("--out", required=True, metavar="HF_DIR", help="the new directory (must not exist)")
    p.add_argument("--vision-config", metavar="DIR", help="local dir with the tower's config (default: the "
                   "built-in known towers by mm_vision_tower, else the weights' shapes)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("demo", help="the built-in demo (no data or network needed)")
    p.add_argument("--out", default=".cache/demo", help="where the toy checkpoints, features and reports go")
    p.set_defaults(func=cmd_demo)
    from .pivot.cli import add_train_parser
    add_train_parser(sub)
    for each in parsers(parser):
        each.formatter_class = HelpFormatter
    return parser


def _extract_flags(p) -> None:
    """--autocast / --decode of `probe extract` and `probe run` (the GPU-side extraction options)."""
    from .runtime import AUTOCASTS, DECODES
    p.add_argument("--autocast", choices=list(AUTOCASTS), help="forward under torch.autocast in this dtype "
                   "(features stored float32; part of the cache key; default: none, the encoder's dtype)")
    p.add_argument("--decode", choices=list(DECODES), help="where JPEGs are decoded: cpu (PIL in the loader), "
                   "device (torchvision decode_jpeg + preprocessing on the encoder's device), auto (device on "
                   "CUDA) (default: auto)")


def main(argv=None) -> int:
    from .runtime import keep_freed_memory
    keep_freed_memory()  # before any buffer is allocated: CPU forwards stop re-faulting their activations
    try:
        args = build_parser().parse_args(argv)
        check_args(args)  # before any weights are loaded or anything is written
        return args.func(args)
    except EncoderProbeError as e:
        print(f"probe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # finished work (feature chunks, results.json) is kept: a rerun resumes
        print(INTERRUPTED, file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
