"""Any-resolution geometry, shared by the families that tile a picture (LLaVA-1.6, OneVision): the canvas a
picture is tiled onto, the window of the feature grid that shows the picture without its padding, a
budget that scales a large grid down, and laying the views' features out as one grid with a newline
feature after each row.

Everything but ``pack`` is computed from a picture's size alone, so a picture is counted from its
header without decoding it. Canvases are (height, width), as transformers reads ``grid_pinpoints``.
"""

from __future__ import annotations

import functools
import math

import torch

Pinpoints = tuple[tuple[int, int], ...]


@functools.lru_cache(maxsize=4096)
def best_canvas(width: int, height: int, pinpoints: Pinpoints) -> tuple[int, int]:
    """The (height, width) canvas of ``pinpoints`` that shows the picture at the highest resolution with
    the least waste, as transformers' LLaVA-NeXT picks it."""
    from transformers.image_processing_utils import select_best_resolution
    return tuple(select_best_resolution((height, width), [list(p) for p in pinpoints]))


def unpadded_window(width: int, height: int, rows: int, columns: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the feature grid ``rows`` × ``columns`` that shows the picture
    itself, without the padding added to fit it onto its canvas (rounded as transformers does)."""
    if width / height > columns / rows:
        shown = int(round(height * (columns / width), 7))
        padding = (rows - shown) // 2
        return padding, rows - padding, 0, columns
    shown = int(round(width * (rows / height), 7))
    padding = (columns - shown) // 2
    return 0, rows, padding, columns - padding


@functools.lru_cache(maxsize=4096)
def canvas_patches(width: int, height: int, pinpoints: Pinpoints, view: int, per_side: int) -> tuple[int, int]:
    """Patch rows and columns of the canvas that a picture of this size is tiled onto (views of ``view``
    pixels, ``per_side`` patches a side)."""
    canvas_height, canvas_width = best_canvas(width, height, pinpoints)
    return canvas_height // view * per_side, canvas_width // view * per_side


def within_budget(rows: int, columns: int, max_tiles: int, per_side: int) -> tuple[int, int]:
    """A feature grid scaled down to about ``max_tiles`` tiles' worth when it holds more than 1.1 times
    that (floor division of floats, as transformers and the original code scale); 0: no budget."""
    if max_tiles:
        ratio = math.sqrt(rows * columns / (max_tiles * per_side ** 2))
        if ratio > 1.1:
            return int(rows // ratio), int(columns // ratio)
    return rows, columns


class Tiling:
    """One family's tiling: its canvases, view size, patches per side and budget."""

    def __init__(self, pinpoints: Pinpoints, view: int, per_side: int, max_tiles: int = 0):
        self.pinpoints, self.view, self.per_side, self.max_tiles = pinpoints, view, per_side, max_tiles

    def patches(self, width: int, height: int) -> tuple[int, int]:
        return canvas_patches(width, height, self.pinpoints, self.view, self.per_side)

    def tile_count(self, width: int, height: int) -> int:
        """Views the tower sees for one picture: the base view and the canvas tiles."""
        rows, columns = self.patches(width, height)
        return 1 + rows * columns // self.per_side ** 2

    def grid_shape(self, width: int, height: int) -> tuple[int, int, tuple[int, int, int, int]]:
        """The (rows, columns) the feature grid keeps after the unpadded window and the budget, and that
        window (top, bottom, left, right) of the canvas."""
        rows, columns = self.patches(width, height)
        window = unpadded_window(width, height, rows, columns)
        return (*within_budget(window[1] - window[0], window[3] - window[2], self.max_tiles, self.per_side), window)

    def grid_slots(self, width: int, height: int) -> int:
        """Slots of the grid: its kept features and one newline per row."""
        rows, columns, _ = self.grid_shape(width, height)
        return rows * (columns + 1)

    def most_views(self) -> int:
        """The most views one picture can take: one that fills the largest canvas."""
        return max(1 + (h // self.view) * (w // self.view) for h, w in self.pinpoints)

    def most_grid_slots(self) -> int:
        """The most grid slots any picture can take: the largest of the grids an unpadded window can keep on
        any canvas (every full canvas, every narrower window)."""
        most = 0
        for height, width in self.pinpoints:
            rows, columns = height // self.view * self.per_side, width // self.view * self.per_side
            for kept in [(rows, c) for c in range(1, columns + 1)] + [(r, columns) for r in range(1, rows)]:
                kept_rows, kept_columns = within_budget(*kept, self.max_tiles, self.per_side)
                most = max(most, kept_rows * (kept_columns + 1))
        return most

    def pack(self, view_features: torch.Tensor, width: int, height: int, newline: torch.Tensor) -> torch.Tensor:
        """One tiled picture's projected view features [views, F, hidden] → its slots [slots, hidden]: the
        base view first, then the canvas grid without its padded rows or columns (scaled down bilinearly to
        the budget, if any), each row ending in the model's ``image_newline``."""
        base, grid = view_features[0], view_features[1:]
        side = self.per_side
        rows, columns = self.patches(width, height)
        hidden = grid.shape[-1]
        # tiles in reading order → one feature map of the whole canvas, [rows, columns, hidden]
        grid = grid.reshape(rows // side, columns // side, side, side, hidden).permute(0, 2, 1, 3, 4)
        grid = grid.reshape(rows, columns, hidden)
        kept_rows, kept_columns, (top, bottom, left, right) = self.grid_shape(width, height)
        grid = grid[top:bottom, left:right]
        if (kept_rows, kept_columns) != tuple(grid.shape[:2]):
            grid = torch.nn.functional.interpolate(grid.permute(2, 0, 1)[None], size=(kept_rows, kept_columns),
                                                   mode="bilinear")[0].permute(1, 2, 0)
        ends = newline.to(grid.device, grid.dtype).expand(grid.shape[0], 1, hidden)
        return torch.cat([base, torch.cat([grid, ends], dim=1).reshape(-1, hidden)])
