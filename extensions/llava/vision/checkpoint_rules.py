"""The rules a LLaVA checkpoint's parts obey, among themselves and with their pipeline: one set, used
where the vision side is loaded (at the first picture) and where a checkpoint is converted.

``Parts`` holds what the files say (None where they say nothing). Each rule says when it is broken
and what is then wrong, in plain words. A rule of kind "parts" finds files that disagree with each
other; one of kind "pipeline" finds parts that do not fit the pipeline. What to do about it differs by caller (a
setting in the webui, ``--pipeline`` in the converter), so ``check`` takes those words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import LlavaError

# Exact GELU, or none at all (a v0 linear projector written as llava-hf's two layers).
PROJECTOR_ACTIVATIONS = ("gelu", "linear", "identity")


@dataclass(frozen=True)
class Parts:
    """A checkpoint's vision side as its files describe it; None where they do not say."""

    projector_type: str
    projector_in: int
    projector_out: int
    newline_shape: tuple[int, ...] | None = None  # LLaVA-NeXT's image_newline, when there is one
    tower_width: int | None = None
    tower_grid: int | None = None  # patches per view
    tower_image_size: int | None = None
    llm_width: int | None = None
    config_width: int | None = None  # the width the config says the projector takes (mm_hidden_size)
    feature_layer: int | None = None
    keeps_cls: bool | None = None
    activation: str | None = None
    image_token: str | None = None  # the text of the token the config puts features at
    start_end: bool | None = None  # whether the config puts start and end tokens around a picture


@dataclass(frozen=True)
class Rule:
    kind: str  # "parts": files that disagree with each other; "pipeline": parts that do not fit the pipeline
    broken: Callable[[Parts, object], bool]  # (the parts, the pipeline row)
    says: str  # what is wrong; {p} stands for the parts, {q} for the pipeline


RULES = (
    Rule("pipeline", lambda p, q: p.projector_type != q.projector_type,
         "the projector is {p.projector_type} but pipeline {q.name} uses {q.projector_type}"),
    Rule("pipeline", lambda p, q: p.activation not in (None, *PROJECTOR_ACTIVATIONS),
         "the projector uses the activation {p.activation!r}; pipeline {q.name} (like every LLaVA release) uses "
         "exact GELU, so it cannot be used faithfully"),
    Rule("parts", lambda p, q: p.tower_width not in (None, p.projector_in),
         "the projector takes {p.projector_in}-wide features but the vision tower gives {p.tower_width}-wide ones "
         "(pipeline {q.name})"),
    Rule("parts", lambda p, q: p.config_width not in (None, p.projector_in),
         "the projector takes {p.projector_in}-wide features but mm_hidden_size is {p.config_width} "
         "(pipeline {q.name})"),
    Rule("parts", lambda p, q: p.llm_width not in (None, p.projector_out),
         "the projector gives {p.projector_out}-wide features but the language model's embeddings are "
         "{p.llm_width} wide (pipeline {q.name})"),
    Rule("parts", lambda p, q: p.newline_shape not in (None, (p.projector_out,)),
         "the image_newline has shape {p.newline_shape}; the projector gives {p.projector_out}-wide features"),
    Rule("pipeline", lambda p, q: p.tower_grid is not None and p.tower_grid + q.keeps_cls != q.feature_count,
         "the vision tower gives {p.tower_grid} patches per image but pipeline {q.name} has {q.feature_count} "
         "image slots"),
    Rule("pipeline", lambda p, q: p.tower_image_size not in (None, q.image_size),
         "the vision tower sees {p.tower_image_size} px views but pipeline {q.name} makes {q.image_size} px ones"),
    Rule("pipeline", lambda p, q: q.anyres and p.newline_shape is None,
         "pipeline {q.name} tiles pictures and ends each row of tiles with the model's image_newline feature, "
         "but the checkpoint has none"),
    Rule("pipeline", lambda p, q: not q.anyres and p.newline_shape is not None,
         "the checkpoint is a LLaVA-1.6 one (it has an image_newline) but pipeline {q.name} does not tile pictures"),
    Rule("pipeline", lambda p, q: p.feature_layer not in (None, q.vision_feature_layer),
         "the checkpoint takes vision features from layer {p.feature_layer} but pipeline {q.name} uses layer "
         "{q.vision_feature_layer}"),
    Rule("pipeline", lambda p, q: p.keeps_cls is True and not q.keeps_cls,
         "the checkpoint keeps the CLS feature but pipeline {q.name} drops it"),
    Rule("pipeline", lambda p, q: p.keeps_cls is False and q.keeps_cls,
         "the checkpoint drops the CLS feature but pipeline {q.name} keeps it"),
    Rule("pipeline", lambda p, q: p.image_token not in (None, q.image_token),
         "the checkpoint puts image features at {p.image_token!r} but pipeline {q.name} uses {q.image_token!r}"),
    Rule("pipeline", lambda p, q: p.start_end is True and q.start_token is None,
         "the checkpoint uses image start/end tokens but pipeline {q.name} does not"),
    Rule("pipeline", lambda p, q: p.start_end is False and q.start_token is not None,
         "the checkpoint does not use image start/end tokens but pipeline {q.name} does"),
)


def problems(parts: Parts, pipeline) -> list[tuple[str, str]]:
    """(kind, what is wrong) for every rule the parts break, in the order of ``RULES``."""
    return [(rule.kind, rule.says.format(p=parts, q=pipeline)) for rule in RULES if rule.broken(parts, pipeline)]


def check(parts: Parts, pipeline, fix: dict[str, str], error: type[LlavaError] = LlavaError,
          where: str = "") -> None:
    """Raise ``error`` for the first rule broken: ``where`` (the files looked at), what is wrong, and
    ``fix[kind]``, what to do about it."""
    found = problems(parts, pipeline)
    if found:
        kind, problem = found[0]
        raise error(f"{where + ': ' if where else ''}{problem}; {fix[kind]}")
