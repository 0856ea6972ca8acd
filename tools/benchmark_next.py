"""LLaVA-NeXT vision: the extension's per-picture time against transformers' reference.

    python tools/benchmark_next.py [--repeats N] [--device cpu|cuda] [--quick]

Real geometry with random weights: CLIP ViT-L/14 at 336 px (cut after its second-to-last layer,
as both run it), an mlp2x_gelu projector into a 4096-wide LLM space, the 1.6 canvases. Each row is
one chat turn that brings new pictures, from decoded pictures to their spliceable features:

- ours: ``PictureFeatures.features_for`` (tiles of all new pictures in one tower batch, then unpad and
  newline per picture), with an empty cache;
- reference: ``LlavaNextImageProcessorPil`` + ``LlavaNextModel.get_image_features`` (the same
  weights; its processor pads every picture to the most tiles of the batch).

Seconds per picture, median of ``--repeats`` runs, and whether the features are equal. ``--quick``
uses a narrow tower and one run: it checks that the script still runs (CI runs it), not the speed.
"""

from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TURNS = {"one 4000x3000 photo": [(4000, 3000)], "one 500x300 picture": [(500, 300)],
         "three new pictures": [(4000, 3000), (1024, 768), (300, 900)]}


def build_reference(folder: str, quick: bool = False):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextModel

    from testbed.tiny_next import PINPOINTS
    width, layers, heads, llm_width = (64, 3, 2, 128) if quick else (1024, 24, 16, 4096)
    vision = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=llm_width, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=32)
    config = LlavaNextConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=32000,
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             projector_hidden_act="gelu", image_grid_pinpoints=PINPOINTS)
    torch.manual_seed(0)
    model = LlavaNextModel(config).eval()
    model.language_model = None  # not needed for the vision side
    return model


def save_parts(reference, folder: str):
    """The reference's tower and projector as the extension loads them (a CLIP folder, a projector file)."""
    from testbed.tiny_next import save_tower
    from testbed.vision_race import save_projector
    tower_dir = save_tower(os.path.join(folder, "clip"), SimpleModel(reference))
    save_projector(reference, folder)
    return tower_dir


class SimpleModel:
    """What ``save_tower`` reads of a LlavaNextForConditionalGeneration."""

    def __init__(self, model):
        self.config = model.config
        self.model = model


def build(folder: str, quick: bool):
    reference = build_reference(folder, quick)
    return reference, save_parts(reference, folder)


def reference_features(reference, processor, images, device: str) -> list[torch.Tensor]:
    batch = processor(images=images, return_tensors="pt")
    return reference.get_image_features(batch["pixel_values"].to(device), batch["image_sizes"],
                                        vision_feature_layer=-2, vision_feature_select_strategy="default").pooler_output


def image_processor():
    from testbed.tiny_next import image_processor as next_processor
    return next_processor()


def main(argv=None) -> int:
    from testbed.vision_race import Contest
    from testbed.vision_race import main as race_main
    return race_main(Contest(__doc__, TURNS, "llava-v1.6-vicuna-7b", build, image_processor,
                             reference_features), argv)


if __name__ == "__main__":
    sys.exit(main())
