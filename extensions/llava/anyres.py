"""Any-resolution pictures (LLaVA-NeXT): the tiles the tower sees, and how their projected
features are laid out as one picture's image slots.

Each picture becomes its whole self squashed to one view (the base view) plus the tiles of
the canvas it is resized and padded onto. The tiles' features form one grid; the rows and
columns that show only padding are cut away, each remaining row ends in the learned
``image_newline`` feature, and the base view's features come first. The slot count of a
picture therefore depends on its size: ``Pipeline.slot_count`` computes it from the size
alone, and ``pack`` lays the features out to exactly that count.
"""

from __future__ import annotations

import functools

import torch

from .pipelines import Pipeline, unpadded_window
from .weights import image_processor_from


@functools.lru_cache(maxsize=4)
def tile_processor(processor, pinpoints: tuple[tuple[int, int], ...]):
    """transformers' LLaVA-NeXT image processor with the CLIP processor's settings and the pipeline's
    canvases."""
    return image_processor_from(processor.to_dict(), "LlavaNextImageProcessor",
                                image_grid_pinpoints=[list(p) for p in pinpoints], do_pad=False)


def tiles(images, processor, pipeline: Pipeline) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """RGB pictures → all their views in one pixel batch [sum of views, 3, S, S], and each picture's size."""
    processor = tile_processor(processor, pipeline.grid_pinpoints)
    views, sizes = [], []
    for image in images:  # one at a time: a batch would pad every picture to the most views
        batch = processor(images=[image], return_tensors="pt")
        views.append(batch["pixel_values"][0])
        sizes.append(image.size)
    return torch.cat(views), sizes


def pack(view_features: torch.Tensor, width: int, height: int, pipeline: Pipeline,
         newline: torch.Tensor) -> torch.Tensor:
    """One picture's projected view features [views, F, hidden] → its slots [slot_count, hidden]."""
    base, grid = view_features[0], view_features[1:]
    side = pipeline.patches_per_side
    rows, columns = pipeline.canvas_patches(width, height)
    hidden = grid.shape[-1]
    # tiles in reading order → one feature map of the whole canvas, [rows, columns, hidden]
    grid = grid.reshape(rows // side, columns // side, side, side, hidden).permute(0, 2, 1, 3, 4)
    grid = grid.reshape(rows, columns, hidden)
    top, bottom, left, right = unpadded_window(width, height, rows, columns)
    grid = grid[top:bottom, left:right]
    ends = newline.to(grid.device, grid.dtype).expand(grid.shape[0], 1, hidden)
    return torch.cat([base, torch.cat([grid, ends], dim=1).reshape(-1, hidden)])
