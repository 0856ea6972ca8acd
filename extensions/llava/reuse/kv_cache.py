"""The language model's cache for generations that may be reused: transformers' ``DynamicCache`` whose
layers keep room to spare.

A ``DynamicLayer`` appends each step's keys and values with ``torch.cat``, copying the whole cache at
every generated token; after a picture's thousands of positions that copy costs a follow-up more than
its new tokens do (a 12 MP photo on LLaVA-1.6: 2.5k positions, about a quarter of each turn on a CPU).
These layers write each step into storage that has room for ``SPARE_POSITIONS`` more, and copy only
when it is full. What attention sees is the same tensors' values (a view of the first positions).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

SPARE_POSITIONS = 256


class RoomyLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of larger storage, grown when full."""

    _storage: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, new = self.get_seq_length(), key_states.shape[-2]
        if not self._has_room(key_states, length + new):
            self._grow(key_states, value_states, length + new + SPARE_POSITIONS)
        keys, values = self._storage
        keys[..., length:length + new, :] = key_states
        values[..., length:length + new, :] = value_states
        self.keys, self.values = keys[..., :length + new, :], values[..., :length + new, :]
        return self.keys, self.values

    def _has_room(self, key_states: torch.Tensor, needed: int) -> bool:
        """Whether the storage holds ``needed`` positions and still is what ``keys`` views (a crop keeps the
        view; transformers' batch operations replace the tensors)."""
        storage = self._storage
        return (storage is not None and storage[0].shape[-2] >= needed
                and storage[0].shape[:-2] == key_states.shape[:-2] and storage[0].dtype == key_states.dtype
                and (self.keys.numel() == 0 or self.keys.data_ptr() == storage[0].data_ptr()))

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        length = self.get_seq_length()
        shape = (*key_states.shape[:-2], capacity, key_states.shape[-1])
        keys, values = key_states.new_empty(shape), value_states.new_empty(shape[:-1] + value_states.shape[-1:])
        if length:
            keys[..., :length, :] = self.keys
            values[..., :length, :] = self.values
        self._storage = (keys, values)


class RoomyCache(DynamicCache):
    """A ``DynamicCache`` of ``RoomyLayer``s, one made per layer as the model first writes to it."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=RoomyLayer)

