"""From RGB pictures to the pixel views the vision tower sees, and how many image slots each
picture takes: the counterpart of transformers' ``image_processing_*`` and the processors' counting.

A pipeline's ``preprocess`` names one of three ways:

- ``crop``: the tower's image processor as it stands (resize the short side, centre crop);
- ``pad``: pad the picture to a square of the processor's mean colour first (LLaVA v1.5);
- ``anyres``: the whole picture squashed to one view (the base view) plus the tiles of the canvas
  (from the pipeline's ``grid_pinpoints``) that shows it largest with the least padding (LLaVA-1.6);
  with ``max_tiles`` (LLaVA-OneVision's ``anyres_max_N``) a grid of more than that many tiles'
  worth of features is later scaled down to about that many.

A OneVision prompt that holds several pictures lays each out otherwise (``several_pictures``
"pad"): padded to a square of the mean colour, one view, no tiles. So a picture's slots depend on
whether it is alone in its prompt; every count here says which (``alone``).

The image processors are transformers' own, built from the tower's processor settings (its
``preprocessor_config.json``), in their PIL variant: the webui has no torchvision, and PIL's resizing
is the reference's. The geometry of any-resolution pictures (the canvas, the unpadded window of
the feature grid, the slot count) is computed from a picture's size alone, so a picture is counted
from its header without decoding it.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import replace

import torch

from .pipelines import Pipeline
from .weights import WeightsError

# A picture whose sides differ more than this is cut (crop) or shrunk (pad) first, so that
# preprocessing never builds a huge intermediate image; ordinary pictures are untouched.
MAX_ASPECT_RATIO = 8
MAX_PADDED_SIDE = 4096


# ---------------------------------------------------------------- image processors


def image_processor_class(name: str):
    """transformers' image processor class ``name``, its PIL variant where there is one."""
    import transformers
    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def image_processor_from(settings: dict, name: str, **overrides):
    """Image processor ``name`` with another processor's ``settings`` (its ``to_dict()``) and ``overrides``;
    settings that class does not take are left out."""
    processor_class = image_processor_class(name)
    known = set(getattr(processor_class, "valid_kwargs", type("", (), {"__annotations__": {}})).__annotations__)
    kept = {k: v for k, v in settings.items() if k not in ("image_processor_type", "processor_class", *overrides)
            and (not known or k in known)}
    return processor_class(**kept, **overrides)


def load_image_processor(source: str, name: str = "CLIPImageProcessor"):
    """The tower's image processor ``name`` with the settings of ``source`` (a repo or folder): its
    ``preprocessor_config.json``, or the one nested in ``processor_config.json`` (transformers 5 writes
    that for llava-hf). The settings, never the class's defaults, give the mean and std: SigLIP towers
    use 0.5 where a OneVision processor's class default is CLIP's."""
    nested_path = os.path.join(source, "processor_config.json")
    try:
        if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "preprocessor_config.json")) \
                and os.path.isfile(nested_path):
            with open(nested_path) as f:
                settings = json.load(f)["image_processor"]
        else:
            from transformers import ImageProcessingMixin
            settings = ImageProcessingMixin.get_image_processor_dict(source)[0]
        return image_processor_from(settings, name)
    except Exception as error:
        raise WeightsError(f"could not load the image processor of '{source}' ({type(error).__name__}); "
                           "it needs a preprocessor_config.json (copy the one of its vision tower)") from None


@functools.lru_cache(maxsize=4)
def padding_processor(processor):
    """transformers' LLaVA image processor with the tower's settings and ``do_pad``: it pads each
    picture to a square of the mean colour (truncated to 0..255, as LLaVA v1.5 trained), then resizes."""
    return image_processor_from(processor.to_dict(), "LlavaImageProcessor", do_pad=True,
                                do_center_crop=bool(getattr(processor, "do_center_crop", False)))


