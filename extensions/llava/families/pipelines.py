"""LLaVA pipelines as rows of data.

A pipeline is the data one checkpoint gives: which vision tower and projector belong to a language
model, its sizes, its image tokens and canvases. Its family (``families``) reads these fields to lay
pictures out: how many slots a picture takes, its views, its features.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import LlavaError
from ..vision.tower_kinds import TOWER_KINDS

# Fields that rows written by earlier converters carry and that the family now decides.
LEGACY_FIELDS = ("several_pictures", "view_processor")


@dataclass(frozen=True)
class Pipeline:
    name: str
    vision_repo: str
    image_size: int
    feature_count: int
    projector_type: str  # "linear" or "mlp<N>x_gelu"
    image_token: str  # one per projected feature
    start_token: str | None  # before an image's features, if the layout has one
    end_token: str | None  # after them
    # "crop": the processor's resize + centre crop; "pad": pad to a square first; "anyres": the tiling
    # families' (how each family reads it: ``families``)
    preprocess: str
    llm_hidden_size: int
    projector_repo: str | None  # where the released projector lives
    projector_filename: str | None
    vision_feature_layer: int = -2
    family: str = ""  # the release, whose module in ``families`` lays its pictures out
    patch_size: int = 14
    keeps_cls: bool = False  # the "full" select strategy: the CLS feature is an image slot too
    # Any-resolution (LLaVA-NeXT): the canvases, as (height, width), that a picture is tiled onto.
    # Empty for pipelines with one fixed-size view per picture.
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    tower: str = "clip"  # a key of TOWER_KINDS
    # Any-resolution with a budget (LLaVA-OneVision's anyres_max_N): a grid of more than N tiles' worth
    # of features is scaled down to about that many. 0: no budget.
    max_tiles: int = 0

    @property
    def anyres(self) -> bool:
        return bool(self.grid_pinpoints)

    @property
    def drops_cls(self) -> bool:
        """Whether the tower's first feature is a CLS that is no image slot (CLIP with the default strategy)."""
        return TOWER_KINDS[self.tower].has_cls and not self.keeps_cls

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """Token texts that only the extension may put into a prompt."""
        return tuple(t for t in (self.image_token, self.start_token, self.end_token) if t)

    def image_stand_in(self) -> str:
        """An image as one slot between its start and end tokens (widened to all slots in the ids)."""
        return (self.start_token or "") + self.image_token + (self.end_token or "")

    def image_text(self) -> str:
        """The text a fixed-size image becomes before tokenization (the demo's training data)."""
        return (self.start_token or "") + self.image_token * self.feature_count + (self.end_token or "")

    def to_json(self) -> dict:
        """The row as JSON data (what the converter writes into a model folder)."""
        row = dataclasses.asdict(self)
        row["grid_pinpoints"] = [list(p) for p in self.grid_pinpoints]
        return row

    @classmethod
    def from_json(cls, row: dict) -> "Pipeline":
        row = {k: v for k, v in row.items() if k not in LEGACY_FIELDS}
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(row) - fields
        missing = {f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in row}
        if unknown or missing:
            problems = ([f"unknown fields {', '.join(sorted(unknown))}"] if unknown else []) \
                + ([f"missing fields {', '.join(sorted(missing))}"] if missing else [])
            raise PipelineError(f"the pipeline row is not valid: {'; '.join(problems)}")
        row = dict(row, grid_pinpoints=tuple(tuple(int(x) for x in p) for p in row.get("grid_pinpoints") or ()))
        return cls(**row)


CLIP_224 = "openai/clip-vit-large-patch14"
CLIP_336 = "openai/clip-vit-large-patch14-336"

_V0 = dict(vision_repo=CLIP_224, image_size=224, feature_count=256, projector_type="linear",
           image_token="<im_patch>", start_token="<im_start>", end_token="<im_end>",
           preprocess="crop", projector_filename="mm_projector.bin", family="v0")
_V15 = dict(vision_repo=CLIP_336, image_size=336, feature_count=576, projector_type="mlp2x_gelu",
            image_token="<image>", start_token=None, end_token=None, preprocess="pad",
            projector_filename=None, family="v1.5")

# LLaVA-1.6 ("NeXT"): the v1.5 tower and projector, any-resolution tiling onto these canvases.
NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
_V16 = dict(_V15, preprocess="anyres", grid_pinpoints=NEXT_PINPOINTS, family="v1.6")

