"""The whole MLLM as a probe target: the transformers model, its processor and its chat template.

``load_mllm(DIR)`` builds the checkpoint's own ``*ForConditionalGeneration`` (LLaVA, LLaVA-NeXT,
LLaVA-OneVision, Qwen2/2.5-VL, InternVL; a LLaVA-NeXT / PIVOT training dir is converted in memory)
and its processor. An :class:`Example` is one (image, question, answer) conversation tokenised
as the checkpoint does it: the chat template renders the user turn with the image and the
generation prompt, the answer is the rest of the rendered conversation (end-of-turn included),
tokenised on its own and appended (TRL's prompt / completion split).

Gradients are taken at the visual tokens entering the LM (``A``: the projector's output after the
model's own unpad / anyres_max shrink, newline vectors in place), through the model's own forward:
a pre-hook on the language model swaps its ``inputs_embeds`` for a leaf, every parameter is
frozen, so the tower and projector run without an autograd graph and the backward runs through
the LM's activations only, with no parameter gradients.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch

from ..encoders.views import TokenLayout
from ..errors import CheckpointError, SpecError

FAMILIES = {  # config.json model_type -> the transformers class that runs it
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
}
# the image placeholder each family's chat template writes for an image content part
IMAGE_PLACEHOLDERS = {"llava": "<image>\n", "llava_next": "<image>\n", "llava_onevision": "<image>\n",
                      "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
                      "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>", "internvl": "<IMG_CONTEXT>\n"}
# Qwen2's ChatML (what LLaVA-OneVision, Qwen2-VL and InternVL3 use), for checkpoints saved without a template
CHATML = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
          "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
          "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
          "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}IMAGE"
          "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chatml_template(family: str) -> str:
    return CHATML.replace("IMAGE", IMAGE_PLACEHOLDERS[family])


@dataclass
class Example:
    """One conversation as the checkpoint tokenises it (batch 1)."""

    inputs: dict  # the processor's tensors for prompt + answer: input_ids, attention_mask, pixel_values, ...
    answer_start: int  # input_ids[answer_start:] are the answer's tokens (end of turn included)
    image_positions: torch.Tensor  # (lm_tokens,) where the image's tokens sit in input_ids
    layout: TokenLayout  # the visual tokens the LM reads, on the original image (newlines in layout order)
    question: str
    answer: str

    @property
    def answer_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[1] - self.answer_start)


@dataclass
class VisualGradient:
    """A scalar of one conversation and its gradient at the visual tokens the LM reads.

    ``act`` / ``grad``: (N, D) float32 over the visual tokens in layout order (newline vectors
    left out: they have no place on the image; their gradient is ``newline_grad``).
    """

    value: float
    act: torch.Tensor
    grad: torch.Tensor
    layout: TokenLayout
    newline_grad: torch.Tensor | None = None

    def scaled(self, factor: float, value: float | None = None) -> "VisualGradient":
        nl = None if self.newline_grad is None else self.newline_grad * factor
        return VisualGradient(self.value if value is None else value, self.act, self.grad * factor, self.layout, nl)


class MLLM:
    """A transformers MLLM with its processor: conversations, answer log-likelihoods, gradients at A."""

    def __init__(self, model, processor, *, family: str, path: Path, template_from: str, details: dict | None = None):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.family = family
        self.path = Path(path)
        self.template_from = template_from  # "checkpoint" or the fallback used
        self.details = dict(details or {})
        self.config = model.config
        self.image_token_id = int(self.config.image_token_id)

    # -- what the LM reads ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    def conversation(self, question: str, answer: str | None = None) -> str:
        """The chat template's text: the user turn (image, question) and the generation prompt, or
        the whole conversation with the assistant's ``answer``."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if answer is None:
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return self.processor.apply_chat_template(messages, tokenize=False)

    def example(self, image, question: str, answer: str) -> Example:
        """(image, question, answer) tokenised as the checkpoint does, with the image's token layout."""
        if not isinstance(question, str) or not isinstance(answer, str) or not answer:
            raise ValueError("an example needs a question and a non-empty answer (strings)")
        image = image.convert("RGB") if image.mode != "RGB" else image
        prompt = self.conversation(question)
        full = self.conversation(question, answer)
        if not full.startswith(prompt):
            raise CheckpointError(f"{self.path}: the chat template renders the prompt differently once an answer "
                                  "follows, so the answer's tokens cannot be told apart")
        try:
            inputs = self.processor(text=[prompt], images=[image], return_tensors="pt")
        except ValueError as e:  # the processor's own refusals (an image-token string in the question, ...)
            raise ValueError(f"{type(self.processor).__name__} refuses the conversation "
                             f"({' '.join(str(e).split())[:200]})") from None
        answer_ids = self.tokenizer(full[len(prompt):], add_special_tokens=False, return_tensors="pt")["input_ids"]
        start = inputs["input_ids"].shape[1]
        for key, value in list(inputs.items()):  # per-token side inputs (mm_token_type_ids): the answer is text
            if key not in ("input_ids", "attention_mask") and isinstance(value, torch.Tensor) and value.ndim == 2 \
                    and value.shape[1] == start:
                inputs[key] = torch.cat([value, value.new_zeros(1, answer_ids.shape[1])], dim=1)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], answer_ids], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs.pop("token_type_ids", None)
        positions = (inputs["input_ids"][0] == self.image_token_id).nonzero()[:, 0]
        layout = self.layout((image.height, image.width), inputs)
        if len(positions) != layout.lm_tokens:
            raise CheckpointError(f"{self.path}: the processor wrote {len(positions)} image tokens for a "
                                  f"{image.width}x{image.height} image but the model reads {layout.lm_tokens} "
                                  "(processor and config disagree: pinpoints, patch size or select strategy)")
        return Example(dict(inputs), start, positions, layout, question, answer)

    def layout(self, image_size: tuple[int, int], inputs) -> TokenLayout:
        """Where each visual token the LM reads sits on the original image (:mod:`.layouts`)."""
        from .layouts import lm_layout
        return lm_layout(self, image_size, inputs)

    # -- log-likelihoods and gradients -------------------------------------------------------------
    def _forward(self, example: Example, leaf: bool):
        """(summed answer log-prob, the leaf inputs_embeds or None): the model's own forward, logits
        only where answer tokens are predicted."""
        captured = {}

        def swap(module, args, kwargs):
            x = kwargs["inputs_embeds"].detach().requires_grad_()
            captured["x"] = x
            kwargs["inputs_embeds"] = x
            return args, kwargs

        handle = self.language_model.register_forward_pre_hook(swap, with_kwargs=True) if leaf else None
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in example.inputs.items()}
        for k, v in inputs.items():
            if torch.is_floating_point(v):
                inputs[k] = v.to(self.model.dtype)
        ids = inputs["input_ids"][0]
        keep = len(ids) - example.answer_start + 1
        try:
            with torch.set_grad_enabled(leaf):
                logits = self.model(**inputs, use_cache=False, logits_to_keep=keep).logits[0, :-1]
        finally:
            if handle is not None:
                handle.remove()
        target = ids[example.answer_start:].to(logits.device)
        logp = logits.float().log_softmax(-1).gather(-1, target[:, None]).sum()
        return logp, captured.get("x")

    def answer_logprob(self, example: Example) -> float:
        """Summed log p(answer tokens | image, question), no gradients."""
        with torch.no_grad():
            return float(self._forward(example, leaf=False)[0])

    def logprob_gradient(self, example: Example) -> VisualGradient:
        """The summed answer log-likelihood and its gradient at the visual tokens the LM reads."""
        logp, x = self._forward(example, leaf=True)
        (grad,) = torch.autograd.grad(logp, x)
        positions = example.image_positions.to(x.device)
        act, grad = x.detach()[0, positions].float(), grad[0, positions].float()
        tokens, newlines = (p.to(x.device) for p in example.layout.lm_positions())
        out = VisualGradient(float(logp.detach()), act[tokens].cpu(), grad[tokens].cpu(), example.layout,
                             grad[newlines].cpu() if len(newlines) else None)
        del logp, x
        return out

    def describe(self, image=None) -> dict:
        """What `probe inspect --mllm` prints: family, classes, LM size, template, image token, positions."""
        lm = self.language_model
        out = {"family": self.family, "model": type(self.model).__name__, "processor": type(self.processor).__name__,
               "lm": f"{type(lm).__name__}, {sum(p.numel() for p in lm.parameters()) / 1e6:.2f}M parameters, "
                     f"{self.config.text_config.num_hidden_layers} layers x {self.config.text_config.hidden_size}",
               "chat_template": self.template_from,
               "image_token": f"{self.tokenizer.convert_ids_to_tokens(self.image_token_id)} (id {self.image_token_id})",
               **self.details}
        if image is not None:
            out["example"] = example_counts(self, image)
        return out

    def free(self) -> None:
        """Drop the weights (a DPO reference, once its log-probs are known)."""
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def example_counts(mllm, image) -> dict:
    """What one photo takes in the LM: per-view grids, tokens and newlines, the LM positions, and the
    view a base map keeps (None when the layout has no base view)."""
    layout = mllm.example(image, "What is in the image?", "x").layout
    try:
        base = layout.views[base_view(layout)].name
    except ValueError:
        base = None
    return {"image": f"{image.width}x{image.height}", "lm_positions": layout.lm_tokens, **layout.counts(),
            "base_view": base}


