"""The vision side: CLIP tower, image preprocessing and the LLaVA projector.

The projector is built from data: a type string ("linear", "mlp2x_gelu", ...) and the
shapes found in its weights. Weights come from a projector file, from inside a full
checkpoint (sharded or not) or from a llava-hf checkpoint; only the projector's
tensors are read.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass

import torch
from torch import nn

from .errors import LlavaError
from .pipelines import Pipeline

PROJECTOR_PREFIXES = ("model.mm_projector.", "mm_projector.", "model.multi_modal_projector.",
                      "multi_modal_projector.")
# llava-hf names its two projector layers linear_1/linear_2; the original numbers them in a Sequential.
_HF_LAYER_INDEX = {"linear_1": "0", "linear_2": "2"}
_MLP_TYPE = re.compile(r"^mlp(\d+)x_gelu$")
# A picture whose sides differ more than this is cut (crop) or shrunk (pad) first, so that
# preprocessing never builds a huge intermediate image; ordinary pictures are untouched.
MAX_ASPECT_RATIO = 8
MAX_PADDED_SIDE = 4096


class VisionLoadError(LlavaError):
    """The vision tower or the projector could not be loaded."""


def projector_depth(projector_type: str) -> int:
    if projector_type == "linear":
        return 1
    match = _MLP_TYPE.match(projector_type)
    if match is None:
        raise VisionLoadError(f"unknown projector type {projector_type!r}; known: linear, mlp<N>x_gelu")
    return int(match.group(1))


def build_projector(projector_type: str, in_features: int, out_features: int) -> nn.Module:
    """linear → one Linear; mlpNx_gelu → N Linears with GELU between them (indices 0, 2, 4, ...)."""
    depth = projector_depth(projector_type)
    if depth == 1:
        return nn.Linear(in_features, out_features)
    layers: list[nn.Module] = [nn.Linear(in_features, out_features)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_features, out_features)]
    return nn.Sequential(*layers)


def normalise_projector_keys(state: dict) -> dict:
    """Projector tensors keyed as the module from ``build_projector`` expects."""
    found = {}
    for key, tensor in state.items():
        for prefix in PROJECTOR_PREFIXES:
            if key.startswith(prefix):
                found[key[len(prefix):]] = tensor
                break
    if not found:
        found = dict(state)  # a bare projector file: "weight"/"bias" or "0.weight"/...
    renamed = {}
    for key, tensor in found.items():
        layer, _, rest = key.partition(".")
        renamed[f"{_HF_LAYER_INDEX.get(layer, layer)}.{rest}" if rest else key] = tensor
    return renamed


def projector_type_of(state: dict) -> str:
    if set(state) <= {"weight", "bias"}:
        return "linear"
    indices = sorted({int(k.split(".")[0]) for k in state if k.split(".")[0].isdigit()})
    if not indices:
        raise VisionLoadError(f"the projector weights have unexpected names: {sorted(state)[:6]}")
    if len(indices) == 1:
        return "linear"  # a Sequential holding a single Linear
    return f"mlp{len(indices)}x_gelu"


def projector_from_state(state: dict) -> nn.Module:
    """Build the projector whose type and shapes the weights describe, and load them."""
    state = normalise_projector_keys(state)
    projector_type = projector_type_of(state)
    if projector_type == "linear" and "weight" not in state:
        state = {k.split(".", 1)[1]: v for k, v in state.items()}
    first = state["weight"] if "weight" in state else state["0.weight"]
    last_index = max((int(k.split(".")[0]) for k in state if k[0].isdigit()), default=None)
    last = state["weight"] if last_index is None else state[f"{last_index}.weight"]
    projector = build_projector(projector_type, first.shape[1], last.shape[0])
    try:
        projector.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    except RuntimeError as error:
        raise VisionLoadError(f"the projector weights do not fit a {projector_type} projector: {error}") from None
    return projector


def projector_shape(projector: nn.Module) -> tuple[int, int]:
    linears = [m for m in projector.modules() if isinstance(m, nn.Linear)]
    return linears[0].in_features, linears[-1].out_features


# ---------------------------------------------------------------- reading weights


def resolve_file(repo: str, filename: str) -> str:
    """A file of a local folder or of a Hub repo (the Hub honours HF_HUB_OFFLINE and its cache)."""
    if os.path.isdir(repo):
        path = os.path.join(repo, filename)
        if not os.path.isfile(path):
            raise VisionLoadError(f"'{filename}' is not in the folder '{repo}'")
        return path
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo, filename)
    except Exception as error:
        raise VisionLoadError(f"could not get '{filename}' from '{repo}' ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); download it first or "
                              "point the setting at a local folder") from None


def read_tensors(path: str, wanted=lambda key: True) -> dict:
    """Tensors of one weights file whose names pass ``wanted``; only those are read."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if wanted(k)}
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {k: v for k, v in state.items() if wanted(k)}


