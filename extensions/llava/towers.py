"""Vision towers: a CLIP vision model from a CLIP repo or folder, or from a llava-hf checkpoint's
``vision_config`` and ``vision_tower.*`` tensors; cut after the layer whose output LLaVA uses."""

from __future__ import annotations

import json
import os

from torch import nn

from .errors import first_line
from .preprocess import load_image_processor
from .weights import TOWER_PREFIXES, WeightsError, quiet_transformers, read_tensors, resolve_file, without_prefix

LLAVA_HF_TYPES = ("llava", "llava_llama", "llava_mistral")


class VisionLoadError(WeightsError):
    """The vision tower or the projector could not be loaded."""


def load_vision_tower(source: str, keep_layers_for: int = -2):
    """A CLIPVisionModel and its image processor from ``source``.

    ``source`` is a CLIP repo or folder (a full CLIP checkpoint loads its vision part) or a
    llava-hf checkpoint folder, whose ``vision_config`` and ``vision_tower.*`` tensors are used.
    The encoder keeps only the layers that the feature layer needs: the rest would be
    computed and thrown away.
    """
    from transformers import CLIPVisionModel
    try:
        with quiet_transformers():
            model = _load_tower_model(source, CLIPVisionModel)
    except WeightsError:
        raise
    except Exception as error:
        raise VisionLoadError(f"could not load a CLIP vision tower from '{source}': "
                              f"{type(error).__name__}: {first_line(error)}") from None
    keep_encoder_layers(model, keep_layers_for)
    processor = load_image_processor(source)
    return model.eval(), processor


def _load_tower_model(source: str, model_class):
    config_path = os.path.join(source, "config.json") if os.path.isdir(source) else resolve_file(source, "config.json")
    with open(config_path) as f:
        raw_config = json.load(f)
    if raw_config.get("model_type") in LLAVA_HF_TYPES and "vision_config" in raw_config:
        state = read_tensors(source, lambda key: key.startswith(TOWER_PREFIXES))
        return clip_vision_from_state(raw_config["vision_config"], state, f"the llava-hf checkpoint '{source}'")
    return model_class.from_pretrained(source).float()


def clip_vision_from_state(vision_config: dict, state: dict, origin: str):
    """A CLIPVisionModel from a llava-hf ``vision_config`` and its ``[model.]vision_tower.*`` tensors."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    config = CLIPVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
    model = CLIPVisionModel(config)
    expected = set(model.state_dict())
    renamed = {}
    for key, tensor in state.items():
        key = without_prefix(key, TOWER_PREFIXES) or key
        if key not in expected and key.startswith("vision_model."):
            key = key[len("vision_model."):]
        elif key not in expected and "vision_model." + key in expected:
            key = "vision_model." + key
        renamed[key] = tensor
    missing = {k for k in expected - set(renamed) if not k.endswith("position_ids")}
    if missing:
        raise VisionLoadError(f"{origin} lacks vision tower tensors, e.g. {sorted(missing)[:3]}")
    model.load_state_dict(renamed, strict=False)
    return model


def encoder_layers(model) -> nn.ModuleList:
    inner = getattr(model, "vision_model", None)  # transformers 4.x nests the tower one level deeper
    return (inner if isinstance(inner, nn.Module) else model).encoder.layers


def keep_encoder_layers(model, feature_layer: int) -> None:
    """Drop the encoder layers after the one whose output is ``hidden_states[feature_layer]``."""
    layers = encoder_layers(model)
    needed = feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer
    if not 0 <= needed <= len(layers):
        raise VisionLoadError(f"feature layer {feature_layer} does not exist in a {len(layers)}-layer tower")
    del layers[needed:]
    model.config.num_hidden_layers = needed


def tower_geometry(tower) -> dict:
    """What a loaded tower's config says about its features: width, view size and patches per view."""
    config = tower.config
    return {"tower_width": config.hidden_size, "tower_image_size": config.image_size,
            "tower_grid": (config.image_size // config.patch_size) ** 2}