# -- the losses a map explains --------------------------------------------------------------------
LOSSES = ("logprob", "sft", "dpo")


def loss_gradient(mllm, image, record: dict, loss: str, *, beta: float = 0.1, reference: tuple | None = None,
                  ) -> VisualGradient:
    """The gradient at A of one record's ``loss``: "logprob" (summed answer log-likelihood of
    ``chosen``), "sft" (its token-mean cross-entropy), "dpo" (sigmoid DPO of chosen vs rejected).

    DPO runs chosen and rejected one after the other (one sequence's graph at a time) and combines
    them: dL/dA = -beta sigmoid(-m) (dlogp_c/dA - dlogp_r/dA), m = beta((pi_c - ref_c) - (pi_r - ref_r)).
    ``reference`` = (ref_c, ref_r) log-probs computed beforehand; None = the model itself (m = 0).
    """
    if loss not in LOSSES:
        raise SpecError(f"mllm loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    chosen = mllm.example(image, record["question"], record["chosen"])
    g_c = mllm.logprob_gradient(chosen)
    if loss == "logprob":
        return g_c
    if loss == "sft":
        return g_c.scaled(-1.0 / chosen.answer_tokens, -g_c.value / chosen.answer_tokens)
    g_r = mllm.logprob_gradient(mllm.example(image, record["question"], record["rejected"]))
    ref_c, ref_r = reference if reference is not None else (g_c.value, g_r.value)
    margin = torch.tensor(beta * ((g_c.value - ref_c) - (g_r.value - ref_r)), dtype=torch.float64)
    coefficient = float(-beta * torch.sigmoid(-margin))
    value = float(-torch.nn.functional.logsigmoid(margin))
    nl = None if g_c.newline_grad is None else coefficient * (g_c.newline_grad - g_r.newline_grad)
    return VisualGradient(value, g_c.act, coefficient * (g_c.grad - g_r.grad), g_c.layout, nl)


def reference_logprobs(mllm, items) -> list[tuple[float, float]]:
    """(chosen, rejected) summed log-probs of every (image, record) under ``mllm``, no gradients."""
    return [(mllm.answer_logprob(mllm.example(image, r["question"], r["chosen"])),
             mllm.answer_logprob(mllm.example(image, r["question"], r["rejected"]))) for image, r in items]


# -- loading --------------------------------------------------------------------------------------
def load_mllm(path, device=None, dtype=None, device_map=None):
    """The whole MLLM of a checkpoint dir, offline, safetensors only.

    transformers dirs (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2/2.5-VL, InternVL) load as their own
    class with their own processor; a LLaVA-NeXT / PIVOT training dir (``mm_vision_tower``) is
    converted in memory (:func:`encoder_probe.mllm.convert.convert_pivot`). ``dtype`` ("bf16", torch.bfloat16, ...) and ``device_map``
    ("auto", a dict: accelerate's offload) are passed to ``from_pretrained``.
    """
    from .convert import quiet
    with quiet():  # transformers' loading chatter (tied weights, processors) is not the user's business
        return _load_mllm(Path(path), device, dtype, device_map)


def _load_mllm(path: Path, device, dtype, device_map) -> MLLM:
    from ..encoders.registry import parse_device, parse_dtype, read_config
    config = read_config(path)
    dtype = parse_dtype(dtype)
    if "mm_vision_tower" in config:
        from .convert import convert_pivot
        model, processor = convert_pivot(path, dtype=dtype)
        mllm = MLLM(model, processor, family=model.config.model_type, path=path,
                    template_from=_template_from(processor, model.config.model_type),
                    details={"converted_from": "LLaVA-NeXT / PIVOT training dir (in memory)"})
        return _placed(mllm, parse_device(device))
    kind = config.get("model_type")
    if kind not in FAMILIES:
        raise CheckpointError(f"{path / 'config.json'}: model_type {kind!r} is not an MLLM encoder-probe runs "
                              f"(known: {', '.join(FAMILIES)}, LLaVA-NeXT / PIVOT dirs)")
    import transformers
    processor = _processor(path, kind)
    cls = getattr(transformers, FAMILIES[kind])
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model, info = cls.from_pretrained(path, local_files_only=True, use_safetensors=True, output_loading_info=True,
                                          **kwargs)
    except Exception as e:  # noqa: BLE001 - transformers', safetensors' and torch's own errors: one line
        raise CheckpointError(f"{path}: {FAMILIES[kind]} cannot load it ({' '.join(str(e).split())[:200]})") from None
    missing = sorted(info.get("missing_keys", ()))  # transformers leaves out weights tied to others (lm_head)
    mismatched = sorted(str(m[0] if isinstance(m, tuple) else m) for m in info.get("mismatched_keys", ()))
    if missing or mismatched:
        raise CheckpointError(f"{path}: the weights do not match {FAMILIES[kind]}'s config (missing "
                              f"{', '.join(missing[:3]) or 'none'}; shape mismatches {', '.join(mismatched[:3]) or 'none'})")
    mllm = MLLM(model, processor, family=kind, path=path, template_from=_template_from(processor, kind))
    return mllm if device_map is not None else _placed(mllm, parse_device(device))


def _placed(mllm: MLLM, device) -> MLLM:
    if device is not None:
        mllm.model.to(device)
    return mllm


def _processor(path: Path, kind: str):
    """The checkpoint's processor; an image processor with the published settings when the dir has
    only a tokenizer; a ChatML template when it has none."""
    import transformers

    from .convert import load_processor, saved_backend
    try:
        if saved_backend(path) == "pil":  # written by `probe convert`: LLaVA-NeXT's PIL preprocessing
            return load_processor(path)
        return transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means: not a whole processor on disk
        reason = " ".join(str(e).split())[:160]
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001
        raise CheckpointError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json): the MLLM "
                              f"target needs the checkpoint's tokenizer and chat template ({reason})") from None
    from ..encoders.hf_tower import load_config
    from ..encoders.processors import image_processor
    config = load_config(path)
    image = image_processor(path, kind, config)[0].build()
    return build_processor(kind, image, tokenizer, config)


