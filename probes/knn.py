"""`knn`: cosine k-NN with temperature-weighted votes (DINO's protocol) on frozen pooled features.

Each val image takes its k most cosine-similar train images; neighbour j votes for its class
with weight exp(sim_j / T). Classes are ranked by summed votes (ties: lower class index first):
top-1 and top-5 for every k. Computed in the features' dtype.

A top-t metric is reported only when the data has more than t classes: top-5 of five classes or
fewer is 1.0 by construction, so it is left out (and named in ``undefined_metrics``), the rule the
linear probe applies too.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from encoder_probe.errors import SpecError
from encoder_probe.probe import config_from, config_hash, labelled_arrays, summarize


@dataclass
class KNNConfig:
    ks: list = field(default_factory=lambda: [10, 20])
    temperature: float = 0.07
    pool: str = "mean"
    per_class: int | None = None
    batch_size: int = 64
    chunk: int = 1024  # val rows per similarity block: memory is chunk x n_train
    device: str | None = None


def knn_votes(train: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, k: int, temperature: float,
              n_classes: int) -> torch.Tensor:
    """(Q, n_classes) summed vote weights; ``train`` and ``query`` are L2-normalised rows."""
    sims, idx = (query @ train.T).topk(min(k, len(train)), dim=1)
    votes = torch.zeros(len(query), n_classes, dtype=sims.dtype, device=sims.device)
    return votes.scatter_add_(1, labels[idx], (sims / temperature).exp())


def knn_accuracy(x, y, xv, yv, *, ks, temperature, n_classes, chunk=1024, device=None) -> dict:
    """{k: {"top1", "top5"}} over all val rows."""
    device = torch.device(device or "cpu")
    train = torch.nn.functional.normalize(torch.as_tensor(x, device=device), dim=1)
    labels = torch.as_tensor(np.array(y, dtype=np.int64), device=device)
    hits = {k: [0, 0] for k in ks}
    for start in range(0, len(xv), chunk):
        query = torch.nn.functional.normalize(torch.as_tensor(xv[start:start + chunk], device=device), dim=1)
        truth = torch.as_tensor(yv[start:start + chunk], device=device)[:, None]
        for k in ks:
            votes = knn_votes(train, labels, query, k, temperature, n_classes)
            ranked = torch.sort(votes, dim=1, descending=True, stable=True).indices  # ties: lower class first
            hits[k][0] += int((ranked[:, :1] == truth).any(1).sum())
            hits[k][1] += int((ranked[:, :5] == truth).any(1).sum())
    return {k: {"top1": h1 / len(xv), "top5": h5 / len(xv)} for k, (h1, h5) in hits.items()}


class KNNProbe:
    name = "knn"
    needs = ("labels",)

    def run(self, encoder, data, options=None, context=None) -> dict:
        start = time.perf_counter()
        config = config_from(KNNConfig, options)
        if not config.ks or min(config.ks) < 1 or config.temperature <= 0 or config.chunk < 1:
            raise SpecError(f"knn probe: need ks >= 1, temperature > 0 and chunk >= 1, got {config.ks}, "
                            f"{config.temperature}, {config.chunk}")
        x, y, xv, yv, train = labelled_arrays(encoder, data, config, context or {})
        scores = knn_accuracy(x, y, xv, yv, ks=config.ks, temperature=config.temperature,
                              n_classes=train.meta["data"]["num_classes"], chunk=config.chunk, device=config.device)
        used = {**asdict(config), "layers": train.layers, **_view(encoder)}
        n_classes = train.meta["data"]["num_classes"]
        metrics = {f"top{t}@k={k}": summarize([s[f"top{t}"]]) for k, s in scores.items() for t in (1, 5)
                   if n_classes > t}
        undefined = {f"top{t}@k={k}": f"top-{t} of {n_classes} classes is 1.0 by construction"
                     for k in scores for t in (1, 5) if n_classes <= t}
        result = {"metrics": metrics, "view": getattr(encoder, "view", "base"),
                  "data": {"train": len(y), "val": len(yv), "classes": n_classes},
                  "config": used, "config_hash": config_hash(used), "wall_s": round(time.perf_counter() - start, 3)}
        if undefined:
            result["undefined_metrics"] = undefined
        return result


def _view(encoder) -> dict:
    """The encoder view in the probe config when it is not the default (base configs keep their hash);
    view full pools over the whole token sequence of each image (base view and tiles alike)."""
    view = getattr(encoder, "view", "base")
    return {} if view == "base" else {"view": view}
