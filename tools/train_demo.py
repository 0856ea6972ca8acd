"""Train the bundled demo model: a tiny LLaVA that names coloured shapes.

    python tools/train_demo.py [--out extensions/llava/models/demo] [--steps 4000] [--batch-size 48] [--seed 1234]
        [--threads 2] [--quick]

Every picture is drawn here (a coloured shape on a varied background, at a random size,
place and angle) and the model is trained end to end through the same token layout and
splice as the extension: a small CLIP vision tower, an mlp2x_gelu projector and a small
LLaMA with a character-level tokenizer that holds the image tokens. Fresh pictures are
drawn for every step, so the model never sees the same picture twice.

Chats are rendered with the chat template the demo ships, which the webui's instruct mode
reads, and they look like what the extension receives: pictures before or after the
question, a follow-up question about the picture of the turn before, an earlier picture
with or without features ("embed all" on or off) before the one asked about.

The run is seeded: the same seed and thread count give the same weights (the bundled demo
was made with the defaults: two threads, about fifteen minutes). It writes about 1.5 MB.
At the end the saved folder is loaded the way `python -m extensions.llava ask` loads it
and scored on freshly drawn pictures, for each place a picture can take in a message.
``--quick`` trains a few steps into a temporary folder and scores a few pictures: it checks that
the script still runs (CI runs it), and leaves the bundled demo alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from extensions.llava.cli_ask import ASK_MESSAGE  # noqa: E402
from extensions.llava.families.pipelines import get_pipeline  # noqa: E402
from extensions.llava.vision.processors import fixed_views, load_image_processor  # noqa: E402
from extensions.llava.vision.projector import build_projector  # noqa: E402
from testbed import tool_output  # noqa: E402

PIPELINE = get_pipeline("llava-demo")
COLOURS = {"red": (215, 35, 35), "green": (35, 165, 50), "blue": (40, 70, 215), "yellow": (235, 210, 30)}
SHAPES = ("circle", "square", "triangle")
SHAPE_QUESTIONS = ("What shape is in the picture?", "What is in the picture?", "Describe the picture.",
                   "What do you see?")
COLOUR_QUESTION = "What colour is the shape?"
HELD_OUT_SEED = 2026  # the demo was trained with seed 1234: pictures drawn with this one are new to it
# The demo's conversation format, shipped as its tokenizer's chat template so that the webui's
# instruct mode renders chats exactly as the training did. Other roles (system) are left out.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' + message['content'] + '\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + message['content'] + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)
# Where pictures stand in a user message, by who puts them there.
MESSAGE_LAYOUTS = {
    "ask": ASK_MESSAGE,  # what `ask` sends, through the chat template
    "attach button": "{images}\n\n{question}",  # the webui's own attachments and its chat API
    "upload field": "{question}\n{images}",  # the extension's picture field appends to the message
}
ASK_LAYOUT = MESSAGE_LAYOUTS["ask"]
TOWER_WIDTH = 64
# The webui sets truncation_length from max_position_embeddings and defaults max_new_tokens to 512, so
# the context must leave room for both. RoPE has no learned positions: the size changes no weight.
DEMO_CONTEXT = 2048
TOWER_LAYERS = 4  # the pipeline reads the second to last layer's output, as LLaVA does
LEARNING_RATE = 1e-3
# Conversation kinds and the share of batches of each: one picture; an earlier picture in the
# same message; a text-only follow-up about the picture of the turn before; a new picture in
# a second turn.
CONVERSATION_SHARES = {"single": 0.5, "earlier picture": 0.15, "follow-up": 0.15, "new picture": 0.2}
EARLIER_FEATURES_SHARE = 0.5  # earlier pictures with features, as with "embed all" on
MAX_TURN = math.pi / 18  # polygons are turned by up to 10 degrees either way
EXAMPLE_PICTURE = os.path.join(ROOT, "examples", "red-circle.png")


def answer_for(question: str, colour: str, shape: str) -> str:
    if question == COLOUR_QUESTION:
        return f"{colour.capitalize()}."
    return f"A {colour} {shape}."


# ---------------------------------------------------------------- drawing


def muted_colour(rng: random.Random) -> np.ndarray:
    """A greyish colour: any brightness, a little tint, never as saturated as a shape."""
    grey = rng.randint(40, 225)
    return np.array([grey + rng.randint(-25, 25) for _ in range(3)], dtype=np.float32)


def background(side: int, rng: random.Random) -> np.ndarray:
    """A plain, graded or speckled muted background, [side, side, 3] floats."""
    style = rng.choice(("plain", "gradient", "speckled"))
    first = muted_colour(rng)
    canvas = np.broadcast_to(first, (side, side, 3)).copy()
    if style == "gradient":
        ramp = np.linspace(0.0, 1.0, side, dtype=np.float32)[:, None, None]
        if rng.random() < 0.5:
            ramp = ramp.transpose(1, 0, 2)
        canvas = np.broadcast_to(first * (1 - ramp) + muted_colour(rng) * ramp, (side, side, 3)).copy()
    elif style == "speckled":
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 12.0, (side, side, 1))
        canvas = canvas + noise.astype(np.float32)
    return canvas


def outline(shape: str, centre_x: float, centre_y: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Corners of a polygon shape inside the circle of ``radius``, turned by ``angle`` radians."""
    if shape == "square":
        corners = [(radius, math.pi / 4 + k * math.pi / 2) for k in range(4)]
    elif shape == "triangle":
        corners = [(radius, -math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
    elif shape == "star":
        corners = [(radius if k % 2 == 0 else radius * 0.42, -math.pi / 2 + k * math.pi / 5) for k in range(10)]
    else:
        raise ValueError(f"no outline for {shape!r}")
    return [(centre_x + r * math.cos(a + angle), centre_y + r * math.sin(a + angle)) for r, a in corners]


def draw(colour: str, shape: str, rng: random.Random):
    """One square picture of a ``colour`` ``shape``: random background, size, place and angle."""
    from PIL import Image, ImageDraw
    side = rng.randint(56, 200)
    canvas = Image.fromarray(np.clip(background(side, rng), 0, 255).astype(np.uint8))
    pen = ImageDraw.Draw(canvas)
    radius = side * rng.uniform(0.24, 0.4)
    centre_x = rng.uniform(radius, side - radius)
    centre_y = rng.uniform(radius, side - radius)
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    if shape == "circle":
        pen.ellipse((centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius), fill=fill)
    else:
        pen.polygon(outline(shape, centre_x, centre_y, radius, rng.uniform(-MAX_TURN, MAX_TURN)), fill=fill)
    return canvas


def example_picture():
    """The bundled example: a red circle in the middle of a grey picture."""
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (128, 128), (150, 150, 150))
    ImageDraw.Draw(image).ellipse((34, 34, 94, 94), fill=COLOURS["red"])
    return image


# ---------------------------------------------------------------- model parts


def make_tokenizer():
    """Characters of printable ASCII and newline, BOS/EOS/UNK, and the pipeline's image tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    vocab["\n"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<unk>")
    fast.add_tokens([AddedToken(t, special=True, normalized=False) for t in PIPELINE.special_tokens])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_models(vocab_size: int):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    patch = PIPELINE.image_size // math.isqrt(PIPELINE.feature_count)
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=TOWER_WIDTH, intermediate_size=2 * TOWER_WIDTH,
                                             num_hidden_layers=TOWER_LAYERS, num_attention_heads=4,
                                             image_size=PIPELINE.image_size, patch_size=patch, projection_dim=32))
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=PIPELINE.llm_hidden_size,
                                       intermediate_size=2 * PIPELINE.llm_hidden_size, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=DEMO_CONTEXT,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True))
    projector = build_projector(PIPELINE.projector_type, TOWER_WIDTH, PIPELINE.llm_hidden_size)
    return tower, projector, llm


def processor_config() -> dict:
    """A CLIPImageProcessor at the pipeline's resolution (resize the short side, centre crop)."""
    size = PIPELINE.image_size
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True}


