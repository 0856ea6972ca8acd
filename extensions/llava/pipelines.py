"""LLaVA pipelines as rows of data.

A pipeline says which vision tower and projector belong to a language model, how an
image is preprocessed and how it is laid out in the token stream. Everything else in
the extension reads these fields; nothing subclasses them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import LlavaError


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
    preprocess: str  # "crop": the processor's resize + centre crop; "pad": pad to a square first
    llm_hidden_size: int
    projector_repo: str | None  # where the released projector lives
    projector_filename: str | None
    vision_feature_layer: int = -2
    family: str = ""

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """Token texts that only the extension may put into a prompt."""
        return tuple(t for t in (self.image_token, self.start_token, self.end_token) if t)

    def image_stand_in(self) -> str:
        """An image as one slot between its start and end tokens (widened to all slots in the ids)."""
        return (self.start_token or "") + self.image_token + (self.end_token or "")

    def image_text(self) -> str:
        """The text an image becomes before tokenization."""
        return (self.start_token or "") + self.image_token * self.feature_count + (self.end_token or "")


CLIP_224 = "openai/clip-vit-large-patch14"
CLIP_336 = "openai/clip-vit-large-patch14-336"

_V0 = dict(vision_repo=CLIP_224, image_size=224, feature_count=256, projector_type="linear",
           image_token="<im_patch>", start_token="<im_start>", end_token="<im_end>",
           preprocess="crop", projector_filename="mm_projector.bin", family="v0")
_V15 = dict(vision_repo=CLIP_336, image_size=336, feature_count=576, projector_type="mlp2x_gelu",
            image_token="<image>", start_token=None, end_token=None, preprocess="pad",
            projector_filename=None, family="v1.5")

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
