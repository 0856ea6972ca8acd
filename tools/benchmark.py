"""Speed figures of the llava extension, each measured side by side in one run, as ratios.

    python tools/benchmark.py [--threads N] [--quick]

Random weights at the real ViT-L/14 width (224 px, 24 layers, 1024 wide) and a LLaMA-13b
sized projector output (5120); no download. --quick uses a narrow tower and fewer repeats: it
checks that every figure still runs (CI runs it), not the speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from extensions.llava.engine import LlavaEngine  # noqa: E402
from extensions.llava.prompt.parse import parse_prompt  # noqa: E402
from extensions.llava.settings import Settings  # noqa: E402
from extensions.llava.families.base import TokenLayout  # noqa: E402
from extensions.llava.tokens.splice import find_images, splice  # noqa: E402
from testbed import tiny, tool_output  # noqa: E402
from testbed.tool_output import target  # noqa: E402


def best_of(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def build(folder: str, quick: bool):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    width, layers, heads = (64, 4, 2) if quick else (1024, 24, 16)
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=224, patch_size=14, projection_dim=768)
    torch.manual_seed(0)
    clip_dir = os.path.join(folder, "clip")
    CLIPVisionModel(config).save_pretrained(clip_dir)
    import json
    with open(os.path.join(clip_dir, "preprocessor_config.json"), "w") as f:
        json.dump(tiny.processor_config(224), f)
    llm_width = 256 if quick else 5120
    state = tiny.save_projector(os.path.join(folder, "projector", "mm_projector.bin"), in_width=width,
                                out_width=llm_width)
    tokenizer = tiny.make_tokenizer()
    llm = tiny.make_llm(len(tokenizer), width=64)
    # the LLM stays tiny: only its input embeddings matter here, widened to the 13b size
    llm.resize_token_embeddings(len(tokenizer))
    embeddings = torch.nn.Embedding(len(tokenizer), llm_width)
    llm.set_input_embeddings(embeddings)
    params = {"clip_repo": clip_dir, "projector_repo": os.path.join(folder, "projector"),
              "projector_filename": "mm_projector.bin", "clip_device": "cpu", "projector_device": "cpu",
              "pipeline": "llava-v0-13b"}
    return clip_dir, state, tokenizer, llm, params, config


class Bench:
    """What every figure needs: the tiny LLM with its 13b-wide embeddings, and engines over the same weights."""

    def __init__(self, quick: bool, folder: str):
        self.quick = quick
        self.clip_dir, _, self.tokenizer, self.llm, self.params, self.vision_config = build(folder, quick)
        from testbed.tiny import BosEncoder
        self.encode = BosEncoder(self.tokenizer)
        self.width = self.llm.get_input_embeddings().weight.shape[1]
        self.photo = tiny.picture(640, 480, seed=1)

    def engine(self, **extra) -> LlavaEngine:
        return LlavaEngine(Settings.from_params({**self.params, **extra}), log=lambda m: None)


def one_image(bench: Bench):
    """1. ours against transformers' LLaVA image features, same weights; returns our encode for figure 5."""
    from transformers import CLIPVisionModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from extensions.llava.vision.processors import load_image_processor
    reference = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=bench.vision_config.to_dict(), image_token_id=32000,
        text_config=LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=16, num_hidden_layers=1,
                                num_attention_heads=4).to_dict())).eval()
    reference.model.vision_tower.load_state_dict(CLIPVisionModel.from_pretrained(bench.clip_dir).state_dict())
    processor = load_image_processor(bench.clip_dir)
    ours = bench.engine()
    vision = ours.features.vision_parts(ours.bind(bench.llm, bench.tokenizer).choice)
    reference.model.multi_modal_projector = vision.projector  # the same v0 projector on both sides

    def reference_features():
        with torch.inference_mode():
            pixels = processor(images=[bench.photo], return_tensors="pt")["pixel_values"]
            reference.model.get_image_features(pixels, vision_feature_layer=-2, vision_feature_select_strategy="default")

    def our_features():
        vision.encode([bench.photo], "one view")

    for _ in range(2):
        reference_features(), our_features()
    reference_time, our_time = [], []
    for _ in range(5):  # interleaved, so both see the same machine state
        reference_time.append(best_of(reference_features, 1))
        our_time.append(best_of(our_features, 1))
    ref_t, our_t = statistics.median(reference_time), statistics.median(our_time)
    print(f"1. one image: ours {our_t * 1000:.0f} ms, transformers LLaVA {ref_t * 1000:.0f} ms, "
          f"ratio {our_t / ref_t:.3f}{target('<= 1.05', bench.quick)}")
    return our_features


