"""The model families, one module each, and the one way to reach them: ``family_of(pipeline)``.

Adding a family: a module here with a ``FAMILY`` (a ``base.Family``), its row in ``FAMILIES``, its
pipelines in ``pipelines.py`` when it has released ones, and its tests.
"""

from __future__ import annotations

from ..errors import LlavaError
from . import interleave, llava, llava_next, onevision
from .base import Family

# The order recognition asks them in: the first that claims a checkpoint's row has it.
FAMILIES: tuple[Family, ...] = (onevision.FAMILY, llava_next.FAMILY, interleave.FAMILY, llava.FAMILY)
_BY_RELEASE = {release: family for family in FAMILIES for release in family.releases}


def family_of(pipeline) -> Family:
    try:
        return _BY_RELEASE[pipeline.family]
    except KeyError:
        raise LlavaError(f"pipeline {pipeline.name} names the family {pipeline.family!r}, which the extension does "
                         f"not know; known: {', '.join(_BY_RELEASE)}") from None


def family_claiming(row: dict) -> Family:
    """The family of the vision side a LLaVA config describes (the first LLaVA family, else)."""
    return next((family for family in FAMILIES if family.claims(row)), llava.FAMILY)


def _in_prompt(pipeline, among: int):
    """The pipeline's family, and the layout it gives the last of a prompt's ``among`` items."""
    family = family_of(pipeline)
    return family, family.arrange(pipeline, among)[-1]


def slot_count(pipeline, width: int, height: int, among: int = 1) -> int:
    """Image slots of a ``width`` × ``height`` picture in a prompt of ``among`` items."""
    family, layout = _in_prompt(pipeline, among)
    return family.slot_count(pipeline, (width, height), layout)


def view_count(pipeline, width: int, height: int, among: int = 1) -> int:
    """Views the tower sees for a ``width`` × ``height`` picture in a prompt of ``among`` items."""
    family, layout = _in_prompt(pipeline, among)
    return family.view_count(pipeline, (width, height), layout)


def max_slot_count(pipeline, among: int = 1) -> int:
    """The most slots a picture can take in a prompt of ``among`` items."""
    family, layout = _in_prompt(pipeline, among)
    return family.most_slots(pipeline, layout)
