"""Vision towers, CLIP or SigLIP: loaded from a tower's repo or folder, or from a llava-hf checkpoint's
``vision_config`` and ``vision_tower.*`` tensors; cut after the layer whose output LLaVA uses, so
that the model's last hidden state is that layer's output (SigLIP's final layer norm, which LLaVA's
features skip, is left out too). The converter writes a tower folder from a checkpoint's tensors
without building the model.
"""

from __future__ import annotations

import json
import os
import torch
from torch import nn

from ..errors import first_line
from .weights import (TOWER_PREFIXES, LazyTensor, WeightsError, quiet_transformers, read_tensors, resolve_file,
                      without_prefix, write_safetensors)
from .processors import load_image_processor
from .tower_kinds import TOWER_KINDS, tower_kind_of

LLAVA_HF_TYPES = ("llava", "llava_next", "llava_onevision", "llava_llama", "llava_mistral")


class VisionLoadError(WeightsError):
    """The vision tower or the projector could not be loaded."""


def _transformers_class(name: str):
    import transformers
    return getattr(transformers, name)


def load_vision_tower(source: str, kind: str = "clip", keep_layers_for: int = -2):
    """A vision tower of ``kind`` and its image processor from ``source``: a tower repo or folder (a full
    CLIP or SigLIP checkpoint loads its vision part) or a llava-hf checkpoint folder, whose
    ``vision_config`` and ``vision_tower.*`` tensors are used. The encoder keeps only the layers that
    the feature layer needs: the rest would be computed and thrown away."""
    try:
        with quiet_transformers():
            model = _load_tower_model(source, kind)
    except WeightsError:
        raise
    except Exception as error:
        raise VisionLoadError(f"could not load a {kind} vision tower from '{source}': "
                              f"{type(error).__name__}: {first_line(error)}") from None
    keep_encoder_layers(model, keep_layers_for)
    if hasattr(model, "post_layernorm") and not TOWER_KINDS[kind].has_cls:
        model.post_layernorm = nn.Identity()  # SigLIP's features are taken before its final norm
    processor = load_image_processor(source, TOWER_KINDS[kind].processor_class)
    return model.eval(), processor


def _load_tower_model(source: str, kind: str):
    config_path = os.path.join(source, "config.json") if os.path.isdir(source) else resolve_file(source, "config.json")
    with open(config_path) as f:
        raw_config = json.load(f)
    if raw_config.get("model_type") in LLAVA_HF_TYPES and "vision_config" in raw_config:
        state = read_tensors(source, lambda key: key.startswith(TOWER_PREFIXES))
        return tower_from_state(raw_config["vision_config"], state, f"the llava-hf checkpoint '{source}'")
    model_class = _transformers_class(TOWER_KINDS[kind].model_class)
    config = model_class.config_class.from_pretrained(source)
    if kind == "siglip":
        config.vision_use_head = False  # the pooling head is not LLaVA's
    return model_class.from_pretrained(source, config=config).float()


def tower_config(vision_config: dict):
    """transformers' config of the tower a llava-hf ``vision_config`` describes."""
    kind = TOWER_KINDS[tower_kind_of(vision_config)]
    values = {k: v for k, v in vision_config.items() if k != "model_type"}
    if kind.config_class == "SiglipVisionConfig":
        values["vision_use_head"] = False
    return _transformers_class(kind.config_class)(**values)


def tower_names(config) -> set[str]:
    """The tensor names of the tower ``config`` describes (its model built on the meta device: no memory)."""
    with torch.device("meta"):
        model = _transformers_class(type(config).__name__.replace("Config", "Model"))(config)
    return set(model.state_dict())


def renamed_tower_state(state: dict, expected: set[str], origin: str) -> dict:
    """``[model.]vision_tower.[vision_model.]*`` tensors under the names the tower model uses."""
    renamed = {}
    for key, tensor in state.items():
        key = without_prefix(key, TOWER_PREFIXES) or key
        if key not in expected and key.startswith("vision_model."):
            key = key[len("vision_model."):]
        elif key not in expected and "vision_model." + key in expected:
            key = "vision_model." + key
        if key in expected:
            renamed[key] = tensor
    missing = {k for k in expected - set(renamed) if not k.endswith("position_ids")}
    if missing:
        raise VisionLoadError(f"{origin} lacks vision tower tensors, e.g. {sorted(missing)[:3]}")
    return renamed


def tower_from_state(vision_config: dict, state: dict, origin: str):
    """A tower model from a llava-hf ``vision_config`` and its ``[model.]vision_tower.*`` tensors."""
    config = tower_config(vision_config)
    model = _transformers_class(type(config).__name__.replace("Config", "Model"))(config)
    model.load_state_dict(renamed_tower_state(state, set(model.state_dict()), origin), strict=False)
    return model


def save_tower(folder: str, vision_config: dict, state: dict, processor, origin: str) -> None:
    """A tower folder (config, weights, image processor) from a llava-hf checkpoint's tower tensors,
    written a tensor at a time without building the model."""
    config = tower_config(vision_config)
    renamed = renamed_tower_state(state, tower_names(config), origin)
    os.makedirs(folder, exist_ok=True)
    config.architectures = [type(config).__name__.replace("Config", "Model")]
    dtype = next(iter(renamed.values())).dtype if renamed else torch.float32
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(folder)
    write_safetensors(os.path.join(folder, "model.safetensors"),
                      [LazyTensor(key, t.dtype, tuple(t.shape), lambda t=t: t) for key, t in sorted(renamed.items())],
                      {"format": "pt"})
    processor.save_pretrained(folder)


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
