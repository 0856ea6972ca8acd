"""Weight files: finding them in a folder or on the Hub, and reading only the tensors wanted.

The vision side and the converter both read checkpoints through here: a single file or a sharded
one (through its index), safetensors or a legacy ``.bin`` (``weights_only``), locally or from the
Hub (``huggingface_hub`` honours ``HF_HUB_OFFLINE`` and its cache).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..errors import LlavaError, first_line

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
PROJECTOR_FILES = ("mm_projector.safetensors", "mm_projector.bin")
PROJECTOR_PREFIXES = ("model.mm_projector.", "mm_projector.", "model.multi_modal_projector.",
                      "multi_modal_projector.")
# Where a llava-hf checkpoint keeps its vision tower (an original checkpoint's copy has the same names).
TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.")

Wanted = Callable[[str], bool]


def without_prefix(key: str, prefixes: tuple[str, ...]) -> str | None:
    """``key`` without the first of ``prefixes`` it starts with; None when it starts with none."""
    return next((key[len(p):] for p in prefixes if key.startswith(p)), None)


class WeightsError(LlavaError):
    """Weights that cannot be found, read or used."""


def resolve_file(repo: str, filename: str) -> str:
    """A file of a local folder or of a Hub repo."""
    if os.path.isdir(repo):
        path = os.path.join(repo, filename)
        if not os.path.isfile(path):
            raise WeightsError(f"'{filename}' is not in the folder '{repo}'")
        return path
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo, filename)
    except Exception as error:
        raise WeightsError(f"could not get '{filename}' from '{repo}' ({type(error).__name__}: "
                           f"{first_line(error)}); download it first or point the setting at a local folder") from None


def has_file(repo: str, filename: str) -> bool:
    if os.path.isdir(repo):
        return os.path.isfile(os.path.join(repo, filename))
    from huggingface_hub import constants, file_exists, try_to_load_from_cache
    if isinstance(try_to_load_from_cache(repo, filename), str):
        return True
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        return file_exists(repo, filename)
    except Exception:
        return False


def weight_files(repo: str, wanted: Wanted | None = None) -> list[str]:
    """The checkpoint's weight files; with ``wanted``, through its shard index only the shards
    that hold a wanted tensor. A local folder's files must lie inside it."""
    for index in INDEX_FILES:
        if has_file(repo, index):
            weight_map = _weight_map(repo, index)
            shards = sorted({shard for key, shard in weight_map.items() if wanted is None or wanted(key)})
            return [inside_folder(repo, shard) for shard in shards]
    for single in SINGLE_FILES:
        if has_file(repo, single):
            return [inside_folder(repo, single)]
    raise WeightsError(f"'{repo}' has no weights ({', '.join(SINGLE_FILES)} or a shard index)")


