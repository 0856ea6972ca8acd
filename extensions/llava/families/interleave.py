"""llava-interleave (qwen 0.5b, 7b): a SigLIP-so400m tower whose processor squashes each picture to one
384 px view, 729 slots a picture."""

from __future__ import annotations

from ..vision.processors import fixed_views
from .base import Family


class Interleave(Family):
    name = "interleave"
    releases = ("interleave",)

    def claims(self, row: dict) -> bool:
        return row["tower"] == "siglip" and not row["grid_pinpoints"]

    def views(self, pipeline, processor, pictures, layout):
        return fixed_views(pictures, processor, pad=False), [1] * len(pictures)


FAMILY = Interleave()
