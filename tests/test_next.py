"""Issue 15: LLaVA-NeXT (1.6) — any-resolution pictures against transformers'
LlavaNextForConditionalGeneration, converted from both layouts, and per-picture slot counts
through counting, truncation, the cache and batching."""

from __future__ import annotations

import functools
import io
import json
import os
import random
import time

import pytest
import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import AutoModelForCausalLM, AutoTokenizer

from extensions.llava import convert as converter
from extensions.llava.engine import LlavaEngine
from extensions.llava.pipelines import NEXT_PINPOINTS, PIPELINES
from extensions.llava.preprocess import canvas_patches, max_slot_count, slot_count
from extensions.llava.settings import Settings
from testbed.tiny import BosEncoder, bytes_url, img_tag, make_tokenizer, picture, reference_run
from testbed.tiny_family import IMAGE_ID
from testbed.tiny_next import build_next, image_processor, processor, save_next_hf, save_next_original, save_tower

CPU = {"clip_device": "cpu", "projector_device": "cpu"}
NEXT = PIPELINES["llava-v1.6-vicuna-7b"]

# (width, height): different canvases, a picture smaller than a tile, a very wide one
SIZES = {"wide": (500, 300), "tall": (300, 520), "square": (900, 880), "small": (200, 150),
         "very-wide": (2400, 200), "ceil-resize": (700, 300)}


@pytest.fixture(scope="module")
def reference():
    return build_next()


@pytest.fixture(scope="module")
def converted(reference, tmp_path_factory):
    model, tokenizer = reference
    folder = tmp_path_factory.mktemp("next")
    src = save_next_hf(str(folder / "llava-v1.6-vicuna-7b-hf"), model, tokenizer)
    dst = str(folder / "converted")
    converter.convert(src, dst, log=lambda line: None)
    return load(dst)


def load(dst):
    model, info = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval(), AutoTokenizer.from_pretrained(dst), dst


def engine_for(**settings):
    return LlavaEngine(Settings.from_params({**CPU, **settings}), log=lambda m: None)


@functools.lru_cache(maxsize=1)
def reference_processor():
    return processor(make_tokenizer(image_tokens=("<image>",)))


def reference_count(width, height):
    """The reference processor's image token count for a picture of this size."""
    return reference_processor()._get_number_of_features(height, width, 336, 336) - 1  # "default" drops CLS


def run_both(converted, reference, images, embed_all=True):
    model, tokenizer, dst = converted
    engine = engine_for()
    prompt = "USER: " + " ".join(img_tag(image) for image in images) + "\nWhat is shown? ASSISTANT:"
    prepared = engine.prepare(prompt, model=model, tokenizer=tokenizer, encode=BosEncoder(tokenizer),
                              max_length=None, embed_all=embed_all)
    with torch.no_grad():
        logits = model(inputs_embeds=prepared.inputs_embeds).logits
    batch = image_processor()(images=images, return_tensors="pt")
    earlier = None if embed_all else reference[0].model.language_model.embed_tokens.weight[IMAGE_ID]
    ref_embeds, ref_logits = reference_run(reference[0], prepared.input_ids, batch["pixel_values"], earlier,
                                           image_sizes=batch["image_sizes"])
    embed_diff = (prepared.inputs_embeds - ref_embeds).abs().max().item()
    logit_diff = (logits - ref_logits).abs().max().item()
    print(f"{[image.size for image in images]} embed_all={embed_all}: max embed diff {embed_diff:.3g}, "
          f"max logit diff {logit_diff:.3g}")
    assert embed_diff <= 1e-4 and logit_diff <= 1e-4
    return engine, prepared


# ---------------------------------------------------------------- slot counts


def test_slot_count_is_the_reference_processors_for_any_size():
    rng = random.Random(5)
    sizes = [(rng.randint(1, 6000), rng.randint(1, 6000)) for _ in range(1500)] + list(SIZES.values())
    sizes += [(1, 1), (1, 5000), (5000, 1), (336, 336), (672, 336), (1008, 336)]
    counts = {size: slot_count(NEXT, *size) for size in sizes}
    assert counts == {size: reference_count(*size) for size in sizes}
    assert slot_count(NEXT, 200, 150) == 1368 and slot_count(NEXT, 700, 300) == 1944
    assert max(counts.values()) <= max_slot_count(NEXT) == 2928


def test_the_sizes_pick_different_canvases():
    canvases = {name: canvas_patches(NEXT, *size) for name, size in SIZES.items()}
    assert len(set(canvases.values())) >= 4, canvases
    assert canvases["very-wide"] == (24, 72) and canvases["tall"] == (48, 24)


# ---------------------------------------------------------------- equality with LlavaNextForConditionalGeneration