def _is_projector_key(key: str) -> bool:
    return key.startswith(PROJECTOR_PREFIXES)


def read_projector_state(repo: str, filename: str | None) -> tuple[dict, str]:
    """The projector's tensors and a description of where they came from.

    With a filename, that file. Without one: ``mm_projector.{safetensors,bin}`` when the
    folder has it, else the projector inside the checkpoint, through its shard index.
    """
    if filename:
        path = resolve_file(repo, filename)
        return read_tensors(path), path
    candidates = ["mm_projector.safetensors", "mm_projector.bin"]
    indexes = ["model.safetensors.index.json", "pytorch_model.bin.index.json"]
    singles = ["model.safetensors", "pytorch_model.bin"]
    for name in candidates:
        if _has_file(repo, name):
            path = resolve_file(repo, name)
            return read_tensors(path), path
    for name in indexes:
        if _has_file(repo, name):
            with open(resolve_file(repo, name)) as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted({shard for key, shard in weight_map.items() if _is_projector_key(key)})
            state = {}
            for shard in shards:
                state.update(read_tensors(resolve_file(repo, shard), _is_projector_key))
            if state:
                return state, f"{repo} ({', '.join(shards)})"
    for name in singles:
        if _has_file(repo, name):
            path = resolve_file(repo, name)
            state = read_tensors(path, _is_projector_key)
            if state:
                return state, path
    raise VisionLoadError(f"found no projector weights in '{repo}' (looked for {', '.join(candidates)} "
                          "and for mm_projector / multi_modal_projector tensors in its checkpoint)")


def _has_file(repo: str, filename: str) -> bool:
    if os.path.isdir(repo):
        return os.path.isfile(os.path.join(repo, filename))
    from huggingface_hub import file_exists, try_to_load_from_cache
    cached = try_to_load_from_cache(repo, filename)
    if isinstance(cached, str):
        return True
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        return file_exists(repo, filename)
    except Exception:
        return False


# ---------------------------------------------------------------- the vision tower


