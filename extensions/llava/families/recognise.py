"""Choosing the pipeline that belongs to a loaded model, and where its vision parts are.

Evidence, strongest first: the metadata file the converter writes into a model folder;
the original LLaVA config keys (``mm_*``); the tokenizer's image tokens together with the
model's type, width and folder name.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from ..errors import CONVERT_COMMAND
from ..vision.tower_kinds import TOWER_KINDS, tower_kind_of
from . import family_claiming
from ..vision.checkpoint_rules import PROJECTOR_ACTIVATIONS
from .pipelines import CLIP_224, CLIP_336, DEFAULT_PIPELINE, PIPELINES, Pipeline, PipelineError, get_pipeline

METADATA_FILE = "llava.json"


@dataclass(frozen=True)
class Choice:
    pipeline: Pipeline
    reason: str
    vision_source: str | None = None  # from the model folder's metadata
    projector_repo: str | None = None
    projector_filename: str | None = None


def read_metadata(model_path: str | None) -> dict | None:
    if not model_path:
        return None
    path = os.path.join(model_path, METADATA_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as error:
        raise PipelineError(f"{path} cannot be read as JSON: {error}") from None
    row = data.get("pipeline") if isinstance(data, dict) else None
    if isinstance(row, dict):
        data["pipeline"] = Pipeline.from_json(row)
    elif row not in PIPELINES:
        raise PipelineError(f"{path} names no known pipeline and holds no pipeline row; known: {', '.join(PIPELINES)}")
    else:
        data["pipeline"] = PIPELINES[row]
    return data


def choose_pipeline(setting: str, config, tokenizer_vocab, model_path: str | None) -> Choice:
    """The pipeline for a model: the setting's, unless it is ``auto``."""
    metadata = read_metadata(model_path)
    sources = {}
    if metadata:
        sources = {"vision_source": _inside(model_path, metadata.get("vision_tower")),
                   "projector_repo": model_path if metadata.get("projector") else None,
                   "projector_filename": metadata.get("projector")}
    if setting != "auto":
        return Choice(get_pipeline(setting), "set by llava-pipeline", **sources)
    if metadata:
        return Choice(metadata["pipeline"], f"named in {METADATA_FILE}", **sources)
    described = pipeline_from_config(config, model_path)
    if described is not None:
        return Choice(described, "read from the model's config")
    name = detect_pipeline(config, tokenizer_vocab, model_path)
    return Choice(get_pipeline(name), "detected from the model")


# ---------------------------------------------------------------- pipelines a config describes

# Original LLaVA configs name their tower; its view size is in the name of the released ones.
_TOWER_IMAGE_SIZES = {CLIP_224: 224, CLIP_336: 336}


def _getter(config):
    if config is None:
        return lambda key, default=None: default
    if isinstance(config, dict):
        return config.get
    return lambda key, default=None: getattr(config, key, default)


def pipeline_from_config(config, model_path: str | None = None, image_token: str | None = None,
                         llm_hidden_size: int | None = None, start_end: bool = False) -> Pipeline | None:
    """The pipeline a LLaVA config describes: an original one (``mm_*`` keys) or a llava-hf one
    (``vision_config``; then ``image_token`` is the text of its image token and ``start_end`` says
    whether its tokenizer puts start and end tokens around an image). None when the config
    does not describe its vision side. Named pipelines are returned when one has exactly this
    vision side and width; otherwise the row is built from the config and named after the folder.
    """
    get = _getter(config)
    if get("vision_config") is not None:
        row = _llava_hf_row(get, image_token, start_end)
        width = llm_hidden_size or _getter(get("text_config"))("hidden_size")
    elif get("mm_vision_tower"):
        row = _original_row(get)
        width = llm_hidden_size or get("hidden_size")
    else:
        return None
    stated_preprocess = row.pop("preprocess")
    tower = row.pop("vision_repo", "")
    family = family_claiming(row)
    matches = [p for p in PIPELINES.values()
               if all(getattr(p, k) == v for k, v in row.items()) and p.llm_hidden_size == width
               and (stated_preprocess is None or p.preprocess == stated_preprocess)]
    if matches:
        text_config = get("text_config") or {}
        text_type = text_config.get("model_type") if isinstance(text_config, dict) else getattr(text_config, "model_type", "")
        mistral = "mistral" in str(get("model_type", "")) or text_type == "mistral"
        matches = [p for p in matches if ("mistral" in p.name or "bakllava" in p.name) == mistral] or matches
        # alike rows (OneVision's "ov" and "si" releases): the folder's name tells them apart
        folder = os.path.basename(os.path.normpath(model_path)).lower() if model_path else ""
        return next((p for p in matches if p.name in folder), matches[0])
    # a config that does not say how its pictures are prepared follows its family
    preprocess = stated_preprocess or family.default_preprocess(row)
    name = os.path.basename(os.path.normpath(model_path)) if model_path else "unnamed"
    return Pipeline(name=f"{name} (from its config)", preprocess=preprocess, family=family.release_of(row),
                    llm_hidden_size=int(width or 0), vision_repo=tower,
                    projector_repo=None, projector_filename=None, **row)


