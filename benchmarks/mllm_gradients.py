"""Seconds per gradient map and peak memory: the MLLM's gradient at the visual tokens the LM reads.

Ours: ``MLLM.logprob_gradient`` (every parameter frozen, the tower and projector run without an
autograd graph, a pre-hook makes the LM's ``inputs_embeds`` the leaf, logits only where answer
tokens are predicted; backward through the LM's activations only). Naive: what a user writes
with transformers alone: the model class as loaded (every parameter trainable), its own loss with
``labels`` = -100 but the answer, a forward hook on ``multi_modal_projector`` with
``retain_grad``, ``backward()``, the hooked gradient put in LM order (``AnyresViews.split``, the
model's unpad), then ``zero_grad``. Both give the same map (checked before timing).

The model: a LLaVA-OneVision ``save_pretrained`` dir at the published vision geometry (SigLIP/14 at
384 px, 27x27 tokens a tile, the 36 anyres_max_9 pinpoints), tiny tower (width 32, 2 blocks), an LM
wide enough to dominate (Qwen2, ``--hidden`` x ``--layers``), the toy BPE tokenizer and ChatML
template, ``--vocab`` embedding rows. Real anyres tiling on the astronaut (512x512: base + 2x2
tiles, 3699 LM positions) and chelsea (451x300: base + 1x2 tiles unpadded, 1836) photos.

"base" vs "full": the MLLM always reads the whole processor output; a base map is the full map
kept for the base view (``keep_view(g, base_view(g.layout))``), so it costs the same forward and
backward plus a slice; both are timed.

Time: paired rounds in one process (ours full, ours base, naive, DPO back to back, the order rotated
each round), medians; the speed-up is the median of the per-round naive / ours-full ratios.
Peak memory: one fresh process per configuration. On CPU it is the peak resident set above the
resident set just before the call (VmHWM reset with /proc/self/clear_refs after a warm-up call,
the loaded model and the tokenised example already resident), with glibc's mmap threshold pinned
(MALLOC_MMAP_THRESHOLD_) so freed tensors go back to the OS and a warm-up cannot hide the peak; it
counts everything the process touches (torch's allocations, autograd buffers, the allocator's
slack). On CUDA it is ``torch.cuda.max_memory_allocated`` above ``memory_allocated`` before the call.

    .venv/bin/python benchmarks/mllm_gradients.py            # --hidden 256 --layers 4 --rounds 3 [--device cuda]
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

PHOTOS = ("astronaut", "chelsea")
QUESTION = "What is in the image?"
RECORD = {"question": QUESTION, "chosen": "an astronaut in a white suit", "rejected": "a red square on a blue mat"}
MODES = ("ours_full", "ours_base", "naive", "dpo")


def build(root: Path, hidden: int, layers: int, vocab: int) -> Path:
    """The LLaVA-OneVision dir (written once): toy.published_mllm's vision geometry, a wider LM."""
    import torch
    import transformers as T

    from encoder_probe import toy
    from encoder_probe.encoders.processors import published_processor
    from encoder_probe.mllm.model import build_processor
    if (root / "config.json").is_file() and (root / "processor_config.json").is_file():
        return root
    config = toy.published_mllm("llava_onevision").config.to_dict()  # published geometry, tokenizer's ids
    text = {k: v for k, v in config.pop("text_config").items() if k not in ("layer_types", "head_dim")}
    text.update(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=3 * hidden,
                num_attention_heads=hidden // 64, num_key_value_heads=2, vocab_size=vocab)
    torch.manual_seed(0)
    model = T.LlavaOnevisionForConditionalGeneration(T.LlavaOnevisionConfig(**dict(config, text_config=text)))
    model.save_pretrained(root)
    build_processor("llava_onevision", published_processor("llava_onevision", model.config),
                    toy.chat_tokenizer("llava_onevision"), model.config).save_pretrained(root)
    return root


def _sync(device):
    import torch
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Runner:
    """Both paths on one checkpoint and device."""

    def __init__(self, path: Path, device, naive: bool = True, ours: bool = True):
        import torch
        import transformers as T

        from encoder_probe.mllm import load_mllm
        self.device = device
        self.mllm = load_mllm(path, device=device)
        self.model = None
        if naive:  # as a user loads it: every parameter trainable
            self.model = T.LlavaOnevisionForConditionalGeneration.from_pretrained(path, local_files_only=True)
            self.model = self.model.to(device or "cpu").eval()
            assert all(p.requires_grad for p in self.model.parameters())
        if not ours:  # the naive child measures the naive model alone
            self.mllm.free()
        self.torch = torch

    def example(self, image, answer):  # the processor and config only: the naive child has no MLLM weights
        return self.mllm.example(image, QUESTION, answer)

    def ours(self, example, view: str):
        from encoder_probe.mllm import base_view, keep_view
        g = self.mllm.logprob_gradient(example)
        return keep_view(g, base_view(g.layout)) if view == "base" else g

    def dpo(self, image):
        from encoder_probe.mllm import loss_gradient
        return loss_gradient(self.mllm, image, RECORD, "dpo")

    def naive(self, example):
        from encoder_probe.encoders.multiview import AnyresViews
        model = self.model
        inputs = {k: v.to(self.device or "cpu") for k, v in example.inputs.items()}
        captured = {}

        def hook(module, args, output):
            output.retain_grad()
            captured["a"] = output

        handle = model.model.multi_modal_projector.register_forward_hook(hook)
        labels = inputs["input_ids"].clone()
        labels[:, :example.answer_start] = -100
        try:
            loss = model(**inputs, labels=labels, use_cache=False).loss
        finally:
            handle.remove()
        (-loss * example.answer_tokens).backward()
        size = tuple(int(s) for s in inputs["image_sizes"][0])
        grad = AnyresViews(model.config, max_tiles=9).split(captured["a"].grad, size)
        model.zero_grad(set_to_none=True)
        captured.clear()
        del loss
        return grad.cpu()

    def run(self, mode: str, image, example):
        if mode == "naive":
            return self.naive(example)
        if mode == "dpo":
            return self.dpo(image)
        return self.ours(example, "base" if mode == "ours_base" else "full")


# -- peak memory: one process per configuration ----------------------------------------------------------
def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def child(mode: str, path: str, name: str, device) -> None:
    import gc

    import torch

    from encoder_probe.assets import photo
    runner = Runner(Path(path), device, naive=mode == "naive", ours=mode != "naive")
    image = photo(name)
    example = runner.example(image, RECORD["chosen"])
    runner.run(mode, image, example)  # warm-up: lazy initialisation is not the map's memory
    gc.collect()
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status_mb("VmRSS")
    runner.run(mode, image, example)
    if cuda:
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak = _status_mb("VmHWM") - before
    print(json.dumps({"mode": mode, "photo": name, "peak_mb": peak, "resident_before_mb":
                      before / 2**20 if cuda else before}))


def peak_memory(mode: str, path: Path, name: str, device) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    cmd = [sys.executable, __file__, "--child", mode, str(path), name] + (["--device", device] if device else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{mode} {name}: child failed\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- time: paired rounds in one process ------------------------------------------------------------------
def timings(runner: Runner, rounds: int) -> dict:
    import torch

    from encoder_probe.assets import photo
    out = {}
    for name in PHOTOS:
        image = photo(name)
        example = runner.example(image, RECORD["chosen"])
        ours, naive = runner.ours(example, "full"), runner.naive(example)  # warm-up, and the same map
        scale = float(naive.abs().max())
        assert torch.allclose(ours.grad, naive, rtol=1e-4, atol=1e-6 * scale), "the two maps differ"
        seconds = {mode: [] for mode in MODES}
        for k in range(rounds):
            for mode in MODES[k % len(MODES):] + MODES[:k % len(MODES)]:  # rotated: no mode always follows naive
                _sync(runner.device)
                start = time.perf_counter()
                runner.run(mode, image, example)
                _sync(runner.device)
                seconds[mode].append(time.perf_counter() - start)
        out[name] = {"lm_positions": example.layout.lm_tokens, "views": example.inputs["pixel_values"].shape[1],
                     "sequence": example.inputs["input_ids"].shape[1],
                     "max_abs_diff": float((ours.grad - naive).abs().max()),
                     **{mode: statistics.median(v) for mode, v in seconds.items()},
                     "ratio": statistics.median(n / o for n, o in zip(seconds["naive"], seconds["ours_full"])),
                     "ratio_range": (min(n / o for n, o in zip(seconds["naive"], seconds["ours_full"])),
                                     max(n / o for n, o in zip(seconds["naive"], seconds["ours_full"])))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256, help="LM width (heads of 64)")
    parser.add_argument("--layers", type=int, default=4, help="LM blocks")
    parser.add_argument("--vocab", type=int, default=512, help="LM embedding rows (toy tokenizer: 512; Qwen2: 151936)")
    parser.add_argument("--rounds", type=int, default=3, help="paired timing rounds; medians are reported")
    parser.add_argument("--device", default=None, help="cuda to run both paths on a GPU")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dir", default=None,
                        help="checkpoint dir (default .cache/bench-mllm-<hidden>x<layers>-v<vocab>)")
    parser.add_argument("--no-memory", action="store_true", help="time only")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "PATH", "PHOTO"))
    args = parser.parse_args()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(*args.child, args.device)
    from encoder_probe.toy import _quiet
    _quiet()
    path = build(Path(args.dir or f".cache/bench-mllm-{args.hidden}x{args.layers}-v{args.vocab}"), args.hidden,
                 args.layers, args.vocab)
    runner = Runner(path, args.device)
    lm = sum(p.numel() for p in runner.mllm.language_model.parameters()) / 1e6
    tower = sum(p.numel() for p in runner.mllm.model.model.vision_tower.parameters()) / 1e6
    times = timings(runner, args.rounds)
    del runner
    memory = {} if args.no_memory else {(m, n): peak_memory(m, path, n, args.device)["peak_mb"]
                                        for n in PHOTOS for m in MODES}
    where = args.device or f"cpu, {torch.get_num_threads()} threads"
    print(f"LLaVA-OneVision, published vision geometry; LM Qwen2 {args.layers} x {args.hidden} ({lm:.1f}M parameters, "
          f"vocab {args.vocab}), tower {tower:.2f}M; {where}; median of {args.rounds} paired rounds")
    print("| photo | LM positions (views) | ours full s | ours base s | naive s | speed-up naive / ours | range |"
          " DPO s | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, t in times.items():
        print(f"| {name} | {t['lm_positions']} ({t['views']}) | {t['ours_full']:.3f} | {t['ours_base']:.3f} | "
              f"{t['naive']:.3f} | **{t['ratio']:.2f}x** | {t['ratio_range'][0]:.2f}-{t['ratio_range'][1]:.2f}x | "
              f"{t['dpo']:.3f} | {t['max_abs_diff']:.1e} |")
    if memory:
        unit = "CUDA max_memory_allocated" if args.device and "cuda" in args.device else "peak RSS"
        print(f"\n| photo | ours full MiB | ours base MiB | naive MiB | naive / ours | DPO MiB | DPO / log-lik |"
              f" ({unit} above the call's start)")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name in PHOTOS:
            full, base, naive, dpo = (memory[(m, name)] for m in MODES)
            print(f"| {name} | {full:.0f} | {base:.0f} | {naive:.0f} | {naive / full:.2f}x | {dpo:.0f} | "
                  f"**{dpo / full:.2f}x** |")


if __name__ == "__main__":
    main()
