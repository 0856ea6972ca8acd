"""Media items and their kinds: ``KINDS`` lists every kind an item can be, and the lookups below find
the one a data URL type or an OpenAI content part names."""

from __future__ import annotations

from .kinds import Kind
from .pictures import PICTURE

KINDS: tuple[Kind, ...] = (PICTURE,)


def kinds() -> tuple[Kind, ...]:
    return KINDS


def kind_of_media_type(media_type: str) -> Kind | None:
    return next((kind for kind in KINDS if media_type.startswith(kind.media_type)), None)


def kind_of_part(part_type) -> Kind | None:
    return next((kind for kind in KINDS if kind.part == part_type), None)
