"""Load time and peak RSS of `load_encoder` on a sharded MLLM checkpoint with large LM shards.

The checkpoint is a LlavaOnevision save_pretrained dir (a ViT-S-sized SigLIP tower) plus
--lm-gb of LM tensors in separate shards, all listed in model.safetensors.index.json. Each
measurement runs in a fresh process; RSS is the process peak (ru_maxrss) minus the peak after
imports (VmHWM reset). The peer is what a loader without the index does: every shard read into memory.

    .venv/bin/python benchmarks/load_encoder_rss.py --lm-gb 2
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(root: Path, lm_gb: float) -> Path:
    import torch
    import transformers as T
    from safetensors.torch import save_file

    if (root / "model.safetensors.index.json").is_file():
        return root
    torch.manual_seed(0)
    vision = dict(model_type="siglip_vision_model", hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                  num_attention_heads=6, image_size=224, patch_size=16)
    text = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, bos_token_id=0, eos_token_id=1)
    cfg = T.LlavaOnevisionConfig(vision_config=vision, text_config=text, image_grid_pinpoints=[[224, 224]])
    T.LlavaOnevisionForConditionalGeneration(cfg).save_pretrained(root, max_shard_size="50MB")
    index_file = root / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    per_shard = 256 * 2**20  # bytes of fp32 per LM shard
    n_shards = max(1, round(lm_gb * 2**30 / per_shard))
    for i in range(n_shards):
        name = f"lm-{i:05d}.safetensors"
        tensors = {f"language_model.layers.{i}.mlp.{j}.weight": torch.randn(4096, 4096) for j in range(4)}
        save_file(tensors, root / name)
        index["weight_map"].update({k: name for k in tensors})
    index_file.write_text(json.dumps(index))
    return root


def _peak_mb(reset: bool = False) -> float:
    """Peak resident set (VmHWM) of this process; ``reset`` restarts the peak at the current RSS."""
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, path: str) -> None:
    import torch  # noqa: F401  (imports are not part of the measurement)
    import transformers  # noqa: F401
    from safetensors.torch import load_file

    from encoder_probe import load_encoder

    before_imports = _peak_mb(reset=True)
    if mode == "load_encoder":  # the modeling code the loader imports lazily: a fixed cost, reported apart
        import transformers.models.llava_onevision.modeling_llava_onevision  # noqa: F401
        import transformers.models.siglip.modeling_siglip  # noqa: F401
    imports_mb = _peak_mb() - before_imports
    base = _peak_mb(reset=True)
    start = time.perf_counter()
    if mode == "load_encoder":
        encoder = load_encoder(path)
        tower_mb = sum(p.numel() * p.element_size() for p in encoder.module.parameters()) / 2**20
    else:  # peer: read every shard whole into memory (what loading the full MLLM does)
        state = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            state.update({k: v.clone() for k, v in load_file(f).items()})
        tower_mb = sum(v.numel() * v.element_size() for k, v in state.items() if k.startswith("vision_tower.")) / 2**20
    seconds = time.perf_counter() - start
    print(json.dumps({"mode": mode, "seconds": seconds, "rss_delta_mb": _peak_mb() - base, "tower_mb": tower_mb,
                      "imports_mb": imports_mb}))


def measure(mode: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lm-gb", type=float, default=2.0)
    parser.add_argument("--dir", default=None, help="default: .cache/bench-sharded-<lm-gb>gb")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"))
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    path = build(Path(args.dir or f".cache/bench-sharded-{args.lm_gb:g}gb"), args.lm_gb)
    total_gb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30
    ours = measure("load_encoder", path)
    peer = measure("load_all_shards", path)
    print(f"checkpoint: {total_gb:.2f} GiB on disk in {len(list(path.glob('*.safetensors')))} shards, "
          f"tower {ours['tower_mb']:.0f} MiB")
    print(f"{'':<18}{'seconds':>10}{'peak RSS +MiB':>16}")
    for r in (ours, peer):
        print(f"{r['mode']:<18}{r['seconds']:>10.2f}{r['rss_delta_mb']:>16.0f}")
    print(f"ratio (peer / load_encoder): time {peer['seconds'] / ours['seconds']:.1f}x, "
          f"RSS {peer['rss_delta_mb'] / ours['rss_delta_mb']:.1f}x; "
          f"load_encoder RSS / tower size {ours['rss_delta_mb'] / ours['tower_mb']:.2f} "
          f"(+{ours['imports_mb']:.0f} MiB of modeling-code imports, independent of the checkpoint)")


if __name__ == "__main__":
    main()
