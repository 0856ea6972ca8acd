"""The LLaVA projector, built from data: a type string ("linear", "mlp2x_gelu", ...) and the shapes
found in its weights, whichever of the original or the llava-hf names they carry."""

from __future__ import annotations

import re

import torch
from torch import nn

from .weights import IMAGE_NEWLINE_KEYS, PROJECTOR_PREFIXES, WeightsError, without_prefix

# llava-hf names its two projector layers linear_1/linear_2; the original numbers them in a Sequential.
_HF_LAYER_INDEX = {"linear_1": "0", "linear_2": "2"}
_MLP_TYPE = re.compile(r"^mlp(\d+)x_gelu$")


def projector_depth(projector_type: str) -> int:
    if projector_type == "linear":
        return 1
    match = _MLP_TYPE.match(projector_type)
    if match is None:
        raise WeightsError(f"unknown projector type {projector_type!r}; known: linear, mlp<N>x_gelu")
    return int(match.group(1))


def build_projector(projector_type: str, in_features: int, out_features: int) -> nn.Module:
    """linear → one Linear; mlpNx_gelu → N Linears with GELU between them (indices 0, 2, 4, ...)."""
    depth = projector_depth(projector_type)
    if depth == 1:
        return nn.Linear(in_features, out_features)
    layers: list[nn.Module] = [nn.Linear(in_features, out_features)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_features, out_features)]
    return nn.Sequential(*layers)


def split_image_newline(state: dict) -> tuple[dict, torch.Tensor | None]:
    """The projector's tensors, and LLaVA-NeXT's ``image_newline`` when it came with them."""
    newline = next((state[k] for k in IMAGE_NEWLINE_KEYS if k in state), None)
    return {k: v for k, v in state.items() if k not in IMAGE_NEWLINE_KEYS}, newline


def normalise_projector_keys(state: dict) -> dict:
    """Projector tensors keyed as the module from ``build_projector`` expects."""
    state = split_image_newline(state)[0]
    found = {without_prefix(key, PROJECTOR_PREFIXES): tensor for key, tensor in state.items()
             if key.startswith(PROJECTOR_PREFIXES)}
    if not found:
        found = dict(state)  # a bare projector file: "weight"/"bias" or "0.weight"/...
    renamed = {}
    for key, tensor in found.items():
        layer, _, rest = key.partition(".")
        renamed[f"{_HF_LAYER_INDEX.get(layer, layer)}.{rest}" if rest else key] = tensor
    return renamed


def projector_type_of(state: dict) -> str:
    if set(state) <= {"weight", "bias"}:
        return "linear"
    indices = sorted({int(k.split(".")[0]) for k in state if k.split(".")[0].isdigit()})
    if not indices:
        raise WeightsError(f"the projector weights have unexpected names: {sorted(state)[:6]}")
    if len(indices) == 1:
        return "linear"  # a Sequential holding a single Linear
    return f"mlp{len(indices)}x_gelu"


def projector_from_state(state: dict) -> nn.Module:
    """Build the projector whose type and shapes the weights describe, and load them."""
    state = normalise_projector_keys(state)
    projector_type = projector_type_of(state)
    if projector_type == "linear" and "weight" not in state:
        state = {k.split(".", 1)[1]: v for k, v in state.items()}
    first = state["weight"] if "weight" in state else state["0.weight"]
    last_index = max((int(k.split(".")[0]) for k in state if k[0].isdigit()), default=None)
    last = state["weight"] if last_index is None else state[f"{last_index}.weight"]
    projector = build_projector(projector_type, first.shape[1], last.shape[0])
    try:
        projector.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    except RuntimeError as error:
        raise WeightsError(f"the projector weights do not fit a {projector_type} projector: {error}") from None
    return projector


def projector_shape(projector: nn.Module) -> tuple[int, int]:
    linears = [m for m in projector.modules() if isinstance(m, nn.Linear)]
    return linears[0].in_features, linears[-1].out_features
