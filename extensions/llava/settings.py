"""The extension's settings: defaults, validation, device and dtype choice.

The webui overrides ``params[name]`` from the settings key ``llava-<name>``; every
error here names that key so the user knows what to change. The "embed all" choice is
the one setting whose key (``add_all_images_to_prompt``, the 2023 extension's) differs
from its name in the code (``embed_all``).
"""

from __future__ import annotations

import functools
import math
import posixpath
from dataclasses import dataclass

import torch

from .errors import LlavaError

SETTING_PREFIX = "llava-"

DEFAULTS = {
    "pipeline": "auto",
    "clip_bits": 32,
    "clip_device": None,
    "clip_repo": None,
    "projector_bits": 32,
    "projector_device": None,
    "projector_repo": None,
    "projector_filename": None,
    "add_all_images_to_prompt": False,
    "cache_size_mb": 256,
    "preprocess": "as_trained",
    "prefix_cache_mb": None,
    "max_items": 128,
}

ALLOWED_BITS = (16, 32)


class SettingsError(LlavaError):
    """A setting has a value the extension cannot use."""


def _number(kind, value):
    """``value`` as an int or a float; None when it is none (a flag is no number)."""
    try:
        return None if isinstance(value, bool) else kind(value)
    except (TypeError, ValueError):
        return None


def _bits(name: str, value) -> int:
    bits = _number(int, value)
    if bits not in ALLOWED_BITS:
        raise SettingsError(f"{SETTING_PREFIX}{name} is {value!r}; allowed values: 16 or 32")
    return bits


@functools.cache
def available_devices() -> tuple[str, ...]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        devices += [f"xpu:{i}" for i in range(xpu.device_count())]
    return tuple(devices)


def default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str, value) -> torch.device:
    """Parse a device setting; unset means cuda:0 when there is one, else cpu."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return torch.device(default_device())
    allowed = ", ".join(available_devices())
    try:
        device = torch.device(str(value).strip())
    except (RuntimeError, ValueError):
        raise SettingsError(f"{SETTING_PREFIX}{name} is {value!r}, which is not a device; "
                            f"allowed on this machine: {allowed}") from None
    if device.type in ("cuda", "xpu") and device.index is None:
        device = torch.device(device.type, 0)
    if str(device) not in available_devices():
        raise SettingsError(f"{SETTING_PREFIX}{name} is {value!r}, which this machine does not have; "
                            f"allowed on this machine: {allowed}")
    return device


def dtype_for(bits: int, device: torch.device) -> torch.dtype:
    """16 bits means float16 on accelerators and bfloat16 on the CPU, where float16 matmuls are slow."""
    if bits == 32:
        return torch.float32
    return torch.bfloat16 if device.type == "cpu" else torch.float16


def _optional_text(name: str, value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise SettingsError(f"{SETTING_PREFIX}{name} is {value!r}; expected a text value")
    return value.strip() or None


def _flag(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise SettingsError(f"{SETTING_PREFIX}{name} is {value!r}; allowed values: true or false")


def _size_mb(value) -> float | None:
    """A size in MB, 0 or more and finite (``.nan`` and ``.inf`` are numbers YAML reads, not sizes)."""
    size = _number(float, value)
    return size if size is not None and math.isfinite(size) and size >= 0 else None


def _cache_size(name: str, value) -> float:
    size = _size_mb(value)
    if size is None:
        raise SettingsError(f"{SETTING_PREFIX}{name} is {value!r}; expected a size in MB, 0 or more (0 turns the cache off)")
    return size


def _prefix_cache_size(name: str, value) -> float | None:
    """None (unset or "auto": the device decides), or a size in MB (0 turns reuse off)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    size = _size_mb(value)
    if size is None:
        raise SettingsError(f"{SETTING_PREFIX}{name} is {value!r}; expected auto or a size in MB, 0 or more "
                            "(0 turns reusing earlier prompts off)")
    return size


PREPROCESS_CHOICES = ("as_trained", "as_processor")


def _preprocess(name: str, value) -> str:
    """``as_trained``: the picture as the family was trained (LLaVA v1.5 padded to a square);
    ``as_processor``: exactly as the checkpoint's image processor says (what vLLM does)."""
    choice = (_optional_text(name, value) or "as_trained").lower()
    if choice not in PREPROCESS_CHOICES:
        raise SettingsError(f"{SETTING_PREFIX}{name} is {value!r}; allowed values: {', '.join(PREPROCESS_CHOICES)}")
    return choice
