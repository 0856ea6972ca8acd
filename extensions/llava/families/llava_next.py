"""LLaVA-1.6 ("NeXT": vicuna-7b/13b, mistral-7b, 34b): pictures at any resolution. Each picture is seen as
the whole picture squashed to one view plus the tiles of the canvas that shows it best; the tiles'
features are laid out as one grid without its padding, a learned newline feature after each row. A
picture's slots follow from its size, so they are counted from its header."""

from __future__ import annotations

import functools

from ..vision.processors import tiled_views
from ..vision.tiling import Tiling
from .base import Family

TILED = "tiled"


@functools.lru_cache(maxsize=64)
def tiling_of(pipeline) -> Tiling:
    return Tiling(pipeline.grid_pinpoints, pipeline.image_size, pipeline.patches_per_side, pipeline.max_tiles)


@functools.lru_cache(maxsize=64)
def most_tiled_slots(pipeline) -> int:
    """Kept per pipeline: the search takes milliseconds, and the webui counts a prompt at each trimming step."""
    return pipeline.feature_count + tiling_of(pipeline).most_grid_slots()


class Next(Family):
    name = "next"
    releases = ("v1.6",)
    counts_by_size = True
    processor = "LlavaNextImageProcessor"  # transformers' processor that makes the views

    def claims(self, row: dict) -> bool:
        return bool(row["grid_pinpoints"]) and not row["max_tiles"]

    def arrange(self, pipeline, count: int) -> list[str]:
        return [TILED] * count

    def slot_count(self, pipeline, header, layout: str) -> int:
        return pipeline.feature_count + tiling_of(pipeline).grid_slots(*header)

    def most_slots(self, pipeline, layout: str) -> int:
        return most_tiled_slots(pipeline)

    def view_count(self, pipeline, header, layout: str) -> int:
        return tiling_of(pipeline).tile_count(*header)

    def most_views(self, pipeline, layout: str) -> int:
        return tiling_of(pipeline).most_views()

    def views(self, pipeline, processor, pictures, layout):
        return (tiled_views(pictures, processor, pipeline.grid_pinpoints, self.processor),
                [self.view_count(pipeline, picture.size, layout) for picture in pictures])

    def features(self, pipeline, projected, views, pictures, layout, newline):
        tiling = tiling_of(pipeline)
        return [tiling.pack(picture_views, *picture.size, newline)
                for picture_views, picture in zip(projected.split(views), pictures)]


FAMILY = Next()
