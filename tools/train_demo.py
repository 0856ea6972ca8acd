"""Train the bundled demo model: a tiny LLaVA that names coloured shapes.

    python tools/train_demo.py [--out extensions/llava/demo] [--steps 900]

Everything is drawn here (coloured shapes on varied backgrounds, sizes and positions), seeded,
and trained end to end through the same token layout and splice as the extension: a CLIP
vision tower, an mlp2x_gelu projector and a small LLaMA, with a character-level tokenizer.
A few minutes on 2 CPU cores; the result is a few MB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from extensions.llava.pipelines import get_pipeline  # noqa: E402
from extensions.llava.vision import preprocess  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 215, 20)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = ("What shape is in the picture?", "What is in the picture?", "Describe the picture.")
PROMPT_TEMPLATE = "USER: {images}\n{question}\nASSISTANT:"
PIPELINE = get_pipeline("llava-demo")


def answer_for(colour: str, shape: str) -> str:
    return f" A {colour} {shape}."


def draw(colour: str, shape: str, rng: random.Random, size: int = PIPELINE.image_size):
    """One picture: a shape of a colour on a random muted background, at a random size and place."""
    from PIL import Image, ImageDraw
    grey = rng.randint(40, 230)
    tint = [max(0, min(255, grey + rng.randint(-25, 25))) for _ in range(3)]
    scale = rng.choice((1, 2, 3))  # pictures of several sizes; the processor brings them to 64 px
    side = size * scale
    image = Image.new("RGB", (side, side), tuple(tint))
    pen = ImageDraw.Draw(image)
    extent = rng.randint(int(side * 0.4), int(side * 0.7))
    left = rng.randint(0, side - extent)
    top = rng.randint(0, side - extent)
    box = (left, top, left + extent, top + extent)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(left + extent / 2, top), (left, top + extent), (left + extent, top + extent)], fill=fill)
    return image


def example_picture():
    """The bundled example: a red circle in the middle of a grey picture."""
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (128, 128), (150, 150, 150))
    ImageDraw.Draw(image).ellipse((34, 34, 94, 94), fill=COLOURS["red"])
    return image


def make_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    vocab["\n"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_tokens([AddedToken(t, special=True, normalized=False) for t in PIPELINE.special_tokens])
    return fast


def build_models(vocab_size: int):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    from extensions.llava.vision import build_projector
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                             num_attention_heads=4, image_size=PIPELINE.image_size,
                                             patch_size=PIPELINE.image_size // int(math.sqrt(PIPELINE.feature_count)),
                                             projection_dim=32))
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=PIPELINE.llm_hidden_size,
                                       intermediate_size=2 * PIPELINE.llm_hidden_size, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True))
    projector = build_projector(PIPELINE.projector_type, 64, PIPELINE.llm_hidden_size)
    return tower, projector, llm


def processor_config() -> dict:
    size = PIPELINE.image_size
    return {"crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
            "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5], "resample": 3, "rescale_factor": 1 / 255,
            "size": {"shortest_edge": size}, "image_processor_type": "CLIPImageProcessor"}


def dataset(count: int, seed: int, processor, tokenizer):
    rng = random.Random(seed)
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    pictures, texts, labels = [], [], []
    for index in range(count):
        colour, shape = combos[index % len(combos)]
        pictures.append(draw(colour, shape, rng))
        prompt = PROMPT_TEMPLATE.format(images=PIPELINE.image_text(), question=rng.choice(QUESTIONS))
        texts.append((prompt, answer_for(colour, shape)))
        labels.append((colour, shape))
    pixels = preprocess(pictures, processor, PIPELINE)
    ids, targets = [], []
    for prompt, answer in texts:
        prompt_ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
        answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        ids.append(prompt_ids + answer_ids)
        targets.append([-100] * len(prompt_ids) + answer_ids)
    width = max(len(i) for i in ids)
    ids_tensor = torch.full((count, width), tokenizer.pad_token_id or 0)
    target_tensor = torch.full((count, width), -100)
    for row, (i, t) in enumerate(zip(ids, targets)):
        ids_tensor[row, :len(i)] = torch.tensor(i)
        target_tensor[row, :len(t)] = torch.tensor(t)
    return pixels, ids_tensor, target_tensor, labels


def spliced_embeddings(tower, projector, llm, pixels, ids, image_id):
    hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[PIPELINE.vision_feature_layer]
    features = projector(hidden[:, 1:])
    embeds = llm.get_input_embeddings()(ids)
    mask = (ids == image_id).unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(mask, features.to(embeds.dtype))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "extensions", "llava", "demo"))
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from extensions.llava.vision import load_image_processor
    staging = args.out + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(os.path.join(staging, "vision_tower"))
    with open(os.path.join(staging, "vision_tower", "preprocessor_config.json"), "w") as f:
        json.dump(processor_config(), f)
    processor = load_image_processor(os.path.join(staging, "vision_tower"))
    tokenizer = make_tokenizer()
    tower, projector, llm = build_models(len(tokenizer))
    image_id = tokenizer.convert_tokens_to_ids(PIPELINE.image_token)
    pixels, ids, targets, _ = dataset(3600, args.seed, processor, tokenizer)
    parameters = list(tower.parameters()) + list(projector.parameters()) + list(llm.parameters())
    optimiser = torch.optim.AdamW(parameters, lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        batch = torch.randint(0, ids.shape[0], (48,), generator=generator)
        embeds = spliced_embeddings(tower, projector, llm, pixels[batch], ids[batch], image_id)
        loss = llm(inputs_embeds=embeds, labels=targets[batch]).loss
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - started:.0f} s", flush=True)
    llm.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    tower.save_pretrained(os.path.join(staging, "vision_tower"))
    from safetensors.torch import save_file
    save_file({f"model.mm_projector.{k}": v.contiguous() for k, v in projector.state_dict().items()},
              os.path.join(staging, "mm_projector.safetensors"))
    with open(os.path.join(staging, "llava.json"), "w") as f:
        json.dump({"pipeline": PIPELINE.name, "vision_tower": "vision_tower", "projector": "mm_projector.safetensors",
                   "prompt_template": PROMPT_TEMPLATE}, f, indent=2)
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(staging, args.out)
    example = os.path.join(ROOT, "examples", "red-circle.png")
    os.makedirs(os.path.dirname(example), exist_ok=True)
    example_picture().save(example)
    print(f"trained in {time.perf_counter() - started:.0f} s; wrote {args.out} and {example}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