def _common_row(*, tower: str, image_size: int, patch_size: int, layer: int, keeps_cls: bool, projector_type: str,
                image_token: str, start_end: bool, pinpoints, preprocess: str | None, max_tiles: int = 0) -> dict:
    keeps_cls = keeps_cls and TOWER_KINDS[tower].has_cls  # SigLIP has no CLS to keep or drop
    if pinpoints and keeps_cls:
        raise PipelineError("the config tiles pictures (any resolution) and keeps the CLS feature; LLaVA-NeXT "
                            "models drop it, and this combination is not supported")
    pinpoints = tuple(tuple(int(x) for x in p) for p in pinpoints or ())
    return dict(image_size=int(image_size), patch_size=int(patch_size), vision_feature_layer=int(layer),
                keeps_cls=bool(keeps_cls), feature_count=(image_size // patch_size) ** 2 + bool(keeps_cls),
                projector_type=projector_type, image_token=image_token,
                start_token="<im_start>" if start_end else None, end_token="<im_end>" if start_end else None,
                grid_pinpoints=pinpoints, preprocess="anyres" if pinpoints else preprocess, tower=tower,
                max_tiles=max_tiles)


def _max_tiles(aspect) -> int:
    """N of LLaVA-OneVision's ``anyres_max_N``; 0 for LLaVA-1.6's plain ``anyres``."""
    match = re.fullmatch(r"anyres_max_(\d+)", str(aspect or ""))
    return int(match.group(1)) if match else 0


def _llava_hf_row(get, image_token: str | None, start_end: bool) -> dict:
    vision = get("vision_config")
    vision = vision if isinstance(vision, dict) else vision.to_dict()
    strategy = get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise PipelineError(f"the config's vision_feature_select_strategy {strategy!r} is not one LLaVA uses")
    activation = get("projector_hidden_act", "gelu")
    if activation not in PROJECTOR_ACTIVATIONS:
        raise PipelineError(f"the config's projector activation {activation!r} is not one LLaVA uses (exact GELU)")
    layer = get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise PipelineError(f"the config takes vision features from several layers ({layer}); LLaVA uses one")
    model_type = get("model_type", "")
    max_tiles = _max_tiles(get("vision_aspect_ratio", "anyres_max_9")) if model_type == "llava_onevision" else 0
    if model_type == "llava_onevision" and not max_tiles:
        raise PipelineError(f"the config's vision_aspect_ratio {get('vision_aspect_ratio')!r} is not anyres_max_N")
    tiles = model_type in ("llava_next", "llava_onevision")
    return _common_row(tower=tower_kind_of(vision), image_size=vision.get("image_size", 224),
                       patch_size=vision.get("patch_size", 14), layer=layer, keeps_cls=strategy == "full",
                       projector_type="linear" if activation != "gelu" else "mlp2x_gelu",
                       image_token=image_token or "<image>", start_end=start_end,
                       pinpoints=get("image_grid_pinpoints") if tiles else None, preprocess=None, max_tiles=max_tiles)


def _original_row(get) -> dict:
    tower = str(get("mm_vision_tower"))
    kind = tower_kind_of(name=tower)
    image_size = _TOWER_IMAGE_SIZES.get(tower) or _tower_image_size(tower)
    aspect = get("image_aspect_ratio")
    pinpoints = None
    if aspect and "anyres" in str(aspect):
        merge = get("mm_patch_merge_type", "flat")
        if merge != "spatial_unpad":
            raise PipelineError(f"the config tiles pictures with the merge type {merge!r}; only LLaVA-1.6's "
                                "'spatial_unpad' is supported")
        pinpoints = _pinpoints(get("image_grid_pinpoints"), image_size)
    preprocess = "pad" if aspect == "pad" else ("crop" if aspect else None)
    select = get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise PipelineError(f"the config's mm_vision_select_feature {select!r} is not one LLaVA uses")
    start_end = bool(get("mm_use_im_start_end", False))
    return dict(_common_row(tower=kind, image_size=image_size, patch_size=14, layer=get("mm_vision_select_layer", -2),
                            keeps_cls=select == "cls_patch", projector_type=get("mm_projector_type", "linear") or "linear",
                            image_token="<im_patch>" if start_end else "<image>", start_end=start_end,
                            pinpoints=pinpoints, preprocess=preprocess, max_tiles=_max_tiles(aspect)),
                vision_repo=tower)


def _pinpoints(pinpoints, tile: int) -> list:
    """The canvases of an original config: a list of (height, width), or as lmms-lab's training scripts
    write them, "(1x1),...,(6x6)": every grid of tiles from the first to the last, in tiles of ``tile``."""
    if isinstance(pinpoints, str):
        grids = re.findall(r"\((\d+)x(\d+)\)", pinpoints)
        if grids:
            (first_rows, first_columns), (last_rows, last_columns) = [tuple(map(int, g)) for g in (grids[0], grids[-1])]
            return [[tile * rows, tile * columns] for rows in range(first_rows, last_rows + 1)
                    for columns in range(first_columns, last_columns + 1)]
    if not isinstance(pinpoints, list) or not pinpoints:
        raise PipelineError("the config tiles pictures (image_aspect_ratio anyres) but lists no image_grid_pinpoints")
    return pinpoints


def _tower_image_size(tower: str) -> int:
    """A tower of another name: its view size from its config when it is a folder, else its name."""
    config_path = os.path.join(tower, "config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                data = json.load(f)
            return int((data.get("vision_config") or data).get("image_size"))
        except (OSError, ValueError, TypeError):
            pass
    return next((size for size in (384, 336) if str(size) in tower), 224)


def _inside(folder: str, relative: str | None) -> str | None:
    """A path in the metadata is relative to the model folder; anything else (a Hub repo id) stands as is."""
    if not relative:
        return None
    if os.path.isabs(relative):
        return relative
    inside = os.path.join(folder, relative)
    return inside if os.path.exists(inside) else relative


def _size_of(hidden_size: int | None, name: str) -> str | None:
    if hidden_size == 4096 or re.search(r"(?<![\d.])7b", name):
        return "7b"
    if hidden_size == 5120 or re.search(r"(?<![\d.])13b", name):
        return "13b"
    return None


def detect_pipeline(config, vocab, model_path: str | None) -> str:
    """Name the pipeline of a model from its config, tokenizer vocabulary and folder name."""
    get = (lambda key, default=None: getattr(config, key, default)) if config is not None else (lambda key, default=None: default)
    name = os.path.basename(os.path.normpath(model_path)).lower() if model_path else ""
    name = name or str(get("_name_or_path", "") or "").lower()
    hidden = get("hidden_size")
    model_type = str(get("model_type", "") or "")
    vocab = vocab or {}
    tower = str(get("mm_vision_tower", "") or "")
    size = _size_of(hidden, name)
    unsure = ("cannot tell which LLaVA pipeline this model needs{why}; set llava-pipeline to one of: "
              + ", ".join(PIPELINES))

    if "mistral" in model_type or "bakllava" in name:
        if tower and "336" not in tower:
            raise PipelineError(unsure.format(why=f" (a Mistral model with vision tower {tower})"))
        return "bakllava-1"
    if tower:  # an original LLaVA checkpoint says what it was trained with
        if "336" in tower or str(get("mm_projector_type", "")).startswith("mlp"):
            if size is None:
                raise PipelineError(unsure.format(why=" (a v1.5-style model of unknown size)"))
            return f"llava-v1.5-{size}"
        if "<im_patch>" in vocab or get("mm_use_im_start_end", False):
            return f"llava-v0-{size or '13b'}"
        return "llava-llama-2-13b"
    if "<im_patch>" in vocab:
        return f"llava-v0-{size}" if size else DEFAULT_PIPELINE
    if "<image>" in vocab:
        if "llama-2" in name or "llama2" in name:
            return "llava-llama-2-13b"
        if size and ("1.5" in name or "v15" in name):
            return f"llava-v1.5-{size}"
        raise PipelineError(unsure.format(why=" (its tokenizer has <image>, used by llava-llama-2, v1.5 and bakllava)"))
    raise PipelineError("the loaded model's tokenizer has no image tokens (<im_patch> or <image>): it is not a "
                        "LLaVA model the extension can feed. Load a LLaVA checkpoint (convert an original or "
                        f"llava-hf one with {CONVERT_COMMAND}), or set llava-pipeline")