def ten_turn_chat(bench: Bench) -> None:
    """2. a 10-turn chat, one new picture per turn, against re-encoding every picture each turn."""
    pictures = [tiny.img_tag(tiny.picture(320, 240, seed=10 + turn)) for turn in range(10)]

    def chat(eng, embed_all):
        history = ""
        started = time.perf_counter()
        for turn in range(10):
            history += f"USER: picture {turn}: {pictures[turn]}\nASSISTANT: ok\n"
            eng.prepare(history, eng.bind(bench.llm, bench.tokenizer, encode=bench.encode), embed_all=embed_all)
        return time.perf_counter() - started, eng.counters.vision_forwards

    naive_time, naive_forwards = chat(bench.engine(cache_size_mb=0), True)
    for embed_all in (True, False):
        our_chat_time, our_forwards = chat(bench.engine(), embed_all)
        print(f"2. 10-turn chat, embed all {'on' if embed_all else 'off'}: {our_forwards} vision forwards "
              f"(re-encoding everything: {naive_forwards}), {our_chat_time:.2f} s against {naive_time:.2f} s, "
              f"ratio {our_chat_time / naive_time:.3f}")


def cache_hit_and_counting(bench: Bench) -> None:
    """3. a cache hit against a first encode; 4. token counting on a prompt with 10 × 1 MB images."""
    eng = bench.engine()
    loaded = eng.bind(bench.llm, bench.tokenizer, encode=bench.encode)
    choice = loaded.choice
    images = parse_prompt("x " + tiny.img_tag(tiny.picture(640, 480, seed=99))).items
    layouts = loaded.family.arrange(choice.pipeline, len(images))
    eng.features.vision_parts(choice)
    first = best_of(lambda: eng.features.features_for(images, layouts, choice, bench.width), 1)
    hit = best_of(lambda: eng.features.features_for(images, layouts, choice, bench.width), 20)
    print(f"3. cache hit {hit * 1e6:.0f} µs against first encode {first * 1000:.0f} ms: "
          f"{first / hit:.0f}× faster{target('>= 50×', bench.quick)}")
    payload = "data:image/png;base64," + "A" * (1 << 20)
    big = "".join(f"USER: picture {i} <img src=\"{payload}\">\nASSISTANT: ok\n" for i in range(10))
    count = best_of(lambda: eng.token_count(big, loaded), 5)
    print(f"4. custom_tokenized_length with 10 × 1 MB images: {count * 1000:.1f} ms{target('<= 20 ms', bench.quick)}")


def splice_against_forward(bench: Bench, our_features) -> None:
    """5. the splice at a 4k-token prompt against one vision forward."""
    layout = TokenLayout(32000, 32001, 32002)
    tag = tiny.img_tag(tiny.picture(seed=5))
    expanded = ("word " * 700 + tag + " more " * 100).replace(tag, "<im_start>" + "<im_patch>" * 256 + "<im_end>")
    ids = bench.encode(expanded)[:, :4096]
    features = torch.randn(256, bench.width)
    embeds = bench.llm.get_input_embeddings()(ids).detach()

    def splice_once():
        spans = find_images(ids[0], layout, torch.tensor([256]))
        splice(embeds, spans.slots, features)

    splice_time = best_of(splice_once, 20)
    forward = best_of(our_features, 3)
    print(f"5. splice at {ids.shape[1]} tokens × {bench.width}: {splice_time * 1000:.2f} ms against one vision "
          f"forward {forward * 1000:.0f} ms: {100 * splice_time / forward:.2f} %{target('<= 2 %', bench.quick)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a narrow tower: checks the script, not the speed")
    args = parser.parse_args(argv)
    tool_output.start(args.quick)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} using {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory(prefix="llava-benchmark-") as folder:
        bench = Bench(args.quick, folder)
        our_features = one_image(bench)
        ten_turn_chat(bench)
        cache_hit_and_counting(bench)
        splice_against_forward(bench, our_features)
    return 0


if __name__ == "__main__":
    sys.exit(main())
