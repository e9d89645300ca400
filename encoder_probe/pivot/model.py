"""The MLLM the PIVOT trainer refines: a VisionEncoder (trainable) + mlp2x_gelu projector + causal LM.

The sequence the LM reads is ``[image tokens] [question] [sep] [answer] [eos]``, right-padded.
Only answer and eos positions carry loss or log-prob; image and prompt positions are masked,
as in LLaVA. The vision tower is any loader's VisionEncoder, so a refined tower is read back
by the same adapter that produced it (no second token-layout implementation).

Checkpoint directory (``save_mllm``): ``config.json`` (key ``pivot_mllm``: how to rebuild the
tower, the LM config, the tokenizer kind), ``model.safetensors`` (``vision.*``, ``projector.*``,
``lm.*``) and the tokenizer. ``config.json`` is written last, so a directory that has one is whole.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from ..cache import atomic_write_json
from ..encoders import VisionEncoder, load_encoder
from ..encoders.checkpoint import CheckpointReader, load_into
from ..encoders.llava import build_projector
from ..encoders.registry import parse_dtype, read_config
from ..errors import CheckpointError
from .tokenizer import HFTokenizer, WordTokenizer, load_tokenizer

CONFIG_KEY = "pivot_mllm"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
PROJECTOR_TYPE = "mlp2x_gelu"
TINY_ENCODER = "timm:test_vit"  # 160 px, 10x10 grid of 64-d tokens, 6 blocks: trains on a CPU
TINY_LM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512)


class MLLM(nn.Module):
    """VisionEncoder + projector + causal LM, with the two quantities every stage needs:
    summed answer log-probs (DPO) and mean answer cross-entropy (SFT)."""

    def __init__(self, encoder: VisionEncoder, projector: nn.Module, lm: nn.Module, tokenizer, *,
                 vision: dict):
        super().__init__()
        self.encoder = encoder
        self.vision = encoder.module  # registered here so .to(), .train() and state_dict see the tower
        self.projector = projector
        self.lm = lm
        self.tokenizer = tokenizer
        self.vision_spec = dict(vision)  # {"spec", "layer", "options"}: how to rebuild the tower

    @cached_property
    def grid(self) -> tuple[int, int]:
        return _probe_tokens(self.encoder).grid

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, h*w, d_lm): the projector output, row-major over ``grid``."""
        return self.projector(self.encoder.forward_tokens(pixels).patches)

    # -- sequences --------------------------------------------------------------------------------
    def _sequences(self, image_tokens, questions, answers):
        tok = self.tokenizer
        prompts = [tok.encode(q) + tok.sep_ids for q in questions]
        targets = [tok.encode(a) + [tok.eos_id] for a in answers]
        b, n = image_tokens.shape[:2]
        t = max(len(p) + len(a) for p, a in zip(prompts, targets))
        ids = torch.full((b, t), tok.pad_id, dtype=torch.long)
        answer = torch.zeros(b, t, dtype=torch.bool)
        text_mask = torch.zeros(b, t, dtype=torch.long)
        for i, (p, a) in enumerate(zip(prompts, targets)):
            ids[i, :len(p) + len(a)] = torch.tensor(p + a)
            answer[i, len(p):len(p) + len(a)] = True
            text_mask[i, :len(p) + len(a)] = 1
        device = image_tokens.device
        ids, answer, text_mask = ids.to(device), answer.to(device), text_mask.to(device)
        text = self.lm.get_input_embeddings()(ids)
        embeds = torch.cat([image_tokens.to(text.dtype), text], dim=1)
        attention = torch.cat([torch.ones(b, n, dtype=torch.long, device=device), text_mask], dim=1)
        return embeds, attention, ids, answer

    def answer_logprobs(self, image_tokens, questions, answers) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log p of each answer's tokens incl. eos, number of those tokens), both (B,)."""
        if not (len(questions) == len(answers) == image_tokens.shape[0]):
            raise ValueError(f"{image_tokens.shape[0]} images, {len(questions)} questions, {len(answers)} answers")
        embeds, attention, ids, answer = self._sequences(image_tokens, questions, answers)
        t = ids.shape[1]
        # the token at text position j is predicted by the logits one position earlier
        logits = self.lm(inputs_embeds=embeds, attention_mask=attention, use_cache=False,
                         logits_to_keep=t + 1).logits[:, :-1]
        logp = logits.float().log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        return (logp * answer).sum(1), answer.sum(1)

    def response_logprob(self, image_tokens, questions: list[str], answers: list[str]) -> torch.Tensor:
        """(B,) summed log p(answer tokens | image, question)."""
        return self.answer_logprobs(image_tokens, questions, answers)[0]

    def sft_loss(self, image_tokens, questions: list[str], answers: list[str]) -> torch.Tensor:
        """Mean cross-entropy over all answer tokens of the batch (HF's causal-LM loss with masked prompts)."""
        logp, count = self.answer_logprobs(image_tokens, questions, answers)
        return -logp.sum() / count.sum()

    def gradient_map(self, pixels, questions, answers) -> torch.Tensor:
        """(B, h, w) PIVOT map: per-token L1 norm over channels of d(answer NLL) / d(image tokens)."""
        tokens = self.image_tokens(pixels).detach().requires_grad_(True)
        (-self.response_logprob(tokens, questions, answers).sum()).backward(inputs=[tokens])
        return tokens.grad.abs().sum(-1).reshape(-1, *self.grid)

    # -- the probe interface (encoder_probe.mllm): one conversation at a time ---------------------------
    def example(self, image, question: str, answer: str) -> "TrainerExample":
        """(image, question, answer) as this trainer's sequence reads it, with the base view's layout."""
        if not isinstance(question, str) or not isinstance(answer, str) or not answer:
            raise ValueError("an example needs a question and a non-empty answer (strings)")
        image = image.convert("RGB") if image.mode != "RGB" else image
        pixels = self.encoder.transform(image)[None]
        layout = self.encoder.base_layout((image.height, image.width), self.grid)
        return TrainerExample(pixels, question, answer, layout, len(self.tokenizer.encode(answer)) + 1)

    def answer_logprob(self, example: "TrainerExample") -> float:
        with torch.no_grad():
            tokens = self.image_tokens(example.pixels.to(self.encoder.device, self.encoder.dtype))
            return float(self.response_logprob(tokens, [example.question], [example.answer])[0])

    def logprob_gradient(self, example: "TrainerExample"):
        """Summed answer log-likelihood and its gradient at the projector output (the LM's image tokens)."""
        from ..mllm.model import VisualGradient
        with torch.no_grad():
            tokens = self.image_tokens(example.pixels.to(self.encoder.device, self.encoder.dtype))
        tokens = tokens.detach().requires_grad_()
        with torch.enable_grad():
            logp = self.response_logprob(tokens, [example.question], [example.answer])[0]
            (grad,) = torch.autograd.grad(logp, tokens)
        return VisualGradient(float(logp.detach()), tokens.detach()[0].float().cpu(), grad[0].float().cpu(),
                              example.layout)

    def describe(self, image=None) -> dict:
        """`probe inspect --mllm` of a trainer checkpoint: the same keys as encoder_probe.mllm.MLLM's."""
        from ..mllm.model import example_counts
        cfg = self.lm.config
        out = {"family": "pivot-trainer", "model": type(self).__name__, "processor": f"the tower's own ({self.encoder.spec})",
               "lm": f"{type(self.lm).__name__}, {sum(p.numel() for p in self.lm.parameters()) / 1e6:.2f}M parameters, "
                     f"{cfg.num_hidden_layers} layers x {cfg.hidden_size}",
               "chat_template": "none: the trainer's sequence [image tokens] [question] [sep] [answer] [eos]",
               "image_token": "none (the image tokens come first)"}
        if image is not None:
            out["example"] = example_counts(self, image)
        return out

    # -- freezing -----------------------------------------------------------------------------------
    def set_trainable(self, *, vision: bool, projector: bool, lm: bool) -> "MLLM":
        for module, flag in ((self.vision, vision), (self.projector, projector), (self.lm, lm)):
            module.requires_grad_(flag)
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass (LM and, where the tower supports it, the tower)."""
        self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(self.vision, "set_grad_checkpointing"):  # timm
            self.vision.set_grad_checkpointing(True)
        elif getattr(self.vision, "supports_gradient_checkpointing", False):  # transformers
            self.vision.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@dataclass
class TrainerExample:
    pixels: torch.Tensor  # (1, 3, H, W): the tower's own preprocessing
    question: str
    answer: str
    layout: object  # TokenLayout of the base view on the original image
    answer_tokens: int  # answer tokens + eos: what the SFT mean runs over


# -- building ---------------------------------------------------------------------------------------
def _probe_tokens(encoder: VisionEncoder):
    h, w = encoder.preprocess.size
    with torch.no_grad():
        return encoder.forward_tokens(torch.zeros(1, 3, h, w))


def _absolute(spec: str) -> str:
    """Local paths in a spec (a dir, SOURCE:DIR, SOURCE:NAME@FILE) made absolute, so a checkpoint
    that records the spec still finds its tower from any working directory."""
    def resolved(part: str) -> str:
        path = Path(part).expanduser()
        return str(path.resolve()) if part and path.exists() else part
    head, sep, rest = spec.partition(":")
    if not sep or "/" in head or Path(spec).expanduser().exists():
        return resolved(spec)
    target, at, weights = rest.partition("@")
    return f"{head}:{resolved(target)}" + (f"@{resolved(weights)}" if at else "")


def _vision_info(spec: str, layer, options: dict) -> dict:
    options = {k: _absolute(v) if k == "vision_config" and isinstance(v, str) else v for k, v in options.items()}
    return {"spec": _absolute(spec), "layer": layer, "options": options}


def _load_tower(vision: dict) -> VisionEncoder:
    encoder = load_encoder(vision["spec"], layer=vision.get("layer"), **vision.get("options", {}))
    return encoder


def build_mllm(encoder: str = TINY_ENCODER, *, lm: str | None = None, texts=None, seed: int = 0,
               layer=None, lm_config: dict | None = None, **encoder_options) -> MLLM:
    """A fresh MLLM: the tower ``encoder`` (any spec), a new projector, and either the local HF
    causal LM dir ``lm`` with its tokenizer or a tiny random Qwen2 with a word tokenizer built
    from ``texts``. Seeded: the same arguments give the same weights."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM
    from ..toy import _quiet
    _quiet()
    vision = _vision_info(encoder, layer, encoder_options)
    tower = _load_tower(vision)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if lm is not None:
            try:
                language = AutoModelForCausalLM.from_pretrained(lm, local_files_only=True)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{lm}: not a local causal-LM dir ({' '.join(str(e).split())[:160]})") from None
            tokenizer = HFTokenizer.from_dir(lm)
            if len(tokenizer) > language.get_input_embeddings().num_embeddings:
                raise CheckpointError(f"{lm}: the tokenizer has {len(tokenizer)} tokens but the LM embeds only "
                                      f"{language.get_input_embeddings().num_embeddings}")
        else:
            if not texts:
                raise ValueError("a tiny LM needs texts to build its word vocabulary")
            tokenizer = WordTokenizer.from_texts(texts)
            cfg = {**TINY_LM, **(lm_config or {})}
            language = Qwen2ForCausalLM(Qwen2Config(**cfg, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_id,
                                                    eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.eos_id))
        d_vision = _probe_tokens(tower).patches.shape[-1]
        projector = build_projector(PROJECTOR_TYPE, d_vision, language.config.hidden_size)
    return MLLM(tower, projector, language, tokenizer, vision=vision).eval()