# ---------------------------------------------------------------- training


@dataclass
class Conversation:
    """One training example: chat messages whose pictures are image token runs, and its pictures."""

    messages: list[dict]  # ends with an assistant answer about the last picture
    pictures: list[tuple[str, str]]  # (colour, shape) of every picture, in prompt order
    embed_all: bool  # earlier pictures get features too
    learned: set[int]  # indices of the answers trained on: those whose picture has features


class Batches:
    """Freshly drawn conversations with their ids and labels, every colour and shape equally often.

    A batch holds one kind of conversation, so single-turn batches stay short (no padding
    to the length of a two-turn chat).
    """

    def __init__(self, seed: int, processor, tokenizer):
        self.rng = random.Random(seed)
        self.processor = processor
        self.tokenizer = tokenizer
        self.combos = [(colour, shape) for colour in COLOURS for shape in SHAPES]

    def question(self) -> str:
        return COLOUR_QUESTION if self.rng.random() < 0.25 else self.rng.choice(SHAPE_QUESTIONS)

    def combo(self) -> tuple[str, str]:
        return self.combos[self.rng.randrange(len(self.combos))]

    def message(self, question: str, pictures: int) -> dict:
        layout = self.rng.choice(list(MESSAGE_LAYOUTS.values())) if pictures else "{question}"
        return {"role": "user", "content": layout.format(images=PIPELINE.image_text() * pictures, question=question)}

    def answer(self, question: str, about: tuple[str, str]) -> dict:
        return {"role": "assistant", "content": answer_for(question, *about)}

    def conversation(self, kind: str) -> Conversation:
        """A chat whose last answer is about the last picture, whatever came before it."""
        last, earlier = self.combo(), self.combo()
        embed_all = self.rng.random() < EARLIER_FEATURES_SHARE
        question = self.question()
        if kind == "single":
            return Conversation([self.message(question, 1), self.answer(question, last)], [last], embed_all, {1})
        if kind == "earlier picture":
            return Conversation([self.message(question, 2), self.answer(question, last)], [earlier, last],
                                embed_all, {1})
        first_question = self.question()
        if kind == "follow-up":
            return Conversation([self.message(first_question, 1), self.answer(first_question, last),
                                 self.message(question, 0), self.answer(question, last)], [last], embed_all, {1, 3})
        return Conversation([self.message(first_question, 1), self.answer(first_question, earlier),
                             self.message(question, 1), self.answer(question, last)], [earlier, last], embed_all,
                            {1, 3} if embed_all else {3})

    def ids_and_labels(self, conversation: Conversation) -> tuple[list[int], list[int]]:
        """Token ids of a rendered chat and its labels (-100 everywhere but the learned answers)."""
        render = self.tokenizer.apply_chat_template
        messages = conversation.messages
        ids, labels, done = [], [], ""
        for index in range(1, len(messages), 2):
            before = render(messages[:index], tokenize=False, add_generation_prompt=True)
            through = render(messages[:index + 1], tokenize=False)
            assert before.startswith(done) and through.startswith(before)
            prompt_ids = self.tokenizer.encode(before[len(done):], add_special_tokens=False)
            answer_ids = self.tokenizer.encode(through[len(before):], add_special_tokens=False)
            ids += prompt_ids + answer_ids
            labels += [-100] * len(prompt_ids) + (answer_ids if index in conversation.learned else [-100] * len(answer_ids))
            done = through
        return ids, labels

    def next(self, size: int):
        kind = self.rng.choices(list(CONVERSATION_SHARES), weights=list(CONVERSATION_SHARES.values()))[0]
        conversations = [self.conversation(kind) for _ in range(size)]
        featured = [c.pictures if c.embed_all else c.pictures[-1:] for c in conversations]
        pictures = [draw(colour, shape, self.rng) for row in featured for colour, shape in row]
        rows = [self.ids_and_labels(c) for c in conversations]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((size, width), self.tokenizer.pad_token_id)
        labels = torch.full((size, width), -100)
        mask = torch.zeros((size, width), dtype=torch.long)
        for row, (row_ids, row_labels) in enumerate(rows):
            ids[row, :len(row_ids)] = torch.tensor(row_ids)
            labels[row, :len(row_labels)] = torch.tensor(row_labels)
            mask[row, :len(row_ids)] = 1
        embed_all = torch.tensor([c.embed_all for c in conversations])
        return fixed_views(pictures, self.processor, pad=PIPELINE.preprocess == "pad"), ids, labels, mask, embed_all