def _weight_map(repo: str, index: str) -> dict:
    try:
        with open(resolve_file(repo, index)) as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError) as error:
        raise WeightsError(f"the shard index '{index}' of '{repo}' is not valid ({type(error).__name__}: "
                           f"{first_line(error)})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise WeightsError(f"the shard index '{index}' of '{repo}' does not map tensor names to file names")
    return weight_map


def inside_folder(repo: str, name: str) -> str:
    """``name`` as a file of the local folder ``repo``, refused when it lies outside: an absolute path, a
    '..', a link out of the folder (a link into the Hugging Face cache's ``blobs`` of the same repo, as
    its snapshot folders hold, is inside)."""
    if not os.path.isdir(repo):
        return name
    parts = name.replace("\\", "/").split("/")
    target = os.path.realpath(os.path.join(repo, name))
    folder = os.path.realpath(repo)
    roots = [folder]
    if os.path.basename(os.path.dirname(folder)) == "snapshots":
        roots.append(os.path.join(os.path.dirname(os.path.dirname(folder)), "blobs"))
    if os.path.isabs(name) or ".." in parts or not any(target.startswith(root + os.sep) for root in roots):
        raise WeightsError(f"'{repo}' names the weight file '{name[:200]}', which lies outside its folder; "
                           "refusing to read it")
    return name


def iter_tensors(path: str, wanted: Wanted = lambda key: True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of one weights file whose names pass ``wanted``, one tensor at a time where the
    format allows it (safetensors reads each on demand; a .bin is memory-mapped when it can be)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if wanted(key):
                    yield key, f.get_tensor(key)
        return
    state = _load_bin(path)
    for key in list(state):
        tensor = state.pop(key)
        if wanted(key):
            # a .bin may share storage between tensors; safetensors wants each on its own
            yield key, tensor.clone()
    del state


# safetensors' names of torch's number types
SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}
_TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class LazyTensor:
    """A tensor of a weights file, known by name, type and shape; ``load()`` reads it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@contextlib.contextmanager
def lazy_tensors(path: str):
    """The tensors of one weights file, none read yet: a safetensors file is read a tensor at a time as
    they are loaded; a .bin is memory-mapped when it can be."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            def entry(key):
                part = f.get_slice(key)
                return LazyTensor(key, _TORCH_DTYPES[part.get_dtype()], tuple(part.get_shape()),
                                  lambda: f.get_tensor(key))
            yield [entry(key) for key in f.keys()]
        return
    state = _load_bin(path)
    yield [LazyTensor(key, tensor.dtype, tuple(tensor.shape), lambda tensor=tensor: tensor) for key, tensor in state.items()]


def write_safetensors(path: str, tensors: list[LazyTensor], metadata: dict | None = None) -> int:
    """Write ``tensors`` as a safetensors file one at a time, each read only when its turn comes: the
    header (names, types, shapes, places) first, then the data. Returns the bytes of data."""
    header, offset = {}, 0
    for tensor in tensors:
        header[tensor.name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for tensor in tensors:
            data = tensor.load().contiguous()
            if data.dtype != tensor.dtype or tuple(data.shape) != tensor.shape:
                raise WeightsError(f"{tensor.name} became {data.dtype} {tuple(data.shape)}; the header says "
                                   f"{tensor.dtype} {tensor.shape}")
            f.write(data.reshape(-1).view(torch.uint8).numpy().data)
            del data
    return offset


def _load_bin(path: str) -> dict:
    """A torch pickle's tensors, and nothing else (``weights_only``); anything else is refused in words."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a file in the legacy (non-zip) format cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(f"'{path}' is not a plain tensor checkpoint, refused unread "
                           f"({type(error).__name__}: {first_line(error)})") from None


def read_tensors(repo: str, wanted: Wanted = lambda key: True) -> dict:
    """Every wanted tensor of the checkpoint in ``repo``, read only from the files that hold them."""
    state = {}
    for name in weight_files(repo, wanted):
        state.update(iter_tensors(resolve_file(repo, name), wanted))
    return state


# LLaVA-NeXT's learned row-end feature travels with the projector (both map into the LLM's space).
IMAGE_NEWLINE_KEYS = ("model.image_newline", "image_newline")


def is_projector_key(key: str) -> bool:
    return key.startswith(PROJECTOR_PREFIXES) or key in IMAGE_NEWLINE_KEYS


def read_projector_tensors(repo: str, filename: str | None = None, wanted: Wanted = is_projector_key) -> tuple[dict, str]:
    """The projector's tensors and where they came from: ``filename`` when given, else a
    ``mm_projector`` file of the folder, else the projector inside the checkpoint."""
    if filename:
        path = resolve_file(repo, filename)
        return dict(iter_tensors(path)), path
    for name in PROJECTOR_FILES:
        if has_file(repo, name):
            path = resolve_file(repo, name)
            return dict(iter_tensors(path)), path
    try:
        shards = weight_files(repo, wanted)
    except WeightsError:
        shards = []
    state = {}
    for shard in shards:
        state.update(iter_tensors(resolve_file(repo, shard), wanted))
    if state:
        return state, f"{repo} ({', '.join(shards)})"
    raise WeightsError(f"found no projector weights in '{repo}' (looked for {', '.join(PROJECTOR_FILES)} "
                       "and for mm_projector / multi_modal_projector tensors in its checkpoint)")


@contextlib.contextmanager
def quiet_transformers():
    """A full CLIP checkpoint has a text half we skip on purpose: no report of unused weights."""
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