def tiny_mllm(texts: list[str], encoder: str = TINY_ENCODER, seed: int = 0, **options) -> MLLM:
    """A CPU-sized MLLM: ``encoder`` tower, tiny Qwen2 LM, word tokenizer from ``texts``."""
    return build_mllm(encoder, texts=texts, seed=seed, **options)


# -- checkpoints ------------------------------------------------------------------------------------
def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors written beside the target and renamed over it (shared storage is copied)."""
    from safetensors.torch import save_file

    from ..cache import atomic_path
    seen, out = set(), {}
    for k, v in tensors.items():
        v = v.detach().to("cpu")
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset())
        out[k] = v.clone().contiguous() if ptr in seen else v.contiguous()
        seen.add(ptr)
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata={"format": "pt"})


def save_mllm(mllm: MLLM, directory, extra: dict | None = None) -> Path:
    """Write weights, tokenizer and (last) config.json into ``directory``; each file atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _save_tensors(directory / WEIGHTS, mllm.state_dict())
    mllm.tokenizer.save(directory)
    config = {CONFIG_KEY: FORMAT_VERSION, "vision": mllm.vision_spec, "grid": list(mllm.grid),
              "projector_type": PROJECTOR_TYPE, "lm": mllm.lm.config.to_dict(), "tokenizer": mllm.tokenizer.kind,
              **(extra or {})}
    atomic_write_json(directory / "config.json", config)
    return directory


