"""Vision on the CPU: an 8-bit tower against float32 and bfloat16 (the figures behind ``clip_bits``).

    python tools/benchmark_vision_cpu.py [--quick]

1. ViT-L/14 at 224 px (random weights, the seed pipeline's geometry; the tower stops at the
   second-to-last layer, as the extension runs it): seconds per picture, batch 1, median of 5, and
   the cosine similarity of each patch feature to float32.
2. The bundled demo's held-out accuracy with its tower in float32 and in 8 bits.
8 bits is torch's dynamic quantization of the Linear layers (int8 weights, activations quantized
per batch), which needs no calibration data. ``--quick`` uses a narrow tower, one timed run and
a few demo pictures: it checks that the script still runs (CI runs it), not the speed.
"""

import os
import random
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from testbed import tool_output  # noqa: E402


def quantized(tower):
    return torch.ao.quantization.quantize_dynamic(tower, {torch.nn.Linear}, dtype=torch.qint8)


def seconds_per_picture(tower, pixels, dtype, repeats):
    times = []
    with torch.inference_mode():
        tower(pixel_values=pixels.to(dtype))
        for _ in range(repeats):
            start = time.perf_counter()
            tower(pixel_values=pixels.to(dtype))
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def features(tower, pixels, dtype):
    with torch.inference_mode():
        return tower(pixel_values=pixels.to(dtype)).last_hidden_state[:, 1:].float()


def vit_l14(quick: bool = False):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    width, heads = (64, 2) if quick else (1024, 16)
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_attention_heads=heads,
                              num_hidden_layers=23, image_size=224, patch_size=14)  # 24 layers, cut after 23
    return CLIPVisionModel(config).eval()


def demo_accuracy(bits: int, per_combination: int = 10, combinations: int | None = None) -> float:
    from extensions.llava.cli_ask import Asker
    from extensions.llava.media.items import data_url
    from tools.train_demo import COLOURS, HELD_OUT_SEED, SHAPES, draw

    def tag(image):
        return f'<img src="{data_url(image)}">'

    question = "What shape is in the picture?"
    combinations = [(c, s) for c in COLOURS for s in SHAPES][:combinations]
    asker = Asker()
    asker.ask_tags([tag(draw("red", "circle", random.Random(0)))], question)  # loads the vision parts
    if bits == 8:
        vision = asker.engine.features.vision_parts(asker.loaded.choice)
        vision.tower = quantized(vision.tower)
        asker.engine.cache.resize(0)
    rng = random.Random(HELD_OUT_SEED)
    right = 0
    for colour, shape in combinations:
        for _ in range(per_combination):
            answer = asker.ask_tags([tag(draw(colour, shape, rng))], question)
            right += colour in answer and shape in answer
    return right / (len(combinations) * per_combination)


def main(argv=None):
    quick = "--quick" in (sys.argv[1:] if argv is None else argv)
    repeats, per_combination, combinations = (1, 1, 2) if quick else (5, 10, None)
    tool_output.start(quick)
    torch.set_num_threads(os.cpu_count() or 1)
    tower = vit_l14(quick)
    pixels = torch.randn(1, 3, 224, 224)
    reference = features(tower, pixels, torch.float32)
    rows = [("float32", tower, torch.float32), ("bfloat16", vit_l14(quick).to(torch.bfloat16), torch.bfloat16),
            ("int8 (dynamic)", quantized(vit_l14(quick)), torch.float32)]
    base = None
    print(f"1. ViT-L/14, 224 px, batch 1, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, model, dtype in rows:
        seconds = seconds_per_picture(model, pixels, dtype, repeats)
        base = base or seconds
        cosine = torch.nn.functional.cosine_similarity(features(model, pixels, dtype), reference, dim=-1)
        print(f"   {name:15s} {seconds:6.3f} s/picture  speed-up {base / seconds:4.2f}x  "
              f"patch cosine mean {cosine.mean():.5f} min {cosine.min():.5f}")
    for bits in (32, 8):
        pictures = per_combination * (combinations or 12)
        print(f"2. demo held-out accuracy, tower in {bits} bits: "
              f"{demo_accuracy(bits, per_combination, combinations):.1%} ({pictures} pictures)")


if __name__ == "__main__":
    main()
