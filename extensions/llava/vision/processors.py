"""From RGB pictures to the pixel views a vision tower sees: transformers' own image processors, built
from the tower's processor settings (its ``preprocessor_config.json``) in their PIL variant (the webui
has no torchvision, and PIL's resizing is the reference's), and the three ways the families use them:

- ``fixed_views``: one view per picture, the processor as it stands (resize the short side, centre
  crop), or padded to a square of the processor's mean colour first (LLaVA v1.5);
- ``tiled_views``: the whole picture squashed to one view plus the tiles of the canvas that shows it
  best (an any-resolution processor: LLaVA-NeXT's or OneVision's);
- ``square_views``: each picture padded to a square of the mean colour, one view (OneVision's pictures
  when a prompt holds several).
"""

from __future__ import annotations

import functools
import json
import os

import torch

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


def fixed_views(images, processor, pad: bool) -> torch.Tensor:
    """RGB pictures → one pixel batch [n, 3, S, S], one view per picture: the processor as it stands, or
    each picture padded to a square of the mean colour first (``pad``)."""
    if pad:
        images = [limit_padded_side(image) for image in images]
        processor = padding_processor(processor)
    elif getattr(processor, "do_center_crop", False):
        images = [limit_aspect_ratio(image) for image in images]
    try:
        batch = processor(images=images, return_tensors="pt", input_data_format="channels_last")
    except TypeError:  # transformers before 4.31 has no input_data_format and always sees channels last
        batch = processor(images=images, return_tensors="pt")
    return batch["pixel_values"]


def tiled_views(images, processor, pinpoints, name: str = "") -> torch.Tensor:
    """RGB pictures → all their any-resolution views in one pixel batch [sum of views, 3, S, S], made by
    transformers' any-resolution processor ``name`` (LLaVA-NeXT's by default) on ``pinpoints``."""
    processor = tile_processor(processor, pinpoints, name)
    views = [processor(images=[image], return_tensors="pt")["pixel_values"][0]  # one at a time: a batch
             for image in images]                                                # pads each to the most views
    return torch.cat(views)


def square_views(images, processor) -> torch.Tensor:
    """RGB pictures → one view each [n, 3, S, S]: padded to a square of the mean colour (truncated to
    0..255), then resized (LLaVA v1.5's padding, with the tower's settings)."""
    return padding_processor(processor)(images=list(images), return_tensors="pt")["pixel_values"]
