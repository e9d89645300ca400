"""LLaVA-NeXT / PIVOT training dirs as the transformers class that reproduces their forward.

A LLaVA-NeXT training dir (``LlavaQwenForCausalLM``; config.json with ``mm_vision_tower``) holds the
tower under ``model.vision_tower.vision_tower.vision_model.*`` (SigLIP: last block and head removed),
the projector as ``model.mm_projector.{0,2}.*`` and the LM as ``model.*`` / ``lm_head.weight``. Its
forward (llava_arch.prepare_inputs_labels_for_multimodal) splits the prompt at "<image>", puts
IMAGE_TOKEN_INDEX (-200) there and splices the projected tower features in its place.

- ``image_aspect_ratio`` "pad", "square" or absent: ``LlavaForConditionalGeneration`` (flat: the
  tower's tokens as they come). anyres_max_N with spatial_unpad (LLaVA-OneVision's recipe):
  ``LlavaOnevisionForConditionalGeneration`` (base view, then the best pinpoint's tiles unpadded,
  shrunk past N tiles, ``image_newline`` after each row). Plain "anyres" (LlavaNext) and the other
  settings: a one-line SpecError naming config.json and the setting.
- tower: the dir's own blocks as stored, architecture as the ``llava`` encoder source resolves it
  (``--vision-config`` dir, the built-in table of known towers, the weights' shapes). SigLIP: the
  last remaining block's output before post_layernorm, every token (strategy "full"); CLIP:
  ``mm_vision_select_layer``, CLS dropped for select_feature "patch" (strategy "default").
- ``multi_modal_projector.linear_1/2`` from ``model.mm_projector.0/2`` (mlp2x_gelu; GELU is erf).
- LM: the dir's config.json fields of its LM class (Qwen2 for LlavaQwen), weights from ``model.*``
  and ``lm_head.weight`` (tied embeddings: from embed_tokens, as LLaVA-NeXT ties them).
- ``<image>`` (and ``<video>`` for OneVision's processor): added to the dir's tokenizer (LLaVA-NeXT
  dirs have none) as special tokens. When the tokenizer then outgrows the embedding rows, rows are
  added (mean of the others, as transformers' convert_llava_weights_to_hf): the ``<image>`` row is
  never read (masked_scatter replaces it), but an added ``lm_head`` row is one logit more in the
  softmax (Qwen2 checkpoints have spare rows, so none is added there).
- processor: the tokenizer's own chat template and PIL-backend image processors, pixel-exact with
  LLaVA-NeXT: "pad" = expand2square with the mean colour int(m * 255), centred, then the tower's
  resize (SigLIP: size x size, bicubic) and mean/std (``LlavaImageProcessorPil``); anyres =
  process_anyres_image (``LlavaOnevisionImageProcessorPil``, pinpoints turned from LLaVA-NeXT's
  (width, height) to transformers' [height, width]). The torchvision backends differ by up to two
  grey levels, and ``save_pretrained`` does not record the backend: read a saved dir's processor
  with :func:`load_processor`.

Not reproduced: with an "unpad" ``mm_patch_merge_type`` and a flat setting, LLaVA-NeXT appends
``image_newline`` after the image's tokens when images come as a list (its training collator) but
not as a stacked tensor (process_images -> generate); the converted model follows the tensor path
(a warning says so). anyres: transformers' unpad_image rounds (``int(round(x, 7))``) where
LLaVA-NeXT truncates, so for a few image sizes (e.g. 352x220) LLaVA-NeXT cuts two more rows of
tokens. Sequences are not cut at ``tokenizer_model_max_length``.

Weights are read once (safetensors, through CheckpointReader; sharded dirs read shard by shard) and
handed to ``from_pretrained(None, state_dict=...)``, which builds the model on the meta device and
takes the tensors as its parameters: one copy in memory. Nothing in the dir is executed or written.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import warnings
from pathlib import Path

import torch

from ..cache import atomic_dir
from ..encoders.checkpoint import CheckpointReader
from ..encoders.llava import PROJECTOR_PREFIXES, lm_feature_layer, resolve_tower
from ..encoders.registry import parse_dtype, read_config
from ..errors import CheckpointError, SpecError

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"  # LlavaOnevisionProcessor needs one
FLAT = ("pad", "square", None)
# LLaVA-NeXT's LM classes -> the transformers model_type of their LM (same model.* / lm_head layout)
LM_TYPES = {"LlavaQwenForCausalLM": "qwen2", "LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}
MM_KEYS = ("model.vision_tower.", "model.mm_projector.", "model.image_newline", "model.vision_resampler.",
           "model.faster_token")
LEGACY_LM_FIELDS = ("rope_theta", "rope_scaling")  # 4.x config keys transformers 5 still reads


def is_pivot_dir(path) -> bool:
    """Whether ``path`` is a LLaVA-NeXT / PIVOT training dir (config.json has ``mm_vision_tower``)."""
    try:
        return "mm_vision_tower" in read_config(Path(path))
    except CheckpointError:
        return False


def convert_pivot(path, *, vision_config=None, dtype=None):
    """``(model, processor)``: the transformers MLLM that reproduces the dir's forward, in memory.

    ``dtype`` (torch dtype or name; None: as stored) is applied tensor by tensor while reading.
    One-line CheckpointError / SpecError naming the file for what cannot be converted.
    """
    import transformers
    path = Path(path)
    config = read_config(path)
    where = path / "config.json"
    if "mm_vision_tower" not in config:
        raise SpecError(f"{where}: not a LLaVA-NeXT / PIVOT training dir (no mm_vision_tower)")
    dtype = parse_dtype(dtype)
    family = _family(where, config)
    for key in ("mm_resampler_type",):
        if config.get(key):
            raise SpecError(f"{where}: {key} {config[key]!r} is not supported (no resampler in the HF classes)")
    projector_type = config.get("mm_projector_type", "linear")
    if projector_type != "mlp2x_gelu":
        raise SpecError(f"{where}: mm_projector_type {projector_type!r}: the HF LLaVA classes' projector is "
                        "mlp2x_gelu (Linear, GELU, Linear)")

    reader = CheckpointReader(path)
    arch = resolve_tower(path, config, reader, vision_config)
    vision, layer, strategy = _vision_config(where, config, arch)
    tokens = (IMAGE_TOKEN, VIDEO_TOKEN) if family == "llava_onevision" else (IMAGE_TOKEN,)
    tokenizer, token_ids = image_tokenizer(path, config, tokens)
    text = _text_config(where, config)

    state = {f"model.vision_tower.{k}": v for k, v in arch.state.items()}
    arch.state = {}
    state.update(_projector_state(path, reader))
    state.update(_lm_state(path, reader, text))
    if family == "llava_onevision":
        newline = reader.first_tensor(("model.image_newline",))
        if newline is None:
            raise CheckpointError(f"{path}: missing keys: model.image_newline (anyres with "
                                  f"{config.get('mm_patch_merge_type')} reads it)")
        state["model.image_newline"] = newline
    if dtype is not None:  # tensor by tensor: the stored copy of each goes as its converted one comes
        for key in list(state):
            if state[key].is_floating_point():
                state[key] = state[key].to(dtype)
    rows = state["model.language_model.embed_tokens.weight"].shape[0]
    if text.vocab_size != rows:
        raise CheckpointError(f"{path}: model.embed_tokens.weight has {rows} rows, {where.name} says vocab_size "
                              f"{text.vocab_size}")
    if len(tokenizer) > rows:  # the tokenizer outgrew the embedding rows: add rows (never read for <image>)
        for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            if key in state:
                weight = state[key]
                extra = weight.mean(0, keepdim=True).expand(len(tokenizer) - rows, -1)
                state[key] = torch.cat([weight, extra])
        text.vocab_size = len(tokenizer)

    side = vision.image_size // vision.patch_size
    common = dict(vision_config=vision, text_config=text, image_token_id=token_ids[IMAGE_TOKEN],
                  projector_hidden_act="gelu", vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                  multimodal_projector_bias=True, tie_word_embeddings=text.tie_word_embeddings)
    if family == "llava":
        cls = transformers.LlavaForConditionalGeneration
        hf_config = transformers.LlavaConfig(
            **common, image_seq_length=side * side + (1 if strategy == "full" and not _siglip(vision) else 0))
    else:
        if strategy == "full" and not _siglip(vision):
            raise SpecError(f"{where}: mm_vision_select_feature 'cls_patch' keeps the CLS token of every tile; "
                            "the anyres model cannot unpad such tiles")
        cls = transformers.LlavaOnevisionForConditionalGeneration
        hf_config = transformers.LlavaOnevisionConfig(
            **common, video_token_id=token_ids[VIDEO_TOKEN], vision_aspect_ratio=config["image_aspect_ratio"],
            image_grid_pinpoints=_pinpoints(where, config, arch))
    _check_keys(path, cls, hf_config, state)
    with quiet():
        model = cls.from_pretrained(None, config=hf_config, state_dict=state,
                                    **({"dtype": dtype} if dtype is not None else {}))
    model.eval()
    processor = _processor(family, config, arch, tokenizer, hf_config)
    return model, processor


def _family(where: Path, config: dict) -> str:
    """Which HF class reproduces the dir's image path: "llava" (pad / square / absent) or
    "llava_onevision" (anyres_max_N with spatial_unpad); a one-line SpecError otherwise."""
    aspect = config.get("image_aspect_ratio")
    merge = str(config.get("mm_patch_merge_type", "flat"))
    if not (merge == "flat" or merge.startswith("spatial")):
        raise SpecError(f"{where}: mm_patch_merge_type {merge!r} is not one LLaVA-NeXT knows (flat, spatial*)")
    if aspect in FLAT:
        if "unpad" in merge:
            warnings.warn(f"{where}: mm_patch_merge_type {merge!r} with image_aspect_ratio {aspect!r}: LLaVA-NeXT "
                          "appends image_newline after a single image given as a list (its training collator), "
                          "not as a stacked tensor (process_images); the converted model follows the tensor path",
                          stacklevel=3)
        return "llava"
    if isinstance(aspect, str) and re.fullmatch(r"anyres_max_\d+", aspect):
        if "unpad" not in merge or "maxpool2x2" in merge or "nobase" in merge:
            raise SpecError(f"{where}: image_aspect_ratio {aspect!r} with mm_patch_merge_type {merge!r}: "
                            "LlavaOnevisionForConditionalGeneration reproduces spatial_unpad only")
        if "image_grid_pinpoints" not in config:
            raise SpecError(f"{where}: image_aspect_ratio {aspect!r} without image_grid_pinpoints")
        return "llava_onevision"
    if aspect == "anyres":
        raise SpecError(f"{where}: image_aspect_ratio 'anyres' is not converted yet (it would be "
                        "LlavaNextForConditionalGeneration); pad / square / absent and anyres_max_N are")
    raise SpecError(f"{where}: image_aspect_ratio {aspect!r} is not converted (pad, square or absent: "
                    "LlavaForConditionalGeneration; anyres_max_N: LlavaOnevisionForConditionalGeneration)")


def _pinpoints(where: Path, config: dict, arch) -> list[list[int]]:
    """``image_grid_pinpoints`` in transformers' [height, width] order (:func:`encoders.llava.grid_pinpoints`),
    the tile being the image processor's size."""
    from ..encoders.llava import grid_pinpoints
    try:
        return grid_pinpoints(config["image_grid_pinpoints"], arch.preprocess.size[0])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def save_converted(path, out, *, vision_config=None) -> Path:
    """:func:`convert_pivot` written to ``out`` (``save_pretrained`` of model and processor), atomically:
    ``out`` appears whole or not at all. An existing ``out`` is refused before any work."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise SpecError(f"--out {out}: already exists; convert writes a new directory")
    model, processor = convert_pivot(path, vision_config=vision_config)
    with atomic_dir(out) as tmp, quiet():
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        record_conversion(tmp, path)
    return out


CONVERSION = "conversion.json"  # what `probe convert` adds beside the save_pretrained files


def record_conversion(directory, source) -> None:
    """``conversion.json`` beside a saved converted model: save_pretrained does not record the PIL backend
    (the pixel-exact one), so load_mllm reads it here."""
    (Path(directory) / CONVERSION).write_text(json.dumps({"converted_from": str(Path(source).resolve()),
                                                          "image_processor_backend": "pil"}, indent=2))


def saved_backend(path) -> str | None:
    """The image processor backend a converted dir was written with (``conversion.json``), or None."""
    try:
        return json.loads((Path(path) / CONVERSION).read_text()).get("image_processor_backend")
    except (OSError, ValueError, AttributeError):
        return None


def load_processor(path):
    """A converted dir's processor with the PIL-backend image processor, the pixel-exact one.

    ``AutoProcessor.from_pretrained`` alone gives the torchvision backend (off by up to two grey levels);
    ``backend="pil"`` fails for LlavaOnevisionProcessor (its video processor has no PIL backend), so the
    image processor is loaded apart and put in."""
    import transformers
    path = Path(path)
    with quiet():
        processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
        processor.image_processor = transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True,
                                                                                    backend="pil")
    return processor


@contextlib.contextmanager
def quiet():
    """transformers' info logs and progress bars off for the block (they are not the user's business here)."""
    from transformers.utils import logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def describe(config, processor) -> str:
    """One line: what a converted model is (its config and processor), for the CLI."""
    vision = config.vision_config
    image = processor.image_processor
    side = vision.image_size // vision.patch_size
    if config.model_type == "llava_onevision":
        views = (f"{config.vision_aspect_ratio}: base view + tiles of {side}x{side} tokens, "
                 f"{len(config.image_grid_pinpoints)} pinpoints, image_newline")
        pre = "anyres tiles"
    else:
        views = f"{config.image_seq_length} image tokens"
        pre = f"pad {'on' if image.do_pad else 'off'}"
    return (f"{(config.architectures or [type(config).__name__])[0]}: {vision.model_type} "
            f"{vision.num_hidden_layers} blocks ({vision.image_size}px, patch {vision.patch_size}), {views}; "
            f"layer {config.vision_feature_layer}, strategy {config.vision_feature_select_strategy}; "
            f"{config.text_config.model_type} LM; {IMAGE_TOKEN} id {config.image_token_id}; "
            f"image processor {type(image).__name__} ({pre})")


# -- pieces -----------------------------------------------------------------------------------------
def _siglip(vision) -> bool:
    return vision.model_type.startswith("siglip")


def _vision_config(where: Path, config: dict, arch):
    """The HF tower config as stored (blocks in the weights, no head) and the layer / strategy it feeds."""
    import copy
    full = arch.config
    kind = full.model_type
    if kind not in ("siglip_vision_model", "clip_vision_model"):
        raise SpecError(f"{where}: tower {config['mm_vision_tower']} resolves to {kind} ({arch.arch_from}); "
                        "LlavaForConditionalGeneration takes a fixed-resolution SigLIP or CLIP tower here")
    layer, _ = lm_feature_layer(full, config)
    depth = full.num_hidden_layers
    absolute = layer + depth + 1 if layer < 0 else layer
    if not 0 <= absolute <= arch.present:
        raise CheckpointError(f"{where}: the LM reads tower layer {absolute} of {depth} (architecture from "
                              f"{arch.arch_from}) but the weights hold {arch.present} blocks; is --vision-config "
                              "needed?")
    vision = copy.deepcopy(full)
    vision.num_hidden_layers = arch.present
    if hasattr(vision, "vision_use_head"):
        vision.vision_use_head = False
    select = config.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise SpecError(f"{where}: mm_vision_select_feature {select!r} is not supported (patch, cls_patch)")
    strategy = "full" if kind.startswith("siglip") or select == "cls_patch" else "default"
    return vision, absolute - (arch.present + 1), strategy


def _text_config(where: Path, config: dict):
    """The LM's config from the dir's config.json: the fields its transformers class declares (4.x
    rope_theta / rope_scaling included); the mm_* fields stay out."""
    import transformers
    archs = config.get("architectures") or []
    lm_type = next((LM_TYPES[a] for a in archs if a in LM_TYPES), None)
    if lm_type is None:
        if archs:
            raise SpecError(f"{where}: architectures {archs} is not a LLaVA-NeXT LM class this converter knows "
                            f"({', '.join(LM_TYPES)})")
        lm_type = "qwen2"
    cls = transformers.CONFIG_MAPPING[lm_type]
    known = {f.name for f in dataclasses.fields(cls)} - {"architectures", "transformers_version", "dtype"}
    fields = {k: v for k, v in config.items() if k in known or k in LEGACY_LM_FIELDS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rope_scaling -> rope_parameters
        try:
            return cls(**fields)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: not a {lm_type} LM config ({' '.join(str(e).split())[:200]})") from None


def image_tokenizer(path: Path, config: dict, tokens: tuple[str, ...]):
    """The dir's tokenizer with ``tokens`` added where missing (special, not normalised), and their ids."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise CheckpointError(f"{path / 'tokenizer_config.json'}: no tokenizer files (tokenizer.json / "
                              "tokenizer_config.json); the MLLM needs the dir's tokenizer")
    with warnings.catch_warnings(), quiet():  # it reads config.json too, and says it is no tokenizer config
        warnings.simplefilter("ignore")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - any failure is: not a tokenizer transformers reads
            raise CheckpointError(f"{path / 'tokenizer_config.json'}: not a tokenizer transformers can read "
                                  f"({' '.join(str(e).split())[:200]})") from None
    vocab = tokenizer.get_vocab()
    missing = [AddedToken(t, special=True, normalized=False) for t in tokens if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if config.get("tokenizer_model_max_length"):
        tokenizer.model_max_length = int(config["tokenizer_model_max_length"])
    if config.get("tokenizer_padding_side") in ("left", "right"):
        tokenizer.padding_side = config["tokenizer_padding_side"]
    return tokenizer, {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}


def _projector_state(path: Path, reader: CheckpointReader) -> dict:
    prefix = reader.first_prefix(PROJECTOR_PREFIXES)
    if prefix is None:
        raise CheckpointError(f"{path}: missing projector keys (none under {PROJECTOR_PREFIXES[0]})")
    names = {"0": "linear_1", "2": "linear_2"}
    out = {}
    for key, value in reader.load_prefix(prefix).items():
        index, _, rest = key.partition(".")
        if index not in names:
            raise CheckpointError(f"{path}: unexpected projector key {prefix}{key} for mlp2x_gelu")
        out[f"model.multi_modal_projector.{names[index]}.{rest}"] = value
    return out


def _lm_state(path: Path, reader: CheckpointReader, text) -> dict:
    """``model.*`` (less the multimodal parts) -> ``model.language_model.*``; ``lm_head.*`` as is (left out
    when the embeddings are tied: LLaVA-NeXT's LM then reads embed_tokens)."""
    keys = [k for k in reader.keys()
            if (k.startswith("model.") and not k.startswith(MM_KEYS)) or k.startswith("lm_head.")]
    if text.tie_word_embeddings:
        keys = [k for k in keys if k != "lm_head.weight"]
    out = {}
    for file in reader.files_for(keys):  # shard by shard
        part = [k for k in keys if reader.files_for([k]) == [file]]
        for key, value in reader.load(part).items():
            out[key if key.startswith("lm_head.") else "model.language_model." + key.removeprefix("model.")] = value
    return out


def _check_keys(path: Path, cls, hf_config, state: dict) -> None:
    """Every weight the model has, no other, same shapes; post_layernorm may be absent (never read)."""
    with torch.device("meta"):
        expected = cls(hf_config).state_dict()
    tied = hf_config.tie_word_embeddings
    missing = [k for k in expected if k not in state and not (tied and k == "lm_head.weight")
               and not k.startswith("model.vision_tower.post_layernorm.")]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise CheckpointError(f"{path}: missing keys: {_few([_original(k) for k in missing])}")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys for this architecture: "
                              f"{_few([_original(k) for k in unexpected])}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{path}: shape mismatch for {_original(key)}: checkpoint {tuple(value.shape)}, "
                                  f"architecture {tuple(expected[key].shape)}")


