"""How many positions a prompt with pictures takes, counted without decoding or tokenizing a picture.

Each picture is tokenized as a one-slot stand-in: image tokens are added tokens, so the text around
them tokenizes the same, and each stand-in is then counted (or widened) to its picture's slots. The
slots of an any-resolution picture come from its header.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .images import ImageError, ImageSource
from .pipelines import Pipeline
from .preprocess import max_slot_count, slot_count
from .prompt import MEDIA_PLACEHOLDER, ImageRef, ParsedPrompt, expand_prompt

Encode = Callable[[str], torch.Tensor]


@dataclass(frozen=True, eq=False)
class UnseenPicture(ImageSource):
    """A picture that is only counted, never opened: a ``<__media__>`` placeholder whose picture is not known."""

    def digest(self) -> str:
        return ""


def unseen_pictures(prompt: str) -> list[ImageSource]:
    return [UnseenPicture()] * prompt.count(MEDIA_PLACEHOLDER)


def slot_counts(images: Sequence[ImageRef], pipeline: Pipeline) -> torch.Tensor:
    """Each picture's slot count. Any-resolution counts come from the picture's header: its size after
    its orientation, read without decoding a pixel, and whether it is alone in the prompt (OneVision lays
    several pictures out otherwise). An unseen picture counts at the most any picture takes; one whose
    header cannot be read at its base view alone (it is refused if it is ever embedded)."""
    if not pipeline.anyres:
        return torch.full((len(images),), pipeline.feature_count, dtype=torch.long)
    alone, counts = len(images) == 1, []
    for image in images:
        if isinstance(image.source, UnseenPicture):
            counts.append(max_slot_count(pipeline, alone))
            continue
        try:
            counts.append(slot_count(pipeline, *image.source.header(), alone))
        except ImageError:
            counts.append(pipeline.feature_count)
    return torch.tensor(counts, dtype=torch.long)


def stand_in_ids(parsed: ParsedPrompt, pipeline: Pipeline, encode: Encode) -> torch.Tensor:
    """The prompt's ids [1, length] with each picture as its one-slot stand-in."""
    ids = encode(expand_prompt(parsed, pipeline.image_stand_in(), pipeline.special_tokens))
    return ids.unsqueeze(0) if ids.dim() == 1 else ids


def prompt_length(parsed: ParsedPrompt, pipeline: Pipeline, encode: Encode) -> int:
    """The positions the prompt takes, each picture at its full count."""
    ids = stand_in_ids(parsed, pipeline, encode)
    return int(ids.shape[-1]) + int(slot_counts(parsed.images, pipeline).sum()) - len(parsed.images)