def is_mllm_checkpoint(path) -> bool:
    path = Path(path)
    try:
        return CONFIG_KEY in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def read_mllm_config(path) -> dict:
    config = read_config(Path(path))
    if CONFIG_KEY not in config:
        raise CheckpointError(f"{Path(path) / 'config.json'}: not a PIVOT trainer checkpoint (no {CONFIG_KEY!r})")
    if config[CONFIG_KEY] > FORMAT_VERSION:
        raise CheckpointError(f"{Path(path) / 'config.json'}: format {config[CONFIG_KEY]} is newer than this "
                              f"encoder-probe reads ({FORMAT_VERSION})")
    return config


def load_tower_weights(path, encoder: VisionEncoder, reader: CheckpointReader | None = None) -> None:
    """Load a checkpoint's ``vision.*`` weights into a tower rebuilt from its spec."""
    reader = reader or CheckpointReader(Path(path) / WEIGHTS)
    load_into(encoder.module, reader.load_prefix("vision."), source=Path(path) / WEIGHTS)


def load_projector(path, config: dict, reader: CheckpointReader) -> nn.Module:
    """The checkpoint's projector; its input size is read from its first layer's weights."""
    state = reader.load_prefix("projector.")
    if "0.weight" not in state:
        raise CheckpointError(f"{Path(path) / WEIGHTS}: no projector weights (projector.0.weight)")
    d_vision = state["0.weight"].shape[1]
    projector = build_projector(config.get("projector_type", PROJECTOR_TYPE), d_vision, config["lm"]["hidden_size"])
    load_into(projector, state, source=Path(path) / WEIGHTS)
    return projector


def load_mllm(path, device=None, dtype=None) -> MLLM:
    """An MLLM from the trainer's checkpoint directory (strict: every key must match)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from ..toy import _quiet
    _quiet()
    path = Path(path)
    config = read_mllm_config(path)
    reader = CheckpointReader(path / WEIGHTS)
    tower = _load_tower(config["vision"])
    load_tower_weights(path, tower, reader)
    projector = load_projector(path, config, reader)
    lm_config = dict(config["lm"])
    try:
        language = AutoModelForCausalLM.from_config(AutoConfig.for_model(lm_config.pop("model_type"), **lm_config))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: LM config transformers cannot build ({e})") from None
    state = reader.load_prefix("lm.")
    result = language.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path / WEIGHTS}: LM keys do not match its config (missing "
                              f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    mllm = MLLM(tower, projector, language, load_tokenizer(path, config.get("tokenizer", "word")),
                vision=config["vision"])
    return mllm.to(device=device, dtype=parse_dtype(dtype)).eval()
