"""`knn`: cosine k-NN with temperature-weighted votes (DINO's protocol) on frozen pooled features.

Each val image takes its k most cosine-similar train images; neighbour j votes for its class
with weight exp(sim_j / T). Classes are ranked by summed votes (ties: lower class index first):
top-1 and top-5 for every k, each val image's hit kept as a per-item outcome (the bootstrap CI
and paired comparisons resample them). Computed in the features' dtype.

A top-t metric is reported only when the data has more than t classes: top-5 of five classes or
fewer is 1.0 by construction, so it is left out (and named in ``undefined_metrics``), the rule the
linear probe applies too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from encoder_probe.features import POOLS
from encoder_probe.items import Items
from encoder_probe.probe import Metric, Needs, Probe, ProbeResult, protocol, runtime, topk_defined


@dataclass
class KNNConfig:
    ks: list[int] = protocol([10, 20], min=1, help="neighbours per val image")
    temperature: float = protocol(0.07, gt=0, help="vote weight exp(similarity / T)")
    pool: str = protocol("mean", choices=POOLS)
    per_class: int | None = protocol(None, min=1, help="K train/val images per class (default: all)")
    batch_size: int = runtime(64, min=1, help="extraction batch")
    chunk: int = runtime(1024, min=1, help="val rows per similarity block: memory is chunk x n_train")
    device: str | None = runtime(None, help="where the similarities run (default: the encoder's device)")

    def check(self):
        if not self.ks:
            raise ValueError("ks needs at least one k")


def knn_votes(train: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, k: int, temperature: float,
              n_classes: int) -> torch.Tensor:
    """(Q, n_classes) summed vote weights; ``train`` and ``query`` are L2-normalised rows."""
    sims, idx = (query @ train.T).topk(min(k, len(train)), dim=1)
    votes = torch.zeros(len(query), n_classes, dtype=sims.dtype, device=sims.device)
    return votes.scatter_add_(1, labels[idx], (sims / temperature).exp())


def knn_hits(x, y, xv, yv, *, ks, temperature, n_classes, chunk=1024, device=None) -> dict:
    """{k: {"top1": (n_val,) bool, "top5": (n_val,) bool}}: whether each val row's class is in the top t."""
    device = torch.device(device or "cpu")
    train = torch.nn.functional.normalize(torch.as_tensor(x, device=device), dim=1)
    labels = torch.as_tensor(np.array(y, dtype=np.int64), device=device)
    hits = {k: {"top1": [], "top5": []} for k in ks}
    for start in range(0, len(xv), chunk):
        query = torch.nn.functional.normalize(torch.as_tensor(xv[start:start + chunk], device=device), dim=1)
        truth = torch.as_tensor(np.array(yv[start:start + chunk]), device=device)[:, None]
        for k in ks:
            votes = knn_votes(train, labels, query, k, temperature, n_classes)
            ranked = torch.sort(votes, dim=1, descending=True, stable=True).indices  # ties: lower class first
            for t in (1, 5):
                hits[k][f"top{t}"].append((ranked[:, :t] == truth).any(1).cpu().numpy())
    return {k: {name: np.concatenate(parts) for name, parts in h.items()} for k, h in hits.items()}


def knn_accuracy(x, y, xv, yv, **options) -> dict:
    """{k: {"top1", "top5"}}: accuracies over all val rows."""
    return {k: {name: float(v.mean()) for name, v in h.items()} for k, h in knn_hits(x, y, xv, yv, **options).items()}


class KNNProbe(Probe):
    name = "knn"
    needs = Needs(data=("classification",))
    Config = KNNConfig

    def run(self, ctx, cfg: KNNConfig) -> ProbeResult:
        data = ctx.labelled(cfg)
        n_classes = data.num_classes
        hits = knn_hits(data.x, data.y, data.xv, data.yv, ks=cfg.ks, temperature=cfg.temperature,
                        n_classes=n_classes, chunk=cfg.chunk, device=ctx.device_for(cfg))
        metrics, columns, undefined = {}, {}, {}
        for k, h in hits.items():
            for t in (1, 5):
                name = f"top{t}@k={k}"
                if not topk_defined(n_classes, t):
                    undefined[name] = f"top-{t} of {n_classes} classes is 1.0 by construction"
                    continue
                columns[name] = h[f"top{t}"][None].astype(np.float64)
                metrics[name] = Metric(float(h[f"top{t}"].mean()), statistic={"name": "mean", "column": name})
        return ProbeResult(metrics=metrics, items=Items(data.val_ids, columns), undefined=undefined,
                           details={"layers": data.train.layers,
                                    "data": {"train": len(data.y), "val": len(data.yv), "classes": n_classes}})
