"""How many positions a prompt with pictures takes, counted without decoding or tokenizing a picture.

Each picture is tokenized as a one-slot stand-in: image tokens are added tokens, so the text around
them tokenizes the same, and each stand-in is then counted (or widened) to its picture's slots. The
slots of a picture whose family counts by size come from its header.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..media.sources import ImageError, ImageSource
from ..families import family_of
from ..families.pipelines import Pipeline
from ..prompt.parse import MEDIA_PLACEHOLDER, ImageRef, ParsedPrompt, expand_prompt

Encode = Callable[[str], torch.Tensor]


@dataclass(frozen=True, eq=False)
class UnknownPicture(ImageSource):
    """A picture that is only counted, never opened: a ``<__media__>`` placeholder whose picture is not known."""

    def digest(self) -> str:
        return ""


def unknown_pictures(prompt: str) -> list[ImageSource]:
    return [UnknownPicture()] * prompt.count(MEDIA_PLACEHOLDER)


def slot_counts(images: Sequence[ImageRef], pipeline: Pipeline) -> torch.Tensor:
    """Each picture's slot count, in the layout its family gives the prompt's pictures. A family that
    counts by size reads each picture's header: its size after its orientation, read without decoding a
    pixel. An unknown picture counts at the most any picture takes; one whose header cannot be read at its
    base view alone (it is refused if it is ever embedded)."""
    family = family_of(pipeline)
    layouts = family.arrange(pipeline, len(images))
    return torch.tensor([_slots(family, pipeline, image, layout) for image, layout in zip(images, layouts)],
                        dtype=torch.long)


def _slots(family, pipeline: Pipeline, image: ImageRef, layout: str) -> int:
    if not family.counts_by_size:
        return family.slot_count(pipeline, None, layout)
    if isinstance(image.source, UnknownPicture):
        return family.most_slots(pipeline, layout)
    try:
        return family.slot_count(pipeline, image.source.header(), layout)
    except ImageError:
        return pipeline.feature_count


def stand_in_ids(parsed: ParsedPrompt, pipeline: Pipeline, encode: Encode) -> torch.Tensor:
    """The prompt's ids [1, length] with each picture as its one-slot stand-in."""
    ids = encode(expand_prompt(parsed, pipeline.image_stand_in(), pipeline.special_tokens))
    return ids.unsqueeze(0) if ids.dim() == 1 else ids


def prompt_length(parsed: ParsedPrompt, pipeline: Pipeline, encode: Encode) -> int:
    """The positions the prompt takes, each picture at its full count."""
    ids = stand_in_ids(parsed, pipeline, encode)
    return int(ids.shape[-1]) + int(slot_counts(parsed.images, pipeline).sum()) - len(parsed.images)