@pytest.mark.parametrize("name", list(SIZES))
def test_next_equals_reference(converted, reference, name):
    width, height = SIZES[name]
    image = picture(width, height, seed=hash(name) % 1000)
    engine, prepared = run_both(converted, reference, [image])
    assert int((prepared.input_ids == IMAGE_ID).sum()) == reference_count(width, height) == slot_count(NEXT, width, height)
    assert engine.counters.vision_forwards == 1


@pytest.mark.parametrize("embed_all", [True, False], ids=["embed-all", "last-only"])
def test_two_pictures(converted, reference, embed_all):
    images = [picture(*SIZES["wide"], seed=61), picture(*SIZES["tall"], seed=62)]
    engine, prepared = run_both(converted, reference, images, embed_all=embed_all)
    assert prepared.images_embedded == (2 if embed_all else 1)
    assert int((prepared.input_ids == IMAGE_ID).sum()) == sum(reference_count(*image.size) for image in images)
    # all new pictures' tiles go through the tower together
    assert engine.counters.vision_batches == 1 and engine.counters.vision_forwards == (2 if embed_all else 1)


def test_original_layout_round_trip(reference, tmp_path):
    model, tokenizer = reference
    tower = save_tower(str(tmp_path / "clip-vit-large-patch14-336"), model)
    src = save_next_original(str(tmp_path / "llava-v1.6-vicuna-7b"), model, tokenizer, tower)
    dst = str(tmp_path / "converted")
    converter.convert(src, dst, log=lambda line: None)
    metadata = json.load(open(os.path.join(dst, "llava.json")))
    row = metadata["pipeline"]
    assert row["preprocess"] == "anyres" and [tuple(p) for p in row["grid_pinpoints"]] == list(NEXT_PINPOINTS)
    run_both(load(dst), reference, [picture(*SIZES["square"], seed=71)])


def test_llava_hf_mistral_round_trip(tmp_path):
    """llava-v1.6-mistral-7b-hf's layout: a MistralForCausalLM comes out, equal to the reference."""
    model, tokenizer = build_next(seed=52, mistral=True)
    assert model.config.text_config.model_type == "mistral"
    src = save_next_hf(str(tmp_path / "llava-v1.6-mistral-7b-hf"), model, tokenizer)
    dst = str(tmp_path / "converted")
    converter.convert(src, dst, log=lambda line: None)
    converted = load(dst)
    assert type(converted[0]).__name__ == "MistralForCausalLM"
    run_both(converted, (model, tokenizer), [picture(*SIZES["tall"], seed=54)])


def test_llava_hf_round_trip_keeps_the_newline(converted, reference):
    from safetensors.torch import load_file
    _, _, dst = converted
    saved = load_file(os.path.join(dst, "mm_projector.safetensors"))
    assert torch.equal(saved["model.image_newline"], reference[0].model.image_newline.detach())
    assert json.load(open(os.path.join(dst, "llava.json")))["pipeline"]["name"].endswith("(from its config)")


# ---------------------------------------------------------------- counts through counting, truncation and the cache