def _original(key: str) -> str:
    """A converted key as the LLaVA-NeXT dir names it, for messages."""
    if key.startswith("model.language_model."):
        return "model." + key.removeprefix("model.language_model.")
    if key.startswith("model.vision_tower."):
        return "model.vision_tower.vision_tower.vision_model." + key.removeprefix("model.vision_tower.")
    if key.startswith("model.multi_modal_projector."):
        return key.replace("multi_modal_projector.linear_1", "mm_projector.0").replace(
            "multi_modal_projector.linear_2", "mm_projector.2")
    return key


def _few(keys: list[str], n: int = 4) -> str:
    more = f" ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def _processor(family: str, config: dict, arch, tokenizer, hf_config):
    """The dir's tokenizer (and chat template) + the PIL-backend image processor doing LLaVA-NeXT's
    preprocessing of this tower: LlavaProcessor (pad: expand2square first) or LlavaOnevisionProcessor
    (process_anyres_image: base view resized, best pinpoint, aspect-kept resize, black pad, tiles)."""
    import transformers
    p = arch.preprocess
    h, w = p.size
    common = dict(image_mean=list(p.mean), image_std=list(p.std), resample=_RESAMPLE[p.interpolation],
                  do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True)
    from .model import build_processor
    if family == "llava_onevision":
        tile = hf_config.vision_config.image_size
        image = transformers.LlavaOnevisionImageProcessorPil(
            size={"height": tile, "width": tile}, image_grid_pinpoints=hf_config.image_grid_pinpoints, do_pad=True,
            **common)
        return build_processor(family, image, tokenizer, hf_config)
    geometry = (dict(size={"height": h, "width": w}, do_center_crop=False) if p.resize == "exact" else
                dict(size={"shortest_edge": p.resize_to or min(h, w)}, crop_size={"height": h, "width": w},
                     do_center_crop=True))
    image = transformers.LlavaImageProcessorPil(do_pad=config.get("image_aspect_ratio") == "pad", **common, **geometry)
    return build_processor(family, image, tokenizer, hf_config)
