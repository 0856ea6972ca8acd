"""The kinds of vision tower the families use, and the one way to tell a tower's kind: from its config
(its ``model_type``) or, for an original LLaVA config that only names its tower, from that name."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TowerKind:
    """One kind of vision tower: transformers' classes for it, and whether its first feature is a CLS."""

    config_class: str
    model_class: str
    processor_class: str
    has_cls: bool


TOWER_KINDS = {"clip": TowerKind("CLIPVisionConfig", "CLIPVisionModel", "CLIPImageProcessor", True),
               "siglip": TowerKind("SiglipVisionConfig", "SiglipVisionModel", "SiglipImageProcessor", False)}


def tower_kind_of(vision_config: dict | None = None, name: str = "") -> str:
    """"clip" or "siglip": from a tower's config, else from the tower's name (a repo id or a folder)."""
    if vision_config is not None:
        return "siglip" if str(vision_config.get("model_type", "")).startswith("siglip") else "clip"
    return "siglip" if "siglip" in str(name).lower() else "clip"
