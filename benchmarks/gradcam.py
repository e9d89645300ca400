"""Grad-CAM images/s: encoder-probe's token-grid Grad-CAM against pytorch-grad-cam's GradCAM.

Same model, same images, same targets (the model's own class logit, one class per image), same
layer (the final tokens after the last norm, prefix tokens dropped), same output: both produce
min-max normalised maps at the input resolution (ours adds the upsampling and normalisation to
its raw maps inside the timed loop). Both are batched. pytorch-grad-cam runs the tower with an
autograd graph and back-propagates through all of it (parameter gradients included); ours runs
the tower without a graph and back-propagates only from the score to the attributed tokens.
The two maps are checked equal before timing. Timing: paired rounds (ours, then the peer), the
median images/s of each and the median and range of the per-round ratio.

    .venv/bin/python benchmarks/gradcam.py      # --models timm:vit_wee_patch16_reg1_gap_256,timm:test_vit3
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _reshape_for(model, grid):
    def reshape(a):  # pytorch-grad-cam's ViT recipe, with this model's prefix count and grid
        return a[:, model.num_prefix_tokens:].reshape(a.shape[0], *grid, -1).permute(0, 3, 1, 2)
    return reshape


def _sync(device):
    import torch
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run(spec: str, n: int, batch: int, repeats: int, device=None) -> dict:
    import numpy as np
    import torch
    from pytorch_grad_cam import GradCAM as PGCGradCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from encoder_probe import load_encoder
    from encoder_probe.attribution import GradCAM, minmax
    from encoder_probe.localization import upsample
    from encoder_probe.targets import HeadTarget

    encoder = load_encoder(spec, device=device)
    model = encoder.module
    h, w = encoder.preprocess.size
    target = HeadTarget(encoder, model.head.weight.detach(), model.head.bias.detach(), pool="head")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, h, w, generator=g).to(encoder.device)
    classes = torch.randint(0, model.head.out_features, (n,), generator=g).tolist()
    with torch.no_grad():
        grid = encoder.forward_tokens(images[:1]).grid
    batches = [(images[i:i + batch], classes[i:i + batch]) for i in range(0, n, batch)]

    def ours():
        return [minmax(upsample(GradCAM(target).attribute(x, c), (h, w))).cpu().numpy() for x, c in batches]

    cam = PGCGradCAM(model=model, target_layers=[model.norm], reshape_transform=_reshape_for(model, grid))

    def peer():
        return [cam(input_tensor=x, targets=[ClassifierOutputTarget(k) for k in c]) for x, c in batches]

    # the same maps (pytorch-grad-cam normalises, resizes with cv2, normalises again)
    x, c = batches[0]
    raw = GradCAM(target).attribute(x, c).cpu().numpy()
    assert np.allclose(scale_cam_image(scale_cam_image(raw, (w, h))), peer()[0], atol=1e-4)
    def timed(fn):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start

    ours(), peer()  # warm-up
    # paired rounds (ours, then the peer, back to back): other jobs on the box slow both alike
    rounds = [(timed(ours), timed(peer)) for _ in range(repeats)]
    t_ours, t_peer = (float(np.median([r[i] for r in rounds])) for i in (0, 1))
    ratios = sorted(p / o for o, p in rounds)
    cam.activations_and_grads.release()
    return {"model": spec, "grid": f"{grid[0]}x{grid[1]} + {model.num_prefix_tokens} prefix",
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "ours": n / t_ours,
            "peer": n / t_peer, "ratio": float(np.median(ratios)), "range": (ratios[0], ratios[-1])}


def main():
    import torch
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="timm:vit_wee_patch16_reg1_gap_256,timm:test_vit3")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5, help="paired rounds; the median is reported")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None, help="cuda to time on a GPU (both run there)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [run(spec, args.n, args.batch, args.repeats, args.device) for spec in args.models.split(",")]
    print(f"threads {torch.get_num_threads()}, {args.n} images, batch {args.batch}, median of {args.repeats} "
          "paired rounds")
    print("| model | grid | params | ours images/s | pytorch-grad-cam images/s | ratio (median) | ratio range |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['grid']} | {r['params_M']:.1f}M | {r['ours']:.1f} | {r['peer']:.1f} | "
              f"{r['ratio']:.1f}x | {r['range'][0]:.1f}-{r['range'][1]:.1f}x |")


if __name__ == "__main__":
    main()