def jpeg_turned_a_quarter(width, height):
    """A JPEG stored ``width`` × ``height`` whose EXIF says to show it turned 90°."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    picture(width, height, seed=81).save(buffer, "JPEG", exif=exif.tobytes())
    return bytes_url(buffer.getvalue(), "image/jpeg")


def test_token_count_reads_headers_only_and_agrees_with_prepare(converted, monkeypatch):
    model, tokenizer, _ = converted
    engine = engine_for()
    encode = BosEncoder(tokenizer)
    url = jpeg_turned_a_quarter(600, 300)  # shown 300 wide, 600 tall
    prompt = f'USER: <img src="{url}"> and {img_tag(picture(*SIZES["very-wide"], seed=82))} ASSISTANT:'
    from extensions.llava import images
    opened = []
    monkeypatch.setattr(images, "open_picture", lambda *a: opened.append(1) or pytest.fail("decoded"))
    counted = engine.token_count(prompt, model, tokenizer, encode)
    assert not opened
    monkeypatch.undo()
    prepared = engine.prepare(prompt, model=model, tokenizer=tokenizer, encode=encode, max_length=None)
    assert counted == prepared.input_ids.shape[1]
    assert int((prepared.input_ids == IMAGE_ID).sum()) == slot_count(NEXT, 300, 600) + slot_count(NEXT, 2400, 200)


def noisy_picture(fmt: str, size=(700, 500), icc_bytes: int = 0, turned: bool = True) -> tuple[str, tuple]:
    """A data URL of a noisy (so large) picture in ``fmt``, turned by its EXIF where the format has
    one, with an ICC profile of ``icc_bytes`` in front of its pixels; and its upright size."""
    pixels = np.random.default_rng(7).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    options = {}
    if turned and fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        exif = Image.Exif()
        exif[0x0112] = 6
        options["exif"] = exif.tobytes()
    if icc_bytes:
        options["icc_profile"] = np.random.default_rng(3).bytes(icc_bytes)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue()))).size
    return bytes_url(buffer.getvalue(), f"image/{fmt.lower()}"), upright


def full_decodes(monkeypatch) -> list[int]:
    """Records the length of every base64 payload decoded whole."""
    from extensions.llava import images
    calls, decode = [], images.decode_base64
    monkeypatch.setattr(images, "decode_base64", lambda payload, source: calls.append(len(payload)) or
                        decode(payload, source))
    return calls


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_a_header_is_read_from_the_start_of_the_data(fmt, monkeypatch):
    """The trimming loop counts every picture on every pass: a picture's size comes from the first
    64 K characters of its data (larger headers from more), never by decoding all of it."""
    from extensions.llava.images import HEADER_PREFIX_CHARS, InlineImage
    url, upright = noisy_picture(fmt)
    assert len(url) > 4 * HEADER_PREFIX_CHARS[0]
    decoded = full_decodes(monkeypatch)
    assert InlineImage.from_url(url).header() == upright
    # Pillow reads a WebP only whole (its EXIF follows its pixels)
    assert decoded == ([] if fmt != "WEBP" else [len(url) - url.index(",") - 1])
    assert InlineImage.from_url(url).load().image.size == upright


@pytest.mark.parametrize("icc_bytes, whole", [(300_000, False), (900_000, True)])
def test_a_long_header_is_read_from_more_of_the_data(icc_bytes, whole, monkeypatch):
    from extensions.llava.images import HEADER_PREFIX_CHARS, InlineImage
    url, upright = noisy_picture("JPEG", size=(1400, 1000), icc_bytes=icc_bytes)
    assert len(url) > HEADER_PREFIX_CHARS[1]
    decoded = full_decodes(monkeypatch)
    assert InlineImage.from_url(url).header() == upright == (1000, 1400)
    assert bool(decoded) == whole


def test_a_photos_header_costs_no_more_than_a_small_pictures(tmp_path, monkeypatch):
    from extensions.llava.images import InlineImage
    from testbed.photos import make_photo
    with open(make_photo(str(tmp_path / "photo.jpg")), "rb") as f:
        url = bytes_url(f.read(), "image/jpeg")
    decoded = full_decodes(monkeypatch)
    started = time.perf_counter()
    for _ in range(20):
        assert InlineImage.from_url(url).header() == (4000, 3000)
    per_header = (time.perf_counter() - started) / 20
    print(f"header of a {len(url) / 1e6:.1f} M-character photo: {per_header * 1e3:.2f} ms")
    assert not decoded and per_header < 0.010  # decoding all of it takes about 18 ms


def test_placeholders_count_as_their_pictures(converted):
    """``<__media__>`` attachments count at their own sizes; unseen ones at the most a picture takes."""
    from extensions.llava.images import InlineImage
    model, tokenizer, _ = converted
    engine = engine_for()
    encode = BosEncoder(tokenizer)
    media = [InlineImage.from_url(jpeg_turned_a_quarter(600, 300)),
             InlineImage.from_url(img_tag(picture(*SIZES["small"]))[10:-2])]
    prompt = "USER: <__media__><__media__>\nHi ASSISTANT:"
    text_only = len(encode("USER: \nHi ASSISTANT:")[0])
    assert engine.token_count(prompt, model, tokenizer, encode, media=media) == \
        text_only + slot_count(NEXT, 300, 600) + slot_count(NEXT, 200, 150)
    assert engine.token_count(prompt, model, tokenizer, encode) == text_only + 2 * max_slot_count(NEXT)
    prepared = engine.prepare(prompt, model=model, tokenizer=tokenizer, encode=encode, max_length=None, media=media)
    assert prepared.input_ids.shape[1] == text_only + slot_count(NEXT, 300, 600) + slot_count(NEXT, 200, 150)


def test_truncation_drops_whole_pictures_of_different_sizes(converted):
    model, tokenizer, _ = converted
    engine = engine_for()
    encode = BosEncoder(tokenizer)
    images = [picture(*SIZES["very-wide"], seed=91), picture(*SIZES["small"], seed=92)]
    prompt = f"A {img_tag(images[0])} B {img_tag(images[1])} C"
    full = engine.prepare(prompt, model=model, tokenizer=tokenizer, encode=encode, max_length=None)
    small = slot_count(NEXT, *SIZES["small"])
    for max_length in (small + 10, full.input_ids.shape[1] - 100):  # cuts inside the first picture
        prepared = engine.prepare(prompt, model=model, tokenizer=tokenizer, encode=encode, max_length=max_length)
        assert prepared.images_dropped == 1 and prepared.input_ids.shape[1] <= max_length
        assert int((prepared.input_ids == IMAGE_ID).sum()) == small
        assert torch.equal(prepared.inputs_embeds[0, -prepared.input_ids.shape[1]:],
                           full.inputs_embeds[0, -prepared.input_ids.shape[1]:])


def test_cache_serves_a_picture_again_without_the_tower(converted):
    model, tokenizer, _ = converted
    engine = engine_for()
    encode = BosEncoder(tokenizer)
    tag = img_tag(picture(*SIZES["tall"], seed=95))
    first = engine.prepare(f"Look {tag}", model=model, tokenizer=tokenizer, encode=encode, max_length=None)
    again = engine.prepare(f"Look {tag} again {img_tag(picture(*SIZES['wide'], seed=96))}", model=model,
                           tokenizer=tokenizer, encode=encode, max_length=None, embed_all=True)
    assert engine.counters.vision_forwards == 2 and engine.cache.stats.hits == 1
    n = first.input_ids.shape[1]
    assert torch.equal(again.inputs_embeds[0, :n], first.inputs_embeds[0, :n])


# ---------------------------------------------------------------- the webui's history trimming


def test_history_trimming_keeps_whole_pictures_of_different_sizes(converted, host_factory):
    """Three chat turns with attached pictures of different sizes fill the context: the host drops the
    oldest turns by the length the extension reports (each picture at its own slot count) until the
    prompt fits, so the tokenizer hook never has to cut a picture."""
    model, tokenizer, dst = converted
    host = host_factory(model=model, tokenizer=tokenizer, model_dir=os.path.dirname(dst),
                        model_name=os.path.basename(dst), settings={f"llava-{k}": v for k, v in CPU.items()})
    sizes = [SIZES["small"], SIZES["very-wide"], SIZES["square"]]
    counts = [slot_count(NEXT, *size) for size in sizes]  # 1368, 1014, 2830
    assert len(set(counts)) == 3
    # room for the last two turns' pictures, not for all three
    state = host.state(truncation_length=counts[1] + counts[2] + 600, max_new_tokens=8)
    for turn, size in enumerate(sizes):
        host.chat(f"Turn {turn}: what is this?", dict(state), attachments=[picture(*size, seed=100 + turn)])
        kept = host.last_prompt_ids
        assert kept.shape[1] <= state["truncation_length"] - state["max_new_tokens"]
        slots = int((kept == IMAGE_ID).sum())
        expected = {0: [counts[0]], 1: [counts[0], counts[1]], 2: [counts[1], counts[2]]}[turn]
        assert slots == sum(expected), (turn, slots, expected)
    assert not host.warned, host.warned  # nothing was cut by the hook
    engine = host.engine()
    assert engine.counters.vision_forwards == 3  # the earlier pictures came from the cache


def test_ask_answers_about_a_large_photo(converted, tmp_path):
    """The headless ``ask`` on a converted 1.6 model: a 12 MP photo is tiled and embedded at its size."""
    from extensions.llava.cli_ask import Asker
    from testbed.photos import make_photo
    _, tokenizer, dst = converted
    path = make_photo(str(tmp_path / "photo.jpg"))
    asker = Asker(dst)
    prompt = asker.prompt(["<img>"], "What is it?")
    assert prompt.startswith("USER: ") and prompt.endswith(" ASSISTANT:")  # the vicuna format of v1.6
    asker.ask([path], "What is it?", max_new_tokens=3)
    width, height = Image.open(path).size
    assert os.path.getsize(path) > 2_000_000 and width * height >= 12_000_000
    assert asker.engine.counters.vision_forwards == 1
    # the one cached feature block has exactly the picture's slots: [slot_count, 64] float32
    assert asker.engine.cache.stats.stored_bytes == slot_count(NEXT, width, height) * 64 * 4


# ---------------------------------------------------------------- replies sized by the webui


def test_a_reply_ends_at_the_context_length():
    from transformers import LlamaForCausalLM
    from extensions.llava.context_limit import EndAtContextLength, reply_limit
    from testbed.tiny import llama_config
    torch.manual_seed(0)
    llm = LlamaForCausalLM(llama_config(300)).eval()
    prompt = torch.randint(3, 300, (1, 10))
    with torch.no_grad():
        unlimited = llm.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=2, pad_token_id=0)
        limited = llm.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=2, pad_token_id=0,
                               logits_processor=[EndAtContextLength(25, [2])])
    assert unlimited.shape[1] == 50 and 2 not in unlimited[0, 10:].tolist()
    assert limited.shape[1] == 25 and limited[0, -1].item() == 2
    assert torch.equal(limited[0, :24], unlimited[0, :24])  # nothing else changed
    state = {"auto_max_new_tokens": True, "truncation_length": 4096}
    assert reply_limit(state, prompt_grew=True) == 4096
    assert reply_limit(state, prompt_grew=False) is None
    assert reply_limit({**state, "auto_max_new_tokens": False}, prompt_grew=True) is None
