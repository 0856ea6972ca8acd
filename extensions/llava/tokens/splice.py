"""Where images stand in a token sequence, image-aware truncation, and the splice.

All of it works on whole tensors: slot positions come from one comparison against the
image token id, cut per image by the images' slot counts; the splice is one indexed assignment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LlavaError
from ..families.base import TokenLayout


class LayoutError(LlavaError):
    """The token ids do not hold the image slots the prompt asked for."""


@dataclass(frozen=True)
class ImageSpans:
    """Per item, in prompt order: its slot positions and the span of all its tokens."""

    slots: torch.Tensor  # [all slots] positions of the image tokens, image after image
    counts: torch.Tensor  # [n_images] slots of each image
    starts: torch.Tensor  # [n_images] first token of the image (its start token, if any)
    ends: torch.Tensor  # [n_images] one past its last token

    def slots_of(self, chosen: list[int]) -> torch.Tensor:
        """The slot positions of the items ``chosen`` (indices, in order), as one flat tensor."""
        if not chosen:
            return self.slots[:0]
        offsets = torch.cumsum(self.counts, 0) - self.counts
        return torch.cat([self.slots[int(offsets[i]):int(offsets[i] + self.counts[i])] for i in chosen])


def widen_image_slots(ids: torch.Tensor, layout: TokenLayout, counts: torch.Tensor) -> torch.Tensor:
    """[1, length] ids with one image token per image → the same ids with ``counts[i]`` of them for image i."""
    is_slot = ids[0] == layout.image_id
    if int(is_slot.sum()) != counts.numel():
        raise LayoutError(f"the prompt has {counts.numel()} item(s) but the tokenizer produced {int(is_slot.sum())} "
                          f"image tokens (id {layout.image_id}); the tokenizer does not keep the image token whole")
    repeats = torch.ones_like(ids[0])
    repeats[is_slot] = counts.to(repeats.dtype)
    return ids[0].repeat_interleave(repeats).unsqueeze(0)


def find_images(ids: torch.Tensor, layout: TokenLayout, counts: torch.Tensor) -> ImageSpans:
    """Locate items of ``counts`` slots each in 1-D ``ids``; anything else is a layout error."""
    slots = torch.nonzero(ids == layout.image_id).flatten()
    expected = counts.numel()
    if slots.numel() != int(counts.sum()):
        raise LayoutError(f"the prompt has {expected} item(s) of {int(counts.sum())} slots in all but the "
                          f"tokenizer produced {slots.numel()} image tokens (id {layout.image_id}); "
                          "the tokenizer does not keep the image token whole")
    firsts_at = torch.cumsum(counts, 0) - counts
    firsts, lasts = slots[firsts_at], slots[firsts_at + counts - 1]
    if expected and not bool((lasts - firsts == counts - 1).all()):
        raise LayoutError("an item's slots are not contiguous in the token ids")
    starts = firsts - int(layout.start_id is not None)
    ends = lasts + 1 + int(layout.end_id is not None)
    if expected:
        if layout.start_id is not None and not bool((starts >= 0).all() and (ids[starts.clamp(min=0)] == layout.start_id).all()):
            raise LayoutError("an item's start token is missing in the token ids")
        if layout.end_id is not None and not bool((ends <= ids.numel()).all()
                                                  and (ids[(ends - 1).clamp(max=ids.numel() - 1)] == layout.end_id).all()):
            raise LayoutError("an item's end token is missing in the token ids")
    return ImageSpans(slots, counts, starts, ends)


def truncation_cut(length: int, max_length: int | None, spans: ImageSpans) -> tuple[int, int]:
    """Where to cut the left side of ``length`` tokens to fit ``max_length``.

    Like the host, keep the last ``max_length`` tokens; a cut inside an image moves to the
    end of that image so that no partial image remains. Returns (cut, images dropped).
    """
    if max_length is None or max_length <= 0 or length <= max_length:
        return 0, 0
    cut = length - max_length
    inside = (spans.starts < cut) & (spans.ends > cut)
    if bool(inside.any()):
        cut = int(spans.ends[inside].max())
    dropped = int((spans.starts < cut).sum())
    return cut, dropped


def shift_spans(spans: ImageSpans, cut: int, dropped: int) -> ImageSpans:
    kept_slots = spans.slots[int(spans.counts[:dropped].sum()):]
    return ImageSpans(kept_slots - cut, spans.counts[dropped:], spans.starts[dropped:] - cut, spans.ends[dropped:] - cut)


def splice(embeds: torch.Tensor, slots: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Replace the embedding rows at ``slots`` ([n]) with ``features`` ([n, hidden]).

    ``embeds`` is [1, length, hidden], freshly looked up for this prompt: it is written in
    place (a copy of a 4k × 5120 prompt would cost more than the splice) and returned.
    """
    if slots.numel() == 0:
        return embeds
    if features.shape[0] != slots.numel() or features.shape[-1] != embeds.shape[-1]:
        raise LayoutError(f"{tuple(features.shape)} features for {slots.numel()} slots in "
                          f"{embeds.shape[-1]}-wide embeddings")
    embeds[0, slots.to(embeds.device)] = features.to(embeds.device, embeds.dtype)
    return embeds