@functools.lru_cache(maxsize=4)
def tile_processor(processor, pinpoints: tuple[tuple[int, int], ...], name: str = ""):
    """transformers' any-resolution image processor ``name`` (LLaVA-NeXT's by default) with the tower's
    settings and the pipeline's canvases."""
    return image_processor_from(processor.to_dict(), name or "LlavaNextImageProcessor",
                                image_grid_pinpoints=[list(p) for p in pinpoints], do_pad=False)


# ---------------------------------------------------------------- pixel views


def limit_padded_side(image):
    """Shrink a picture whose long side exceeds MAX_PADDED_SIDE, so that its padded square stays small."""
    from PIL import Image
    width, height = image.size
    side = max(width, height)
    if side <= MAX_PADDED_SIDE:
        return image
    scale = MAX_PADDED_SIDE / side
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)


def limit_aspect_ratio(image):
    """Cut the middle of a very long picture: a centre crop only looks at the middle anyway."""
    width, height = image.size
    if width > MAX_ASPECT_RATIO * height:
        keep = MAX_ASPECT_RATIO * height
        left = (width - keep) // 2
        return image.crop((left, 0, left + keep, height))
    if height > MAX_ASPECT_RATIO * width:
        keep = MAX_ASPECT_RATIO * width
        top = (height - keep) // 2
        return image.crop((0, top, width, top + keep))
    return image


def as_preprocessed(pipeline: Pipeline, preprocess: str) -> Pipeline:
    """The pipeline as the ``preprocess`` setting has it: ``as_processor`` leaves out the padding to a square
    (LLaVA v1.5's training) and follows the tower's image processor (resize, centre crop), as transformers'
    ``LlavaProcessor`` and vLLM do with a llava-hf checkpoint. The other ways are the processors' own."""
    if preprocess == "as_processor" and pipeline.preprocess == "pad":
        return replace(pipeline, preprocess="crop")
    return pipeline


def one_view_each(images, processor, pipeline: Pipeline) -> torch.Tensor:
    """RGB pictures → one pixel batch [n, 3, S, S], one view per picture (``crop`` and ``pad``)."""
    if pipeline.preprocess == "pad":
        images = [limit_padded_side(image) for image in images]
        processor = padding_processor(processor)
    elif getattr(processor, "do_center_crop", False):
        images = [limit_aspect_ratio(image) for image in images]
    try:
        batch = processor(images=images, return_tensors="pt", input_data_format="channels_last")
    except TypeError:  # transformers before 4.31 has no input_data_format and always sees channels last
        batch = processor(images=images, return_tensors="pt")
    return batch["pixel_values"]


def tiled_views(images, processor, pipeline: Pipeline) -> torch.Tensor:
    """RGB pictures → all their any-resolution views in one pixel batch [sum of views, 3, S, S]."""
    processor = tile_processor(processor, pipeline.grid_pinpoints, pipeline.view_processor)
    views = [processor(images=[image], return_tensors="pt")["pixel_values"][0]  # one at a time: a batch
             for image in images]                                                # pads each to the most views
    return torch.cat(views)


def square_views(images, processor) -> torch.Tensor:
    """RGB pictures of a prompt that holds several → one view each [n, 3, S, S]: padded to a square of the
    mean colour (truncated to 0..255), then resized, as OneVision's processor does with several pictures
    (LLaVA v1.5's padding, with the tower's settings)."""
    return padding_processor(processor)(images=list(images), return_tensors="pt")["pixel_values"]


def pixel_views(images, processor, pipeline: Pipeline, alone: bool = True) -> tuple[torch.Tensor, list[int]]:
    """RGB pictures → the views the tower sees, in one batch, and how many of them belong to each picture.
    ``alone``: whether the prompt holds only one picture (OneVision lays several out otherwise)."""
    if not pipeline.anyres:
        return one_view_each(images, processor, pipeline), [1] * len(images)
    if not alone and pipeline.several_pictures == "pad":
        return square_views(images, processor), [1] * len(images)
    return tiled_views(images, processor, pipeline), [tile_count(pipeline, *image.size) for image in images]


# ---------------------------------------------------------------- any-resolution geometry