def spliced_embeddings(tower, projector, llm, pixels, ids, image_id, embed_all):
    """The extension's splice, differentiable: projected patch features at the image token slots.

    ``pixels`` holds the featured pictures row by row: every picture of a row with
    ``embed_all``, else only its last one (earlier ones keep their image token embeddings).
    """
    hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[PIPELINE.vision_feature_layer]
    features = projector(hidden[:, 1:])  # the CLS position carries no patch
    embeds = llm.get_input_embeddings()(ids)
    slots = ids == image_id
    picture = (slots.cumsum(1) - 1) // PIPELINE.feature_count
    last_picture = slots.sum(1, keepdim=True) // PIPELINE.feature_count - 1
    slots &= embed_all.unsqueeze(1) | (picture == last_picture)
    return embeds.masked_scatter(slots.unsqueeze(-1).expand_as(embeds), features.to(embeds.dtype))


def train(steps: int, batch_size: int, seed: int, processor, tokenizer, log=print):
    torch.manual_seed(seed)
    tower, projector, llm = build_models(len(tokenizer))
    image_id = tokenizer.convert_tokens_to_ids(PIPELINE.image_token)
    batches = Batches(seed, processor, tokenizer)
    parameters = [p for part in (tower, projector, llm) for p in part.parameters()]
    optimiser = torch.optim.AdamW(parameters, lr=LEARNING_RATE, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=LEARNING_RATE, total_steps=steps, pct_start=0.1)
    started = time.perf_counter()
    for step in range(steps):
        pixels, ids, labels, mask, embed_all = batches.next(batch_size)
        embeds = spliced_embeddings(tower, projector, llm, pixels, ids, image_id, embed_all)
        loss = llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - started:5.0f} s")
    return tower, projector, llm


