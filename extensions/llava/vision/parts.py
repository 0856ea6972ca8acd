"""The vision side of a pipeline: the tower and the projector on the devices the settings name, turning
pictures into the projected features of their image slots.

The pipeline's family (a ``families.base.Family``, handed over by the caller) makes the views and
lays the projected views out as each picture's slot features; the tower comes from ``towers``, the projector from ``projector``; the parts
are checked against each other and the pipeline by ``checkpoint_rules``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CONVERT_COMMAND
from .checkpoint_rules import Parts, check
from .projector import (
    normalise_projector_keys,
    projector_from_state,
    projector_shape,
    projector_type_of,
    split_image_newline,
)
from .towers import VisionLoadError, load_vision_tower, tower_geometry
from .weights import read_projector_tensors

MAX_VIEWS_PER_BATCH = 32  # 32 fixed-size pictures, or 6 LLaVA-1.6 ones of up to 5 views (a OneVision one: 37)
# What to do when the loaded parts do not fit each other or the pipeline.
LOADER_FIX = ("wrong model or wrong pipeline: set llava-pipeline to this model's pipeline, or set llava-clip_repo "
              "and llava-projector_repo to its own tower and projector, or convert the checkpoint with "
              f"{CONVERT_COMMAND}")


@dataclass(frozen=True)
class Sources:
    """Where a pipeline's vision parts are read from."""

    vision: str  # a CLIP repo or folder, or a llava-hf checkpoint folder
    projector_repo: str
    projector_filename: str | None = None  # None: an mm_projector file, else the checkpoint's own tensors


@dataclass(frozen=True)
class Placement:
    """The devices and number types of the tower and of the projector."""

    tower_device: torch.device
    tower_dtype: torch.dtype
    projector_device: torch.device
    projector_dtype: torch.dtype


@dataclass
class VisionParts:
    """What encodes pictures for one pipeline, with where it lives."""

    tower: nn.Module
    processor: object
    projector: nn.Module
    pipeline: object  # its ``families.pipelines.Pipeline`` row
    family: object  # the ``families.base.Family`` that lays the pipeline's pictures out
    placement: Placement
    parts: Parts  # what the loaded files are, for the checks against the language model
    image_newline: torch.Tensor | None = None  # any-resolution pipelines: the feature that ends a grid row

    @property
    def output_size(self) -> int:
        return self.parts.projector_out

    @torch.inference_mode()
    def project_views(self, pixels: torch.Tensor) -> torch.Tensor:
        """Views [n, 3, S, S] → projected features [n, F, hidden], one tower batch."""
        place = self.placement
        pixels = pixels.to(place.tower_device, place.tower_dtype)
        # The tower was cut after the feature layer, so its last hidden state is that layer's output.
        hidden = self.tower(pixel_values=pixels).last_hidden_state
        if self.pipeline.drops_cls:
            hidden = hidden[:, 1:]  # the CLS position carries no patch
        return self.projector(hidden.to(place.projector_device, place.projector_dtype))

    @torch.inference_mode()
    def encode(self, pictures, layout: str) -> list[torch.Tensor]:
        """Pictures of one layout → each one's projected features [slots, hidden]; all their views in one
        tower batch."""
        family = self.family
        pixels, views = family.views(self.pipeline, self.processor, pictures, layout)
        projected = self.project_views(pixels)
        return family.features(self.pipeline, projected, views, pictures, layout, self.image_newline)

    def encode_batches(self, pictures, layout: str):
        """Pictures in tower batches of at most MAX_VIEWS_PER_BATCH views, so 100 pictures stay within memory."""
        per_batch = max(1, MAX_VIEWS_PER_BATCH // self.family.most_views(self.pipeline, layout))
        for start in range(0, len(pictures), per_batch):
            yield self.encode(pictures[start:start + per_batch], layout)


def load_vision_parts(pipeline, family, sources: Sources, placement: Placement,
                      log=print) -> VisionParts:
    started = time.perf_counter()
    tower, processor = load_vision_tower(sources.vision, pipeline.tower, pipeline.vision_feature_layer)
    tower.to(placement.tower_device, placement.tower_dtype)
    state, projector_origin = read_projector_tensors(sources.projector_repo, sources.projector_filename)
    state, image_newline = split_image_newline(state)
    projector = projector_from_state(state).to(placement.projector_device, placement.projector_dtype).eval()
    projector_in, projector_out = projector_shape(projector)
    parts = Parts(projector_type_of(normalise_projector_keys(state)), projector_in, projector_out,
                  newline_shape=tuple(image_newline.shape) if image_newline is not None else None,
                  **tower_geometry(tower))
    check(parts, pipeline, {"parts": LOADER_FIX, "pipeline": LOADER_FIX}, VisionLoadError,
          where=f"the vision tower '{sources.vision}' and the projector from {projector_origin}")
    if image_newline is not None:
        image_newline = image_newline.to(placement.projector_device, placement.projector_dtype)
    log(f"llava: vision tower from '{sources.vision}' on {placement.tower_device} ({placement.tower_dtype}), "
        f"projector {projector_in}→{projector_out} from {projector_origin} on {placement.projector_device} "
        f"({placement.projector_dtype}), loaded in {time.perf_counter() - started:.1f} s")
    return VisionParts(tower, processor, projector, pipeline, family, placement, parts, image_newline)