# LLaVA-OneVision and llava-interleave: SigLIP-so400m at 384 px (27 × 27 patches, no CLS), its features
# taken before the last of its 27 layers: the llava-hf checkpoints keep 26 layers and take the last,
# so their vision parts come from the checkpoint itself.
SIGLIP_384 = "google/siglip-so400m-patch14-384"
ONEVISION_PINPOINTS = tuple((384 * rows, 384 * columns) for rows in range(1, 7) for columns in range(1, 7))
_SIGLIP = dict(image_size=384, feature_count=729, projector_type="mlp2x_gelu", image_token="<image>",
               start_token=None, end_token=None, projector_filename=None, tower="siglip", vision_feature_layer=-1)
_ONEVISION = dict(_SIGLIP, preprocess="anyres", grid_pinpoints=ONEVISION_PINPOINTS, max_tiles=9, family="onevision")
_INTERLEAVE = dict(_SIGLIP, preprocess="crop", family="interleave")  # the SigLIP processor: squashed to 384


def _from_checkpoint(name: str, llm_hidden_size: int, **row) -> "Pipeline":
    """A pipeline whose tower, projector and newline are read from its llava-hf checkpoint ``name``."""
    repo = f"llava-hf/{name}-hf"
    return Pipeline(name=name, vision_repo=repo, projector_repo=repo, llm_hidden_size=llm_hidden_size, **row)

PIPELINES: dict[str, Pipeline] = {p.name: p for p in (
    Pipeline(name="llava-v0-13b", llm_hidden_size=5120, projector_repo="liuhaotian/LLaVA-13b-delta-v0", **_V0),
    Pipeline(name="llava-v0-7b", llm_hidden_size=4096, projector_repo="liuhaotian/LLaVA-7b-delta-v0", **_V0),
    Pipeline(name="llava-llama-2-13b", vision_repo=CLIP_224, image_size=224, feature_count=256,
             projector_type="linear", image_token="<image>", start_token=None, end_token=None,
             preprocess="crop", llm_hidden_size=5120,
             projector_repo="liuhaotian/llava-llama-2-13b-chat-lightning-preview",
             projector_filename="mm_projector.bin", family="llama-2"),
    Pipeline(name="llava-v1.5-7b", llm_hidden_size=4096, projector_repo="liuhaotian/llava-v1.5-7b", **_V15),
    Pipeline(name="llava-v1.5-13b", llm_hidden_size=5120, projector_repo="liuhaotian/llava-v1.5-13b", **_V15),
    Pipeline(name="bakllava-1", llm_hidden_size=4096, projector_repo="SkunkworksAI/BakLLaVA-1", **_V15),
    Pipeline(name="llava-v1.6-vicuna-7b", llm_hidden_size=4096, projector_repo="liuhaotian/llava-v1.6-vicuna-7b", **_V16),
    Pipeline(name="llava-v1.6-vicuna-13b", llm_hidden_size=5120, projector_repo="liuhaotian/llava-v1.6-vicuna-13b",
             **_V16),
    Pipeline(name="llava-v1.6-mistral-7b", llm_hidden_size=4096, projector_repo="liuhaotian/llava-v1.6-mistral-7b",
             **_V16),
    Pipeline(name="llava-v1.6-34b", llm_hidden_size=7168, projector_repo="liuhaotian/llava-v1.6-34b", **_V16),
    *(_from_checkpoint(f"llava-onevision-qwen2-{size}-{kind}", hidden, **_ONEVISION)
      for size, hidden in (("0.5b", 896), ("7b", 3584), ("72b", 8192)) for kind in ("ov", "si")),
    _from_checkpoint("llava-interleave-qwen-0.5b", 1024, **_INTERLEAVE),
    _from_checkpoint("llava-interleave-qwen-7b", 4096, **_INTERLEAVE),
    # The bundled demo (tools/train_demo.py): its tower and projector live in its own folder.
    Pipeline(name="llava-demo", vision_repo="", image_size=64, feature_count=16, projector_type="mlp2x_gelu",
             image_token="<im_patch>", start_token="<im_start>", end_token="<im_end>", preprocess="crop",
             llm_hidden_size=96, projector_repo=None, projector_filename=None, family="demo"),
)}

DEFAULT_PIPELINE = "llava-v0-13b"


class PipelineError(LlavaError):
    """The loaded model and the chosen pipeline do not belong together."""


def get_pipeline(name: str) -> Pipeline:
    try:
        return PIPELINES[name]
    except KeyError:
        raise PipelineError(f"unknown pipeline {name!r}; known pipelines: auto, {', '.join(PIPELINES)}") from None
