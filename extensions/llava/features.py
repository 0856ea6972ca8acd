"""Projected features of pictures: the vision parts loaded for the current settings, and a cache by
picture content, so that a chat never decodes or encodes the same picture twice."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from .errors import CONVERT_COMMAND, LlavaError
from .families import family_of
from .families.pipelines import PipelineError
from .families.recognise import Choice
from .memory import release_freed_memory
from .prompt.parse import PlacedItem
from .settings import Settings
from .stores import FeatureCache
from .vision.checkpoint_rules import check
from .vision.parts import LOADER_FIX, Placement, Sources, VisionParts, load_vision_parts
from .vision.towers import VisionLoadError

logger = logging.getLogger("llava")


@dataclass
class Counters:
    """What the vision side did since the engine started (tests assert these exactly)."""

    vision_forwards: int = 0  # pictures that went through the tower
    vision_batches: int = 0  # tower calls
    loads: int = 0  # times the vision parts were loaded
    memory_releases: int = 0  # times freed memory was handed back to the operating system after large pictures


class PictureFeatures:
    """The vision side of an engine: what features a picture has under the current settings."""

    def __init__(self, settings: Settings, log: Callable[[str], None] | None = None):
        self.settings = settings
        self.log = log or logger.info
        self.cache = FeatureCache(feature_cache_bytes(settings))
        self.counters = Counters()
        self._vision: VisionParts | None = None
        self._vision_key: tuple | None = None
        self._load_lock = threading.Lock()
        self._encode_lock = threading.Lock()

    def configure(self, settings: Settings) -> None:
        """New settings: the vision parts reload on the next picture if their sources or placement changed."""
        self.settings = settings
        self.cache.resize(feature_cache_bytes(settings))

    def features_for(self, images: Sequence[PlacedItem], layouts: Sequence[str], choice: Choice, width: int,
                     notes: list[str] | None = None, scope: str | None = None) -> list[torch.Tensor]:
        """Each item's projected features [slots, width] in its layout (its family's ``arrange`` for the
        prompt: the same picture laid out otherwise has other features, cached apart), from the cache or
        as few tower batches as may be. ``scope``: whose cached features these are (None: shared)."""
        pipeline = choice.pipeline
        if not images:
            return []
        vision, vision_key = self._vision_and_key(choice)
        check(replace(vision.parts, llm_width=width), pipeline, {"parts": LOADER_FIX, "pipeline": LOADER_FIX},
              PipelineError)
        keys = [(image.item.digest(), layout, scope) + vision_key for image, layout in zip(images, layouts)]
        found = {key: self.cache.get(key) for key in dict.fromkeys(keys)}
        if any(v is None for v in found.values()):
            with self._encode_lock:
                for key in found:
                    if found[key] is None and key in self.cache:
                        found[key] = self.cache.get(key)
                todo = {key: image for key, image in zip(keys, images) if found[key] is None}
                for layout in dict.fromkeys(key[1] for key in todo):
                    same = [key for key in todo if key[1] == layout]
                    self._encode([todo[key] for key in same], same, layout, vision, found, notes)
        return [found[key] for key in keys]

    def _encode(self, images: list[PlacedItem], keys: list[tuple], layout: str, vision: VisionParts, found: dict,
                notes: list[str] | None) -> None:
        """Decode ``images`` and run them through the vision parts in ``layout``; their features go into
        ``found`` and the cache. What the decoding and the tower freed goes back to the operating system after."""
        pictures = []
        for image in images:
            picture = image.item.load()
            if notes is not None:
                notes.extend(picture.notes)
            pictures.append(picture.image)
        encoded = []
        for batch in vision.encode_batches(pictures, layout):
            encoded.extend(batch)
            self.counters.vision_batches += 1
        self.counters.vision_forwards += len(pictures)
        for key, feature in zip(keys, encoded):
            found[key] = feature = feature.clone()
            self.cache.put(key, feature)
        pixels = sum(picture.width * picture.height for picture in pictures)
        del pictures, encoded
        if release_freed_memory(pixels):
            self.counters.memory_releases += 1

    def vision_parts(self, choice: Choice) -> VisionParts:
        return self._vision_and_key(choice)[0]

    def _sources(self, choice: Choice) -> Sources:
        """The settings name a tower or projector; else the model folder's metadata; else the pipeline's."""
        s, pipeline = self.settings, choice.pipeline
        projector_repo = s.projector_repo or choice.projector_repo or pipeline.projector_repo
        if projector_repo is None:
            raise VisionLoadError(f"pipeline {pipeline.name} has no released projector to fall back on; "
                                  "set llava-projector_repo (a repo id or a local folder)")
        filename = s.projector_filename or (choice.projector_filename if not s.projector_repo else None) \
            or (pipeline.projector_filename if not choice.projector_repo else None)
        if not filename and not choice.projector_repo and not s.projector_repo:
            self.log(f"llava: no projector file is known for {pipeline.name}; reading it out of the full "
                     f"checkpoint {projector_repo} (a large download unless cached). Converting the model "
                     f"with {CONVERT_COMMAND} avoids this")
        return Sources(s.clip_repo or choice.vision_source or pipeline.vision_repo, projector_repo, filename)

    def _vision_and_key(self, choice: Choice) -> tuple[VisionParts, tuple]:
        """The vision parts for ``choice`` under the current settings, with the key of what they are
        (the features cache keys on it: a reconfigure during this call cannot mix the two)."""
        s = self.settings
        placement = Placement(s.clip_device, s.clip_dtype, s.projector_device, s.projector_dtype)
        pipeline = family_of(choice.pipeline).as_set(choice.pipeline, s.preprocess)
        with self._load_lock:
            sources = self._sources(choice)
            key = (pipeline, sources, str(placement))
            if self._vision_key != key:
                self._vision = None
                if "cpu" in (s.clip_device.type, s.projector_device.type) and 16 in (s.clip_bits, s.projector_bits):
                    self.log("llava: 16 bits on the CPU means bfloat16 (float16 matmuls are slow or unsupported there)")
                try:
                    self._vision = load_vision_parts(pipeline, family_of(pipeline), sources, placement, log=self.log)
                except LlavaError as error:
                    raise _naming_settings(error, s) from None
                self._vision_key = key
                self.counters.loads += 1
            return self._vision, key


def _naming_settings(error: LlavaError, settings: Settings) -> LlavaError:
    """A load that failed from a tower or projector the settings named says which settings those were."""
    named = [f"llava-{name} is {getattr(settings, name)!r}" for name in ("clip_repo", "projector_repo", "projector_filename")
             if getattr(settings, name)]
    if not named:
        return error
    message = f"{error} ({'; '.join(named)})"
    try:
        return type(error)(message)
    except TypeError:  # an error class of another shape
        return LlavaError(message)


def feature_cache_bytes(settings: Settings) -> int:
    return int(settings.cache_size_mb * 2**20)