def _item_count(name: str, value) -> int:
    count = _number(int, value) if not isinstance(value, float) or value.is_integer() else None
    if count is None or count < 1:
        raise SettingsError(f"{SETTING_PREFIX}{name} is {value!r}; expected a whole number, 1 or more")
    return count


def _pipeline(name: str, value) -> str:
    from .families.pipelines import PIPELINES
    pipeline = _optional_text(name, value) or "auto"
    if pipeline != "auto" and pipeline not in PIPELINES:
        raise SettingsError(f"{SETTING_PREFIX}{name} is {value!r}; allowed values: auto, {', '.join(PIPELINES)}")
    return pipeline


def _repo(name: str, value) -> str | None:
    """A Hub repo id or a local folder; a web address is neither (the Hub client would not fetch it)."""
    repo = _optional_text(name, value)
    if repo is not None and "://" in repo:
        raise SettingsError(f"{SETTING_PREFIX}{name} is {value!r}, a web address; expected a Hub repo id "
                            "(owner/name) or a local folder")
    return repo


def _file_name(name: str, value) -> str | None:
    """A file inside the projector's repo or folder: never an absolute path nor one that climbs out."""
    filename = _optional_text(name, value)
    if filename is not None and (posixpath.isabs(filename.replace("\\", "/")) or ":" in filename
                                 or ".." in filename.replace("\\", "/").split("/")):
        raise SettingsError(f"{SETTING_PREFIX}{name} is {value!r}; expected a file name inside the projector's "
                            "repo or folder (no '..', no absolute path)")
    return filename


# settings key (after "llava-") → the field of ``Settings`` it becomes, and how its value is checked
CHECKS = {"pipeline": ("pipeline", _pipeline), "clip_bits": ("clip_bits", _bits),
          "clip_device": ("clip_device", resolve_device), "clip_repo": ("clip_repo", _repo),
          "projector_bits": ("projector_bits", _bits), "projector_device": ("projector_device", resolve_device),
          "projector_repo": ("projector_repo", _repo),
          "projector_filename": ("projector_filename", _file_name),
          "add_all_images_to_prompt": ("embed_all", _flag), "cache_size_mb": ("cache_size_mb", _cache_size),
          "prefix_cache_mb": ("prefix_cache_mb", _prefix_cache_size), "preprocess": ("preprocess", _preprocess),
          "max_items": ("max_items", _item_count)}


@dataclass(frozen=True)
class Settings:
    """Validated settings. ``DEFAULTS`` is the one source of defaults: ``Settings.from_params({})``."""

    pipeline: str
    clip_bits: int
    clip_device: torch.device
    clip_repo: str | None
    projector_bits: int
    projector_device: torch.device
    projector_repo: str | None
    projector_filename: str | None
    embed_all: bool
    cache_size_mb: float
    prefix_cache_mb: float | None  # None: chosen by the device the language model runs on
    preprocess: str  # as_trained or as_processor
    max_items: int  # the most media items (pictures) in one request

    @property
    def clip_dtype(self) -> torch.dtype:
        return dtype_for(self.clip_bits, self.clip_device)

    @property
    def projector_dtype(self) -> torch.dtype:
        return dtype_for(self.projector_bits, self.projector_device)

    @classmethod
    def from_params(cls, params: dict) -> "Settings":
        """Validate the webui's ``params`` dict (unknown keys are ignored); every bad setting is named."""
        values = {**DEFAULTS, **{k: v for k, v in params.items() if k in DEFAULTS}}
        checked, problems = {}, []
        for key, (field, check) in CHECKS.items():
            try:
                checked[field] = check(key, values[key])
            except SettingsError as error:
                problems.append(str(error))
        if problems:
            raise SettingsError("; ".join(problems))
        return cls(**checked)


class SettingsWatch:
    """The settings of a ``params`` dict that the webui may change at any time, validated again only
    when a value changed (a bad value keeps its error until it is changed too)."""

    def __init__(self, params: dict):
        self.params = params
        self._seen: tuple | None = None
        self._outcome: Settings | SettingsError | None = None

    def current(self) -> Settings:
        seen = tuple(repr(self.params.get(name)) for name in DEFAULTS)
        if seen != self._seen:
            try:
                self._outcome = Settings.from_params(self.params)
            except SettingsError as error:
                self._outcome = error
            self._seen = seen
        if isinstance(self._outcome, SettingsError):
            raise SettingsError(str(self._outcome))
        return self._outcome
