"""What stood at each position of a prompt: its token ids, and at each picture's slots which picture in
which layout (or the plain image-token embedding, where a picture was not embedded). Two prompts share
a prefix only where both agree position for position."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PositionKey:
    """What stood at each position of a prompt: its token ids, and the pictures whose slots it holds."""

    ids: torch.Tensor  # [length]
    # per picture: (first slot, one past the last, identity); identity is ("plain",) for a picture whose
    # slots keep the image-token embedding, else (its data's digest, its layout)
    pictures: tuple[tuple[int, int, tuple], ...] = ()

    def common_length(self, other: "PositionKey") -> int:
        """How many first positions the two share exactly."""
        n = min(len(self.ids), len(other.ids))
        differing = torch.nonzero(self.ids[:n] != other.ids[:n])
        common = int(differing[0]) if len(differing) else n
        theirs = {start: (end, identity) for start, end, identity in other.pictures}
        for start, end, identity in self.pictures:
            if start >= common:
                break
            if theirs.get(start) != (end, identity):
                return start  # another picture (or the same one laid out otherwise) under the same ids
        return common

    def cut(self, length: int) -> "PositionKey":
        return PositionKey(self.ids[:length], tuple(p for p in self.pictures if p[1] <= length))


def position_key(ids: torch.Tensor, spans, identities: list[tuple | None]) -> PositionKey:
    """What stands at each position of ``ids`` [1, length]: the ids, and each picture's slots with the
    picture (``identities``: its data's digest and its layout) or, where it was not embedded (``None``),
    the plain embedding."""
    firsts = spans.slots[torch.cumsum(spans.counts, 0) - spans.counts].tolist() if len(spans.counts) else []
    pictures = tuple((first, first + int(count), ("plain",) if identity is None else identity)
                     for first, count, identity in zip(firsts, spans.counts.tolist(), identities))
    return PositionKey(ids[0].detach().cpu(), pictures)
