"""The first LLaVA families: v0 (7b, 13b), llava-llama-2, v1.5 (7b, 13b), BakLLaVA-1 and the bundled demo.
A CLIP tower, one view per picture (centre-cropped, or padded to a square for v1.5), a fixed number of
slots per picture, however many a prompt holds."""

from __future__ import annotations

from dataclasses import replace

from ..vision.processors import fixed_views
from .base import Family


class Llava(Family):
    name = "llava"
    releases = ("v0", "llama-2", "v1.5", "demo")

    def claims(self, row: dict) -> bool:
        return row["tower"] == "clip" and not row["grid_pinpoints"]

    def release_of(self, row: dict) -> str:
        return "v1.5" if row["image_size"] == 336 else "v0"

    def default_preprocess(self, row: dict) -> str:
        # v1.5 was trained on pictures padded to a square, v0 on centre crops
        return "pad" if self.release_of(row) == "v1.5" else "crop"

    def as_set(self, pipeline, preprocess: str):
        # v1.5 was trained on padded squares; its llava-hf processor resizes and centre-crops instead
        return replace(pipeline, preprocess="crop") if preprocess == "as_processor" and pipeline.preprocess == "pad" \
            else pipeline

    def views(self, pipeline, processor, pictures, layout):
        return fixed_views(pictures, processor, pad=pipeline.preprocess == "pad"), [1] * len(pictures)


FAMILY = Llava()