def best_canvas(width: int, height: int, pinpoints) -> tuple[int, int]:
    """The (height, width) canvas of ``pinpoints`` that shows the picture at the highest resolution with
    the least waste, as transformers' LLaVA-NeXT picks it (pinpoints read as (height, width))."""
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


def canvas_patches(pipeline: Pipeline, width: int, height: int) -> tuple[int, int]:
    """Patch rows and columns of the canvas that a picture of this size is tiled onto."""
    canvas_height, canvas_width = best_canvas(width, height, pipeline.grid_pinpoints)
    side = pipeline.patches_per_side
    return canvas_height // pipeline.image_size * side, canvas_width // pipeline.image_size * side


def tiled(pipeline: Pipeline, alone: bool = True) -> bool:
    """Whether a picture is tiled: any resolution, unless its prompt holds several and the pipeline then
    lays each out as one padded view."""
    return pipeline.anyres and (alone or pipeline.several_pictures != "pad")


def tile_count(pipeline: Pipeline, width: int, height: int, alone: bool = True) -> int:
    """Views the tower sees for one picture: the base view, plus the canvas tiles if it is tiled."""
    if not tiled(pipeline, alone):
        return 1
    rows, columns = canvas_patches(pipeline, width, height)
    return 1 + rows * columns // pipeline.patches_per_side ** 2


def grid_shape(pipeline: Pipeline, width: int, height: int) -> tuple[int, int, tuple[int, int, int, int]]:
    """A tiled picture's feature grid: the (rows, columns) it keeps after the unpadded window and any
    scaling down to the pipeline's budget, and that window (top, bottom, left, right) of the canvas."""
    rows, columns = canvas_patches(pipeline, width, height)
    window = unpadded_window(width, height, rows, columns)
    return (*within_budget(pipeline, window[1] - window[0], window[3] - window[2]), window)


def within_budget(pipeline: Pipeline, rows: int, columns: int) -> tuple[int, int]:
    """A feature grid scaled down to about ``max_tiles`` tiles' worth when it holds more than 1.1 times
    that (floor division of floats, as transformers and the original code scale)."""
    if pipeline.max_tiles:
        ratio = math.sqrt(rows * columns / (pipeline.max_tiles * pipeline.patches_per_side ** 2))
        if ratio > 1.1:
            return int(rows // ratio), int(columns // ratio)
    return rows, columns


def slot_count(pipeline: Pipeline, width: int, height: int, alone: bool = True) -> int:
    """Image slots of a ``width`` × ``height`` picture: ``feature_count``; for a tiled picture also its
    feature grid and one newline slot per grid row; for a OneVision picture among several, one newline."""
    if not pipeline.anyres:
        return pipeline.feature_count
    if not tiled(pipeline, alone):
        return pipeline.feature_count + 1
    rows, columns, _ = grid_shape(pipeline, width, height)
    return pipeline.feature_count + rows * (columns + 1)


def max_views(pipeline: Pipeline) -> int:
    """The most views the tower sees for one picture: one that fills the largest canvas."""
    return max((tile_count(pipeline, w, h) for h, w in pipeline.grid_pinpoints), default=1)


@functools.lru_cache(maxsize=64)
def max_slot_count(pipeline: Pipeline, alone: bool = True) -> int:
    """The most slots any picture can take (what an unseen picture is counted at): the largest of the
    grids an unpadded window can keep on any canvas (every full canvas, every narrower window). Kept per
    pipeline: the search takes milliseconds, and the webui counts a prompt again at each trimming step."""
    if not tiled(pipeline, alone):
        return slot_count(pipeline, 1, 1, alone)
    most = 0
    for height, width in pipeline.grid_pinpoints:
        rows, columns = height // pipeline.image_size * pipeline.patches_per_side, \
            width // pipeline.image_size * pipeline.patches_per_side
        for kept_rows, kept_columns in [(rows, c) for c in range(1, columns + 1)] + [(r, columns) for r in range(1, rows)]:
            kept_rows, kept_columns = within_budget(pipeline, kept_rows, kept_columns)
            most = max(most, kept_rows * (kept_columns + 1))
    return pipeline.feature_count + most
