"""How many positions a prompt with pictures takes, counted without decoding or tokenizing a picture.

Each picture is tokenized as a one-slot stand-in: image tokens are added tokens, so the text around
them tokenizes the same, and each stand-in is then counted (or widened) to its picture's slots. The
slots of a picture whose family counts by size come from its header.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..families import family_of
from ..families.pipelines import Pipeline
from ..media.items import ItemError, MediaItem, UnknownItem
from ..prompt.parse import MEDIA_PLACEHOLDER, ParsedPrompt, PlacedItem, expand_prompt

Encode = Callable[[str], torch.Tensor]


def unknown_items(prompt: str) -> list[MediaItem]:
    return [UnknownItem()] * prompt.count(MEDIA_PLACEHOLDER)


def slot_counts(items: Sequence[PlacedItem], pipeline: Pipeline) -> torch.Tensor:
    """Each item's slot count, in the layout its family gives the prompt's items. A family that counts by
    size reads each item's header (a picture's size after its orientation, read without decoding a pixel).
    An unknown item counts at the most any item takes; one whose header cannot be read at the family's
    fixed count (it is refused if it is ever embedded)."""
    family = family_of(pipeline)
    layouts = family.arrange(pipeline, len(items))
    return torch.tensor([_slots(family, pipeline, placed, layout) for placed, layout in zip(items, layouts)],
                        dtype=torch.long)


def _slots(family, pipeline: Pipeline, placed: PlacedItem, layout: str) -> int:
    if not family.counts_by_size:
        return family.slot_count(pipeline, None, layout)
    if isinstance(placed.item, UnknownItem):
        return family.most_slots(pipeline, layout)
    try:
        return family.slot_count(pipeline, placed.item.header(), layout)
    except ItemError:
        return pipeline.feature_count


def stand_in_ids(parsed: ParsedPrompt, pipeline: Pipeline, encode: Encode) -> torch.Tensor:
    """The prompt's ids [1, length] with each picture as its one-slot stand-in."""
    ids = encode(expand_prompt(parsed, pipeline.image_stand_in(), pipeline.special_tokens))
    return ids.unsqueeze(0) if ids.dim() == 1 else ids


def prompt_length(parsed: ParsedPrompt, pipeline: Pipeline, encode: Encode) -> int:
    """The positions the prompt takes, each picture at its full count."""
    ids = stand_in_ids(parsed, pipeline, encode)
    return int(ids.shape[-1]) + int(slot_counts(parsed.items, pipeline).sum()) - len(parsed.items)
