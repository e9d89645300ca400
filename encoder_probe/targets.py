"""What a gradient map explains: a class logit or an image-text similarity of the tower's tokens.

(An MLLM's own loss is attributed by :func:`encoder_probe.mllm.loss_gradient`, one conversation at a
time, through the model's own forward.)

Each target names the tokens it attributes (``tokens(pixels) -> Tokens``) and a per-image score
of them (``score(tokens, rows) -> (B,)``; ``rows`` selects the class / text / record of every
image). Targets whose score reads only those tokens compute them without an autograd graph, so
the backward pass of a map costs the head (or the LM), not the tower.

View ``full`` (MLLM encoders with several views): ``pixels`` is a list of
``encoder.transform(image)``, ``tokens`` returns one Tokens per image (batch 1, with a layout) and
``score`` is called per image on its Tokens (:func:`encoder_probe.attribution.sequence_gradients`).
"""
from __future__ import annotations

import numpy as np
import torch

from .encoders.base import Tokens
from .errors import SpecError


class HeadTarget:
    """Class logit of a linear head on the pooled tokens of the encoder's layer.

    ``logits = ((pool(tokens) - mean) / std) @ weight.T + bias``: the linear probe's head with its
    feature standardisation folded in (mean 0 / std 1 when the head reads raw features).
    """

    def __init__(self, encoder, weight, bias, *, pool: str = "mean", mean=None, std=None, layer=None,
                 class_names=None):
        self.encoder, self.pool, self.layer = encoder, pool, layer
        device = encoder.device
        self.weight = torch.as_tensor(np.asarray(weight, np.float32), device=device)
        self.bias = torch.as_tensor(np.asarray(bias, np.float32), device=device)
        d = self.weight.shape[1]
        self.mean = torch.as_tensor(np.zeros(d, np.float32) if mean is None else np.asarray(mean, np.float32),
                                    device=device)
        self.std = torch.as_tensor(np.ones(d, np.float32) if std is None else np.asarray(std, np.float32),
                                   device=device)
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(len(self.bias))]

    def tokens(self, pixels) -> Tokens:
        with torch.no_grad():
            return self.encoder.forward_tokens(pixels, self.layer)

    def logits(self, tokens: Tokens | list[Tokens]) -> torch.Tensor:
        """(B, classes); view full: a list with one Tokens per image, each pooled over its whole
        token sequence (every view), as the cached ``pooled`` features the head was fitted on."""
        if isinstance(tokens, (list, tuple)):
            return torch.cat([self.logits(t) for t in tokens])
        z = self.encoder.pool(tokens, self.pool).float()
        return ((z - self.mean) / self.std) @ self.weight.T + self.bias

    def score(self, tokens: Tokens, rows) -> torch.Tensor:
        rows = torch.as_tensor(rows, device=self.weight.device).long()
        return self.logits(tokens).gather(1, rows[:, None])[:, 0]

    def predict(self, pixels) -> torch.Tensor:
        with torch.no_grad():
            return self.logits(self.tokens(pixels)).argmax(1)


def own_classifier(encoder) -> tuple[HeadTarget, dict]:
    """The model's own classifier (timm ``get_classifier()``, torchvision ``classifier``/``fc``) on its pooled
    final tokens: Grad-CAM of a pretrained model's own prediction."""
    module = encoder.module
    linear = module.get_classifier() if hasattr(module, "get_classifier") else \
        getattr(module, "classifier", None) or getattr(module, "fc", None)
    if isinstance(linear, torch.nn.Sequential):
        linear = next((m for m in reversed(linear) if isinstance(m, torch.nn.Linear)), None)
    if not isinstance(linear, torch.nn.Linear) or encoder.layer != "final":
        raise SpecError(f"{encoder.spec}: classifier 'model' needs a model with its own linear classifier "
                        f"read at layer 'final' (got {type(linear).__name__} at layer {encoder.layer})")
    bias = linear.bias.detach() if linear.bias is not None else torch.zeros(linear.out_features)
    head = HeadTarget(encoder, linear.weight.detach().float().cpu(), bias.float().cpu(), pool="head")
    return head, {"classifier": "the model's own", "classes": linear.out_features}


class TextTarget:
    """Cosine similarity of the tower's own image embedding (pool "head", final tokens) with a text.

    Towers whose embedding reads only the CLS token (CLIP) give their final patch tokens no
    gradient; :func:`text_embeddings` works for open_clip and HF CLIP / SigLIP dual-tower dirs.
    """

    def __init__(self, encoder, texts: list[str]):
        self.encoder, self.texts = encoder, list(texts)
        self.text = torch.nn.functional.normalize(text_embeddings(encoder, self.texts).float(), dim=-1)

    def tokens(self, pixels) -> Tokens:
        with torch.no_grad():
            return self.encoder.forward_tokens(pixels, "final")

    def score(self, tokens: Tokens, rows) -> torch.Tensor:
        image = torch.nn.functional.normalize(self.encoder.pool(tokens, "head").float(), dim=-1)
        rows = torch.as_tensor(rows, device=image.device).long()
        return (image * self.text[rows]).sum(-1)


def has_text_tower(encoder) -> bool:
    """open_clip towers keep their text half; an `hf:` dir has one when its config is dual-tower."""
    if getattr(encoder, "clip_model", None) is not None:
        return True
    return encoder.source == "hf" and _hf_dual_dir(encoder) is not None


def _hf_dual_dir(encoder):
    from .encoders.hf_tower import DUAL_TOWER
    from .encoders.sources import read_config
    directory = encoder.spec.path
    if directory is None:
        return None
    try:
        return directory if read_config(directory).get("model_type") in DUAL_TOWER else None
    except Exception:
        return None


def text_embeddings(encoder, texts: list[str]) -> torch.Tensor:
    """(T, D) text embeddings in the space of ``encoder.pool(tokens, "head")``, without gradients."""
    with torch.no_grad():
        if getattr(encoder, "clip_model", None) is not None:
            import open_clip
            arch = encoder.spec.target
            try:
                tokenizer = open_clip.get_tokenizer(arch)
            except Exception as e:  # an HF tokenizer that is not on disk
                raise SpecError(f"{encoder.spec}: open_clip tokenizer for {arch} is not available offline "
                                f"({type(e).__name__})") from None
            model = encoder.clip_model
            return model.encode_text(tokenizer(texts).to(encoder.device))
        directory = _hf_dual_dir(encoder)
        if directory is None:
            raise SpecError(f"{encoder.spec}: has no text tower (target 'text' needs open_clip or an HF "
                            "CLIP/SigLIP dual-tower dir)")
        from transformers import AutoModel, AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception:
            raise SpecError(f"{directory}: no tokenizer files, so the text tower cannot embed text "
                            "(save the processor/tokenizer with the model)") from None
        model = AutoModel.from_pretrained(directory, local_files_only=True).to(encoder.device).eval()
        padding = "max_length" if model.config.model_type.startswith("siglip") else True
        batch = tokenizer(texts, padding=padding, truncation=True, return_tensors="pt").to(encoder.device)
        out = model.get_text_features(**batch)
        return out if isinstance(out, torch.Tensor) else out.pooler_output
