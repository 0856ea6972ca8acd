"""LLaVA-OneVision vision: the extension's per-picture time against transformers' reference.

    python tools/benchmark_onevision.py [--repeats N] [--device cpu|cuda] [--quick]

Real geometry with random weights: SigLIP-so400m at 384 px (26 layers, 1152 wide, as the llava-hf
checkpoints hold it), an mlp2x_gelu projector into a 896-wide LLM space (Qwen2-0.5B's), OneVision's 36
canvases and anyres_max_9. Each row is one chat turn that brings new pictures, from decoded pictures to
their spliceable features:

- ours: ``PictureFeatures.features_for`` (all views of the new pictures in one tower batch, the tower cut after
  its feature layer, then unpad, scale to the budget and newline per picture), with an empty cache;
- reference: ``LlavaOnevisionImageProcessorPil`` + ``LlavaOnevisionModel.get_image_features`` (the same
  weights).

Seconds per picture, median of ``--repeats`` runs, the slots of each turn's pictures and whether the
features are equal. ``--quick`` uses a narrow tower and one run: it checks the script (CI runs it).
"""

from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TURNS = {"one 4000x3000 photo": [(4000, 3000)], "one 700x300 picture": [(700, 300)],
         "two pictures in one prompt": [(4000, 3000), (700, 300)]}


def build_reference(quick: bool):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionModel, Qwen2Config, SiglipVisionConfig

    from testbed.tiny_onevision import PINPOINTS
    width, mlp, layers, heads = (64, 128, 3, 2) if quick else (1152, 4304, 26, 16)
    vision = SiglipVisionConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                                num_attention_heads=heads, image_size=384, patch_size=14, vision_use_head=False)
    text = Qwen2Config(vocab_size=152000, hidden_size=896, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=14, num_key_value_heads=2)
    config = LlavaOnevisionConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_grid_pinpoints=PINPOINTS)
    torch.manual_seed(0)
    model = LlavaOnevisionModel(config).eval()
    model.language_model = None  # not needed for the vision side
    with torch.no_grad():
        model.image_newline.copy_(torch.randn_like(model.image_newline))
    return model


def save_parts(reference, folder: str) -> str:
    """The reference's tower (a SigLIP folder) and projector with its newline, as the extension loads them."""
    from transformers import SiglipImageProcessorPil, SiglipVisionModel

    from testbed.tiny_onevision import SIGLIP_MEAN, SIGLIP_STD
    from testbed.vision_race import save_projector
    tower_dir = os.path.join(folder, "siglip")
    tower = SiglipVisionModel(reference.config.vision_config)
    tower.load_state_dict(reference.vision_tower.state_dict())
    tower.save_pretrained(tower_dir)
    SiglipImageProcessorPil(size={"height": 384, "width": 384}, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD,
                            resample=3).save_pretrained(tower_dir)
    save_projector(reference, folder)
    return tower_dir


def build(folder: str, quick: bool):
    reference = build_reference(quick)
    return reference, save_parts(reference, folder)


def reference_features(reference, processor, images, device: str) -> list[torch.Tensor]:
    batch = processor(images=[images], return_tensors="pt")  # one prompt holding all of them
    return list(reference.get_image_features(batch["pixel_values"].to(device), batch["image_sizes"],
                                             batch_num_images=batch["batch_num_images"]).pooler_output)


def image_processor():
    from testbed.tiny_onevision import onevision_image_processor
    return onevision_image_processor()


def main(argv=None) -> int:
    from testbed.vision_race import Contest
    from testbed.vision_race import main as race_main
    return race_main(Contest(__doc__, TURNS, "llava-onevision-qwen2-0.5b-ov", build, image_processor,
                             reference_features, repeats=1), argv)


if __name__ == "__main__":
    sys.exit(main())
