"""LLaVA-OneVision (qwen2 0.5b/7b/72b, ov and si): a SigLIP-so400m tower and LLaVA-1.6's tiling with a
budget (``anyres_max_N``: a grid of more than N tiles' worth is scaled down to about that many), when a
picture is alone in its prompt. Among several, each picture is padded to a square of the mean colour and
seen as one view plus one newline, as transformers' ``LlavaOnevisionProcessor`` lays them out."""

from __future__ import annotations

import torch

from ..vision.processors import square_views
from .llava_next import TILED, Next

ONE_VIEW = "one view"


class OneVision(Next):
    name = "onevision"
    releases = ("onevision",)
    processor = "LlavaOnevisionImageProcessor"

    def claims(self, row: dict) -> bool:
        return bool(row["max_tiles"])

    def arrange(self, pipeline, count: int) -> list[str]:
        return [TILED] if count == 1 else [ONE_VIEW] * count

    def slot_count(self, pipeline, header, layout: str) -> int:
        return super().slot_count(pipeline, header, layout) if layout == TILED else pipeline.feature_count + 1

    def most_slots(self, pipeline, layout: str) -> int:
        return super().most_slots(pipeline, layout) if layout == TILED else pipeline.feature_count + 1

    def view_count(self, pipeline, header, layout: str) -> int:
        return super().view_count(pipeline, header, layout) if layout == TILED else 1

    def most_views(self, pipeline, layout: str) -> int:
        return super().most_views(pipeline, layout) if layout == TILED else 1

    def views(self, pipeline, processor, pictures, layout):
        if layout == TILED:
            return super().views(pipeline, processor, pictures, layout)
        return square_views(pictures, processor), [1] * len(pictures)

    def features(self, pipeline, projected, views, pictures, layout, newline):
        if layout == TILED:
            return super().features(pipeline, projected, views, pictures, layout, newline)
        ends = newline.to(projected.device, projected.dtype)[None]
        return [torch.cat([view, ends]) for view in projected]


FAMILY = OneVision()