def save(folder: str, tower, projector, llm, tokenizer) -> None:
    """The layout `ask` and the webui read: LLM and tokenizer at the root, tower in a subfolder."""
    from safetensors.torch import save_file
    llm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tower.save_pretrained(os.path.join(folder, "vision_tower"))
    with open(os.path.join(folder, "vision_tower", "preprocessor_config.json"), "w") as f:
        json.dump(processor_config(), f, indent=2)
    save_file({f"model.mm_projector.{k}": v.contiguous() for k, v in projector.state_dict().items()},
              os.path.join(folder, "mm_projector.safetensors"))
    with open(os.path.join(folder, "llava.json"), "w") as f:
        json.dump({"pipeline": PIPELINE.name, "vision_tower": "vision_tower", "projector": "mm_projector.safetensors"},
                  f, indent=2)


def one_message_prompt(tokenizer, content: str) -> str:
    """A chat of one user message rendered by the chat template, without BOS (encoders add it)."""
    message = {"role": "user", "content": content}
    return tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True, bos_token="")


def held_out_accuracy(folder: str, seed: int, per_combination: int,
                      combinations: int | None = None) -> dict[str, tuple[float, list[str]]]:
    """Per place of the pictures in the message, the share of fresh pictures the saved model names right (colour and
    shape), the prompt rendered by its chat template as the webui renders it; ``combinations`` limits the
    colour and shape pairs scored (all by default)."""
    from extensions.llava.cli_ask import Asker
    from extensions.llava.media.items import data_url
    asker = Asker(folder)
    rng = random.Random(seed)
    pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES][:combinations]
    scores = {}
    for origin, layout in MESSAGE_LAYOUTS.items():
        right, mistakes = 0, []
        for colour, shape in pairs * per_combination:
            tag = f'<img src="{data_url(draw(colour, shape, rng))}">'
            content = layout.format(images=tag, question=SHAPE_QUESTIONS[0])
            answer = asker.answer(one_message_prompt(asker.tokenizer, content))
            if colour in answer and shape in answer:
                right += 1
            else:
                mistakes.append(f"{colour} {shape} → {answer!r}")
        scores[origin] = right / (len(pairs) * per_combination), mistakes
    return scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "extensions", "llava", "models", "demo"))
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the result depends on it)")
    parser.add_argument("--no-example", action="store_true", help="do not (re)write examples/red-circle.png")
    parser.add_argument("--quick", action="store_true",
                        help="a few steps into a temporary folder, a few pictures scored: checks the script")
    args = parser.parse_args(argv)
    tool_output.start(args.quick)
    scored = (25, None)  # pictures scored per combination, combinations scored (None: all)
    if args.quick:
        args.steps, args.batch_size, args.no_example, scored = 4, 4, True, (1, 1)
        if "--out" not in (argv if argv is not None else sys.argv):
            with tempfile.TemporaryDirectory(prefix="llava-demo-") as folder:  # gone after the run
                args.out = os.path.join(folder, "demo")
                return train_and_score(args, *scored)
    return train_and_score(args, *scored)


def train_and_score(args, scored_per_combination: int, scored_combinations) -> int:
    torch.set_num_threads(args.threads)
    staging = args.out.rstrip("/") + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(os.path.join(staging, "vision_tower"))
    with open(os.path.join(staging, "vision_tower", "preprocessor_config.json"), "w") as f:
        json.dump(processor_config(), f)
    processor = load_image_processor(os.path.join(staging, "vision_tower"))
    tokenizer = make_tokenizer()
    started = time.perf_counter()
    tower, projector, llm = train(args.steps, args.batch_size, args.seed, processor, tokenizer)
    trained_in = time.perf_counter() - started
    save(staging, tower, projector, llm, tokenizer)
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(staging, args.out)
    if not args.no_example:
        os.makedirs(os.path.dirname(EXAMPLE_PICTURE), exist_ok=True)
        example_picture().save(EXAMPLE_PICTURE)
    size = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(args.out) for n in names)
    print(f"trained in {trained_in:.0f} s on {args.threads} thread(s); {args.out}: {size / 2**20:.2f} MB")
    scores = held_out_accuracy(args.out, seed=args.seed + 1, per_combination=scored_per_combination,
                               combinations=scored_combinations)
    for origin, (accuracy, mistakes) in scores.items():
        print(f"held-out accuracy, pictures placed as by the {origin}: {accuracy:.1%}"
              + (f" (after {args.steps} steps: not meaningful)" if args.quick else ""))
        for mistake in mistakes[:5]:
            print("  wrong:", mistake)
    return 0

if __name__ == "__main__":
    sys.exit(main())