def load_vision_tower(source: str, keep_layers_for: int = -2):
    """A CLIPVisionModel and its image processor from ``source``.

    ``source`` is a CLIP repo or folder (a full CLIP checkpoint loads its vision part) or a
    llava-hf checkpoint folder, whose ``vision_config`` and ``vision_tower.*`` tensors are used.
    The encoder keeps only the layers that the feature layer needs: the rest would be
    computed and thrown away.
    """
    from transformers import CLIPVisionModel
    try:
        with _quiet_transformers():
            model = _load_tower_model(source, CLIPVisionModel)
    except VisionLoadError:
        raise
    except Exception as error:
        raise VisionLoadError(f"could not load a CLIP vision tower from '{source}': "
                              f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    keep_encoder_layers(model, keep_layers_for)
    processor = load_image_processor(source)
    return model.eval(), processor


@contextlib.contextmanager
def _quiet_transformers():
    """A full CLIP checkpoint has a text half we skip on purpose: no report of unused weights."""
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_tower_model(source: str, model_class):
    config_path = os.path.join(source, "config.json") if os.path.isdir(source) else resolve_file(source, "config.json")
    with open(config_path) as f:
        raw_config = json.load(f)
    if raw_config.get("model_type") in ("llava", "llava_llama", "llava_mistral") and "vision_config" in raw_config:
        return _vision_tower_from_llava_hf(source, raw_config)
    return model_class.from_pretrained(source).float()


def _vision_tower_from_llava_hf(folder: str, raw_config: dict):
    prefixes = ("model.vision_tower.", "vision_tower.")

    def wanted(key):
        return key.startswith(prefixes)

    state = {}
    for name in _weight_files(folder):
        state.update(read_tensors(os.path.join(folder, name), wanted))
    return clip_vision_from_state(raw_config["vision_config"], state, f"the llava-hf checkpoint '{folder}'")


def clip_vision_from_state(vision_config: dict, state: dict, origin: str):
    """A CLIPVisionModel from a llava-hf ``vision_config`` and its ``[model.]vision_tower.*`` tensors."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    config = CLIPVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
    model = CLIPVisionModel(config)
    prefixes = ("model.vision_tower.", "vision_tower.")
    expected = set(model.state_dict())
    renamed = {}
    for key, tensor in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if key not in expected and key.startswith("vision_model."):
            key = key[len("vision_model."):]
        elif key not in expected and "vision_model." + key in expected:
            key = "vision_model." + key
        renamed[key] = tensor
    missing = expected - set(renamed)
    missing = {k for k in missing if not k.endswith("position_ids")}
    if missing:
        raise VisionLoadError(f"{origin} lacks vision tower tensors, e.g. {sorted(missing)[:3]}")
    model.load_state_dict(renamed, strict=False)
    return model


def _weight_files(folder: str) -> list[str]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = os.path.join(folder, index)
        if os.path.isfile(path):
            with open(path) as f:
                return sorted(set(json.load(f)["weight_map"].values()))
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, single)):
            return [single]
    raise VisionLoadError(f"no weights found in '{folder}'")


def encoder_layers(model) -> nn.ModuleList:
    inner = getattr(model, "vision_model", None)  # transformers 4.x nests the tower one level deeper
    return (inner if isinstance(inner, nn.Module) else model).encoder.layers


def keep_encoder_layers(model, feature_layer: int) -> None:
    """Drop the encoder layers after the one whose output is ``hidden_states[feature_layer]``."""
    layers = encoder_layers(model)
    needed = feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer
    if not 0 <= needed <= len(layers):
        raise VisionLoadError(f"feature layer {feature_layer} does not exist in a {len(layers)}-layer tower")
    del layers[needed:]
    model.config.num_hidden_layers = needed


def load_image_processor(source: str):
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:
        from transformers import CLIPImageProcessor as processor_class
    try:
        return processor_class.from_pretrained(source)
    except Exception as error:
        raise VisionLoadError(f"could not load the image processor of '{source}': {type(error).__name__}") from None


# ---------------------------------------------------------------- preprocessing


def fill_colour(processor) -> tuple[int, int, int]:
    """The processor's mean colour in 0..255, truncated as LLaVA's own code does (int(), not round())."""
    return tuple(int(c * 255) for c in processor.image_mean)


def pad_to_square(image, colour):
    """The picture centred on a square of ``colour``: what LLaVA v1.5 trained with."""
    from PIL import Image
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    if side > MAX_PADDED_SIDE:
        scale = MAX_PADDED_SIDE / side
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)
        width, height = image.size
        side = max(width, height)
    square = Image.new(image.mode, (side, side), colour)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def limit_aspect_ratio(image):
    """Cut the middle of a very long picture: a centre crop only looks at the middle anyway."""
    width, height = image.size
    if width > MAX_ASPECT_RATIO * height:
        keep = MAX_ASPECT_RATIO * height
        left = (width - keep) // 2
        return image.crop((left, 0, left + keep, height))
    if height > MAX_ASPECT_RATIO * width:
        keep = MAX_ASPECT_RATIO * width
        top = (height - keep) // 2
        return image.crop((0, top, width, top + keep))
    return image


def preprocess(images, processor, pipeline: Pipeline) -> torch.Tensor:
    """RGB pictures → one pixel batch at the pipeline's resolution."""
    if pipeline.preprocess == "pad":
        colour = fill_colour(processor)
        images = [pad_to_square(image, colour) for image in images]
    else:
        images = [limit_aspect_ratio(image) for image in images]
    try:
        batch = processor(images=images, return_tensors="pt", input_data_format="channels_last")
    except TypeError:  # transformers before 4.31 has no input_data_format and always sees channels last
        batch = processor(images=images, return_tensors="pt")
    return batch["pixel_values"]


@dataclass
class VisionParts:
    """What encodes pictures for one pipeline, with where it lives."""

    tower: nn.Module
    processor: object
    projector: nn.Module
    pipeline: Pipeline
    tower_device: torch.device
    tower_dtype: torch.dtype
    projector_device: torch.device
    projector_dtype: torch.dtype
    projector_type: str = "linear"

    @property
    def output_size(self) -> int:
        return projector_shape(self.projector)[1]

    @torch.inference_mode()
    def encode(self, images) -> torch.Tensor:
        """Pictures → projected features [n, feature_count, hidden], one tower batch."""
        pixels = preprocess(images, self.processor, self.pipeline).to(self.tower_device, self.tower_dtype)
        # The tower was cut after the feature layer, so its last hidden state is that layer's output.
        hidden = self.tower(pixel_values=pixels).last_hidden_state
        patches = hidden[:, 1:]  # the CLS position carries no patch
        return self.projector(patches.to(self.projector_device, self.projector_dtype))

    def encode_batches(self, images, batch_size: int = 16):
        """Pictures in tower batches of at most ``batch_size``, so 100 pictures stay within memory."""
        for start in range(0, len(images), batch_size):
            yield self.encode(images[start:start + batch_size])


def load_vision_parts(pipeline: Pipeline, vision_source: str, projector_repo: str,
                      projector_filename: str | None, tower_device, tower_dtype,
                      projector_device, projector_dtype, log=print) -> VisionParts:
    started = time.perf_counter()
    tower, processor = load_vision_tower(vision_source, pipeline.vision_feature_layer)
    tower.to(tower_device, tower_dtype)
    state, projector_origin = read_projector_state(projector_repo, projector_filename)
    projector_type = projector_type_of(normalise_projector_keys(state))
    projector = projector_from_state(state).to(projector_device, projector_dtype).eval()
    tower_width = tower.config.hidden_size
    projector_in, projector_out = projector_shape(projector)
    if projector_in != tower_width:
        raise VisionLoadError(f"the projector from {projector_origin} takes {projector_in}-wide features but "
                              f"the vision tower '{vision_source}' gives {tower_width}-wide ones; "
                              f"they do not belong together (pipeline {pipeline.name}): set llava-clip_repo and "
                              "llava-projector_repo to this model's own tower and projector, or set llava-pipeline")
    grid = (tower.config.image_size // tower.config.patch_size) ** 2
    if grid != pipeline.feature_count:
        raise VisionLoadError(f"the vision tower '{vision_source}' gives {grid} patches per image but pipeline "
                              f"{pipeline.name} has {pipeline.feature_count} image slots: set llava-clip_repo to "
                              f"the tower this model was trained with ({pipeline.vision_repo} for {pipeline.name}), "
                              "or set llava-pipeline to the pipeline of this model")
    log(f"llava: vision tower from '{vision_source}' on {tower_device} ({tower_dtype}), projector "
        f"{projector_in}→{projector_out} from {projector_origin} on {projector_device} ({projector_dtype}), "
        f"loaded in {time.perf_counter() - started:.1f} s")
    return VisionParts(tower, processor, projector, pipeline, torch.device(tower_device), tower_dtype,
                       torch.device(projector_device), projector_dtype, projector_type)
