"""LLaVA-NeXT vision: the extension's per-picture time against transformers' reference.

    python tools/benchmark_next.py [--repeats N] [--device cpu|cuda] [--quick]

Real geometry with random weights: CLIP ViT-L/14 at 336 px (cut after its second-to-last layer,
as both run it), an mlp2x_gelu projector into a 4096-wide LLM space, the 1.6 canvases. Each row is
one chat turn that brings new pictures, from decoded pictures to their spliceable features:

- ours: ``LlavaEngine.features_for`` (tiles of all new pictures in one tower batch, then unpad and
  newline per picture), with an empty cache;
- reference: ``LlavaNextImageProcessorPil`` + ``LlavaNextModel.get_image_features`` (the same
  weights; its processor pads every picture to the most tiles of the batch).

Seconds per picture, median of ``--repeats`` runs, and whether the features are equal. ``--quick``
uses a narrow tower and one run: it checks that the script still runs (CI runs it), not the speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

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
    from safetensors.torch import save_file
    from testbed.tiny_next import save_tower
    tower_dir = save_tower(os.path.join(folder, "clip"), SimpleModel(reference))
    projector = reference.multi_modal_projector
    save_file({"model.mm_projector.0.weight": projector.linear_1.weight.detach(),
               "model.mm_projector.0.bias": projector.linear_1.bias.detach(),
               "model.mm_projector.2.weight": projector.linear_2.weight.detach(),
               "model.mm_projector.2.bias": projector.linear_2.bias.detach(),
               "model.image_newline": reference.image_newline.detach()},
              os.path.join(folder, "mm_projector.safetensors"))
    return tower_dir


class SimpleModel:
    """What ``save_tower`` reads of a LlavaNextForConditionalGeneration."""

    def __init__(self, model):
        self.config = model.config
        self.model = model


def main(argv=None) -> int:
    from extensions.llava.detect import Choice
    from extensions.llava.engine import LlavaEngine
    from extensions.llava.pipelines import PIPELINES
    from extensions.llava.preprocess import tile_count
    from extensions.llava.prompt import ImageRef
    from extensions.llava.images import PilImage
    from extensions.llava.settings import Settings
    from testbed.photos import make_photo
    from testbed.tiny import picture
    from testbed.tiny_next import image_processor
    from PIL import Image

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="a narrow tower, one run: checks the script")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as folder:
        reference = build_reference(folder, args.quick)
        tower_dir = save_parts(reference, folder)
        reference.to(args.device)
        photo = Image.open(make_photo(os.path.join(folder, "photo.jpg"))).convert("RGB")
        pipeline = PIPELINES["llava-v1.6-vicuna-7b"]
        choice = Choice(pipeline, "benchmark", vision_source=tower_dir, projector_repo=folder,
                        projector_filename="mm_projector.safetensors")
        settings = Settings.from_params({"clip_device": args.device, "projector_device": args.device})
        processor = image_processor()
        print(f"device {args.device}, {torch.get_num_threads()} threads; seconds per picture, median of {args.repeats}")
        print(f"{'turn':24} {'views':>5} {'ours':>8} {'reference':>10} {'ratio':>6}  equal")
        for name, sizes in TURNS.items():
            images = [photo if size == (4000, 3000) else picture(*size, seed=i) for i, size in enumerate(sizes)]
            views = sum(tile_count(pipeline, *image.size) for image in images)
            ours_times, reference_times = [], []
            for _ in range(args.repeats):
                engine = LlavaEngine(settings, log=lambda m: None)
                engine.vision_parts(choice)  # loading is not timed
                refs = [ImageRef(i + 1, 0, 0, PilImage(image)) for i, image in enumerate(images)]
                start = time.perf_counter()
                ours = engine.features_for(refs, choice, reference.config.text_config.hidden_size)
                ours_times.append((time.perf_counter() - start) / len(images))
                start = time.perf_counter()
                batch = processor(images=images, return_tensors="pt")
                theirs = reference.get_image_features(batch["pixel_values"].to(args.device), batch["image_sizes"],
                                                      vision_feature_layer=-2,
                                                      vision_feature_select_strategy="default").pooler_output
                reference_times.append((time.perf_counter() - start) / len(images))
            equal = all(a.shape == b.shape and (a - b).abs().max().item() <= 1e-4 for a, b in zip(ours, theirs))
            ours_s, theirs_s = statistics.median(ours_times), statistics.median(reference_times)
            print(f"{name:24} {views:>5} {ours_s:>8.2f} {theirs_s:>10.2f} {ours_s / theirs_s:>6.2f}  {equal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
