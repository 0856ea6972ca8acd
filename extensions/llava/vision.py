"""The vision side: the CLIP tower (cut after its feature layer), preprocessing, and the parts
that turn pictures into projected features on the devices the settings name.

Weights are read through ``weights``; the projector is built by ``projector``.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from . import anyres
from .pipelines import Pipeline
from .projector import normalise_projector_keys, split_image_newline, projector_from_state, projector_shape, projector_type_of
from .weights import (WeightsError, image_processor_from, load_image_processor, quiet_transformers,
                      read_projector_tensors, read_tensors, resolve_file)

# A picture whose sides differ more than this is cut (crop) or shrunk (pad) first, so that
# preprocessing never builds a huge intermediate image; ordinary pictures are untouched.
MAX_ASPECT_RATIO = 8
MAX_PADDED_SIDE = 4096
MAX_VIEWS_PER_BATCH = 32  # 32 fixed-size pictures, or 6 any-resolution ones of up to 5 views


class VisionLoadError(WeightsError):
    """The vision tower or the projector could not be loaded."""


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
        with quiet_transformers():
            model = _load_tower_model(source, CLIPVisionModel)
    except WeightsError:
        raise
    except Exception as error:
        raise VisionLoadError(f"could not load a CLIP vision tower from '{source}': "
                              f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    keep_encoder_layers(model, keep_layers_for)
    processor = load_image_processor(source)
    return model.eval(), processor


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

    state = read_tensors(folder, wanted)
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


# ---------------------------------------------------------------- preprocessing


@functools.lru_cache(maxsize=4)
def padding_processor(processor):
    """transformers' LLaVA image processor with the CLIP processor's settings and ``do_pad``: it pads each
    picture to a square of the mean colour (truncated to 0..255, as LLaVA v1.5 trained), then resizes."""
    return image_processor_from(processor.to_dict(), "LlavaImageProcessor", do_pad=True)


def limit_padded_side(image):
    """Shrink a picture whose long side exceeds MAX_PADDED_SIDE, so that its padded square stays small."""
    from PIL import Image
    width, height = image.size
    side = max(width, height)
    if side <= MAX_PADDED_SIDE:
        return image
    scale = MAX_PADDED_SIDE / side
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)


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
    """RGB pictures → one pixel batch at the pipeline's resolution (one view per picture)."""
    if pipeline.preprocess == "pad":
        images = [limit_padded_side(image) for image in images]
        processor = padding_processor(processor)
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
    image_newline: torch.Tensor | None = None  # any-resolution pipelines: the feature that ends a grid row

    @property
    def output_size(self) -> int:
        return projector_shape(self.projector)[1]

    @torch.inference_mode()
    def project_views(self, pixels: torch.Tensor) -> torch.Tensor:
        """Views [n, 3, S, S] → projected features [n, F, hidden], one tower batch."""
        pixels = pixels.to(self.tower_device, self.tower_dtype)
        # The tower was cut after the feature layer, so its last hidden state is that layer's output.
        hidden = self.tower(pixel_values=pixels).last_hidden_state
        if not self.pipeline.keeps_cls:
            hidden = hidden[:, 1:]  # the CLS position carries no patch
        return self.projector(hidden.to(self.projector_device, self.projector_dtype))

    @torch.inference_mode()
    def encode(self, images) -> list[torch.Tensor]:
        """Pictures → each one's projected features [slots, hidden]; all their views in one tower batch."""
        if not self.pipeline.anyres:
            return list(self.project_views(preprocess(images, self.processor, self.pipeline)))
        pixels, sizes = anyres.tiles(images, self.processor, self.pipeline)
        features = self.project_views(pixels).split([self.pipeline.tile_count(w, h) for w, h in sizes])
        return [anyres.pack(views, w, h, self.pipeline, self.image_newline) for views, (w, h) in zip(features, sizes)]

    def encode_batches(self, images):
        """Pictures in tower batches of at most MAX_VIEWS_PER_BATCH views, so 100 pictures stay within memory."""
        per_batch = max(1, MAX_VIEWS_PER_BATCH // self.pipeline.max_views)
        for start in range(0, len(images), per_batch):
            yield self.encode(images[start:start + per_batch])


def load_vision_parts(pipeline: Pipeline, vision_source: str, projector_repo: str,
                      projector_filename: str | None, tower_device, tower_dtype,
                      projector_device, projector_dtype, log=print) -> VisionParts:
    started = time.perf_counter()
    tower, processor = load_vision_tower(vision_source, pipeline.vision_feature_layer)
    tower.to(tower_device, tower_dtype)
    state, projector_origin = read_projector_tensors(projector_repo, projector_filename)
    state, image_newline = split_image_newline(state)
    projector_type = projector_type_of(normalise_projector_keys(state))
    projector = projector_from_state(state).to(projector_device, projector_dtype).eval()
    tower_width = tower.config.hidden_size
    projector_in, projector_out = projector_shape(projector)
    if projector_in != tower_width:
        raise VisionLoadError(f"the projector from {projector_origin} takes {projector_in}-wide features but "
                              f"the vision tower '{vision_source}' gives {tower_width}-wide ones; "
                              f"they do not belong together (pipeline {pipeline.name}): set llava-clip_repo and "
                              "llava-projector_repo to this model's own tower and projector, or set llava-pipeline")
    grid = (tower.config.image_size // tower.config.patch_size) ** 2 + pipeline.keeps_cls
    if grid != pipeline.feature_count:
        raise VisionLoadError(f"the vision tower '{vision_source}' gives {grid} patches per image but pipeline "
                              f"{pipeline.name} has {pipeline.feature_count} image slots: set llava-clip_repo to "
                              f"the tower this model was trained with ({pipeline.vision_repo} for {pipeline.name}), "
                              "or set llava-pipeline to the pipeline of this model")
    if pipeline.anyres:
        if image_newline is None:
            raise VisionLoadError(f"pipeline {pipeline.name} tiles pictures and ends each row of tiles with the "
                                  f"model's image_newline feature, but {projector_origin} has none: convert the "
                                  "LLaVA-1.6 checkpoint with `python -m extensions.llava convert`, which keeps it")
        if tuple(image_newline.shape) != (projector_out,):
            raise VisionLoadError(f"the image_newline of {projector_origin} has shape {tuple(image_newline.shape)}; "
                                  f"the projector gives {projector_out}-wide features")
        if tower.config.image_size != pipeline.image_size:
            raise VisionLoadError(f"the vision tower '{vision_source}' sees {tower.config.image_size} px views but "
                                  f"pipeline {pipeline.name} tiles pictures into {pipeline.image_size} px ones")
        image_newline = image_newline.to(projector_device, projector_dtype)
    log(f"llava: vision tower from '{vision_source}' on {tower_device} ({tower_dtype}), projector "
        f"{projector_in}→{projector_out} from {projector_origin} on {projector_device} ({projector_dtype}), "
        f"loaded in {time.perf_counter() - started:.1f} s")
    return VisionParts(tower, processor, projector, pipeline, torch.device(tower_device), tower_dtype,
                       torch.device(projector_device), projector_dtype, projector_type,
                       image_newline if pipeline.anyres else None)