def _template_from(processor, family: str) -> str:
    if getattr(processor, "chat_template", None):
        return "checkpoint"
    processor.chat_template = chatml_template(family)
    return "none in the checkpoint: Qwen2 ChatML with the family's image placeholder"


def build_processor(kind: str, image_processor, tokenizer, config=None):
    """The family's full processor (image + text + chat template), as its published checkpoints ship it."""
    import transformers as T
    template = getattr(tokenizer, "chat_template", None)
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    vision = getattr(config, "vision_config", None)
    patch = getattr(vision, "patch_size", 14)
    if kind == "llava_onevision":  # videos (unused here) framed like the image tiles
        tile = vision.image_size if vision is not None else 384
        video = T.LlavaOnevisionVideoProcessor(size={"height": tile, "width": tile},
                                               image_mean=list(image_processor.image_mean),
                                               image_std=list(image_processor.image_std))
        return T.LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template,
                                         video_processor=video, num_image_tokens=(tile // patch) ** 2,
                                         vision_feature_select_strategy=strategy,
                                         vision_aspect_ratio=getattr(config, "vision_aspect_ratio", "anyres_max_9"))
    if kind in ("llava", "llava_next"):  # CLIP towers: one additional (CLS) token, dropped by strategy default
        cls = T.LlavaProcessor if kind == "llava" else T.LlavaNextProcessor
        extra = 0 if getattr(vision, "model_type", "").startswith("siglip") else 1
        return cls(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                   vision_feature_select_strategy=strategy, chat_template=template, num_additional_image_tokens=extra)
    if kind.startswith("qwen"):
        cls = T.Qwen2VLProcessor if kind == "qwen2_vl" else T.Qwen2_5_VLProcessor
        return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=T.Qwen2VLVideoProcessor(),
                   chat_template=template)
    if kind == "internvl":
        return T.InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template,
                                   video_processor=T.InternVLVideoProcessor(), image_seq_length=256)
    raise CheckpointError(f"no processor for MLLM family {kind!r}")


def base_view(layout: TokenLayout) -> int:
    """The view that shows the whole image at the tower's own size: OneVision / NeXT's base, InternVL's
    thumbnail (or its single tile), the only view of LLaVA and Qwen."""
    names = [v.name for v in layout.views]
    for name in ("base", "thumbnail"):
        if name in names:
            return names.index(name)
    if len(names) == 1:
        return 0
    raise ValueError(f"no base view among {', '.join(names)}")


def keep_view(g: VisualGradient, view: int) -> VisualGradient:
    """One view's tokens of a gradient (and its newlines' gradient), with a layout of that view alone."""
    span, views = g.layout.span(view), g.layout.views
    newlines = None
    if views[view].newline and g.newline_grad is not None:
        start = sum(v.grid[0] for v in views[:view] if v.newline)
        newlines = g.newline_grad[start:start + views[view].grid[0]]
    return VisualGradient(g.value, g.act[span], g.grad[span], TokenLayout(g.layout.image_size, (views[view],)),
                          newlines)
