"""What a model family owns, as one interface: which checkpoints are its own, its token layout, how many
positions an item takes (from its header and where it stands among the prompt's items), the views the
tower sees, and how the projected views become the features of the item's slots.

A family composes the shared machinery (``vision.processors``, ``vision.tiling``, the towers, the
projector, the splice, the caches); it holds no state. The pipeline row (``pipelines.Pipeline``) is the
data one checkpoint of a family gives: its sizes, tokens and canvases.

An item's *layout* is a short name the family gives it for one prompt (``arrange``): the features of the
same item laid out otherwise are different, so the feature cache and prefix reuse key on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class TokenLayout:
    """The ids of a pipeline's image tokens in the loaded tokenizer."""

    image_id: int
    start_id: int | None
    end_id: int | None

    @property
    def extra_tokens(self) -> int:
        """Tokens an item takes besides its slots (its start and end tokens)."""
        return (self.start_id is not None) + (self.end_id is not None)



class Family:
    """A family of checkpoints; the LLaVA families differ only in what they override here."""

    name = ""
    counts_by_size = False  # whether an item's slots follow from its header (else the pipeline's feature_count)
    # the values of ``Pipeline.family`` this module serves (a family of several releases: v0, v1.5, ...)
    releases: tuple[str, ...] = ()

    # ------------------------------------------------------------ recognising its checkpoints

    def claims(self, row: dict) -> bool:
        """Whether the vision side a LLaVA config describes (``detect``'s row of pipeline fields) is this
        family's."""
        return False

    def release_of(self, row: dict) -> str:
        """Which of ``releases`` the row is."""
        return self.releases[0]

    def default_preprocess(self, row: dict) -> str:
        """How the family's pictures are prepared when the config does not say."""
        return "crop"

    def as_set(self, pipeline, preprocess: str):
        """The pipeline as the ``llava-preprocess`` setting has it: ``as_trained`` (the default) or
        ``as_processor`` (exactly as the checkpoint's image processor says, as transformers' processor and
        vLLM prepare a picture). Families whose training and processor agree keep the pipeline."""
        return pipeline

    # ------------------------------------------------------------ tokens and positions

    def token_layout(self, pipeline, vocab: dict) -> TokenLayout:
        """The ids of the pipeline's image tokens in the loaded tokenizer's vocabulary."""
        return TokenLayout(image_id=vocab[pipeline.image_token],
                           start_id=vocab[pipeline.start_token] if pipeline.start_token else None,
                           end_id=vocab[pipeline.end_token] if pipeline.end_token else None)

    def arrange(self, pipeline, count: int) -> list[str]:
        """The layout of each of a prompt's ``count`` items (where several items go)."""
        return ["one view"] * count

    def slot_count(self, pipeline, header: Sequence[int], layout: str) -> int:
        """Image slots of an item whose header gives ``header`` (width, height; None where the family does not
        count by size), in ``layout``."""
        return pipeline.feature_count

    def most_slots(self, pipeline, layout: str) -> int:
        """The most slots any item can take in ``layout`` (what an unknown item is counted at)."""
        return pipeline.feature_count

    def view_count(self, pipeline, header: Sequence[int], layout: str) -> int:
        """Views the tower sees for an item of this size in ``layout``."""
        return 1

    def most_views(self, pipeline, layout: str) -> int:
        """The most views the tower sees for one item in ``layout`` (sizes the tower batches)."""
        return 1

    # ------------------------------------------------------------ pixels and features

    def views(self, pipeline, processor, pictures: list, layout: str) -> tuple[torch.Tensor, list[int]]:
        """RGB pictures → the views the tower sees, in one batch, and how many belong to each picture."""
        raise NotImplementedError

    def features(self, pipeline, projected: torch.Tensor, views: list[int], pictures: list, layout: str,
                 newline: torch.Tensor | None) -> list[torch.Tensor]:
        """The projected views [sum of views, F, hidden] → each picture's slot features [slots, hidden]."""
        return list(projected)
