"""Issue 6: whatever arrives, a clear message or a defined behaviour; features only on image slots."""

import base64
import io
import socket
import threading
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from PIL import Image

from extensions.llava.engine import LlavaEngine
from extensions.llava.errors import LlavaError
from extensions.llava.images import ALPHA_BACKGROUND, ImageError, InlineImage
from extensions.llava.prompt import escape_special_tokens, parse_prompt
from extensions.llava.settings import Settings
from testbed.tiny import PATCH_ID, BosEncoder, data_url, img_tag, picture



def load_url(url, position=2):
    return InlineImage.from_url(url, position).load()


def encoded(image, fmt="PNG", **save_args):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def url_of(data: bytes, media="image/png"):
    return f"data:{media};base64," + base64.b64encode(data).decode()


def refusal(url, position=2) -> str:
    with pytest.raises(ImageError) as error:
        load_url(url, position)
    message = str(error.value)
    assert message.startswith(f"image {position} in the prompt: ")
    for raw in ("binascii", "PIL.", "Traceback", "object at 0x", "UnidentifiedImageError", "Incorrect padding"):
        assert raw not in message
    return message


# ---------------------------------------------------------------- refused with a reason


def test_invalid_base64():
    assert "not valid base64" in refusal("data:image/png;base64,@@@###")


def test_bad_padding_is_tolerated_when_the_data_is_whole():
    data = encoded(picture(5, 5))
    text = base64.b64encode(data).decode().rstrip("=")
    assert load_url("data:image/png;base64," + text).image.size == (5, 5)
    assert "not valid base64" in refusal("data:image/png;base64,A")  # one stray character


def test_not_an_image():
    message = refusal(url_of(b"just some text, not a picture"))
    assert "not a picture in a supported format" in message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(fmt):
    data = encoded(picture(64, 64, seed=3), fmt)
    message = refusal(url_of(data[: len(data) // 2]))
    assert message == "image 2 in the prompt: the picture's data is damaged or cut short"


def test_svg_and_other_media_types():
    assert "SVG is a vector format" in refusal(url_of(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"))
    assert "not an image" in refusal(url_of(b"%PDF-1.4", "application/pdf"))
    assert "not base64-encoded" in refusal("data:image/png,rawbytes")
    assert "no ',' between" in refusal("data:image/png;base64")


def test_decompression_bomb_is_refused_quickly():
    bomb = encoded(Image.new("L", (12000, 12000)), "PNG", optimize=True)  # 144 Mpx in a few hundred KB
    assert len(bomb) < 1_000_000
    message = refusal(url_of(bomb))
    assert message == "image 2 in the prompt: the picture is larger than 50,000,000 pixels"


def test_huge_header_dimensions_are_refused_before_decoding():
    # a PNG header claiming 100000 × 100000 pixels followed by nothing
    header = encoded(Image.new("L", (1, 1)))
    ihdr = header.index(b"IHDR")
    body = b"IHDR" + (100000).to_bytes(4, "big") + (100000).to_bytes(4, "big") + header[ihdr + 12:ihdr + 17]
    forged = header[:ihdr] + body + zlib.crc32(body).to_bytes(4, "big") + header[ihdr + 21:]
    assert "pixels" in refusal(url_of(forged))


# ---------------------------------------------------------------- converted, with a defined result


def test_one_by_one_pixel():
    assert load_url(url_of(encoded(Image.new("RGB", (1, 1), (9, 8, 7))))).image.getpixel((0, 0)) == (9, 8, 7)


def test_animated_gif_uses_the_first_frame_and_says_so():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    loaded = load_url(url_of(buffer.getvalue(), "image/gif"))
    red, green, blue = loaded.image.getpixel((4, 4))
    assert red > 200 and blue < 50
    assert loaded.notes == ["image 2 in the prompt is animated; its first frame is used"]


def test_alpha_is_composited_over_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    image = load_url(url_of(encoded(rgba))).image
    assert image.mode == "RGB" and image.getpixel((1, 1)) == ALPHA_BACKGROUND and image.getpixel((0, 0)) == (0, 0, 255)
    la = Image.new("LA", (2, 2), (0, 128))  # black at half opacity → mid grey
    assert abs(load_url(url_of(encoded(la))).image.getpixel((0, 0))[0] - 127) <= 1


@pytest.mark.parametrize("mode,fmt", [("P", "PNG"), ("CMYK", "JPEG"), ("L", "PNG"), ("1", "PNG"), ("I;16", "PNG")])
def test_colour_modes_become_rgb(mode, fmt):
    source = picture(16, 16, seed=4).convert(mode) if mode != "I;16" else \
        Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16))
    image = load_url(url_of(encoded(source, fmt))).image
    assert image.mode == "RGB" and image.size == (16, 16)
    if mode == "I;16":
        assert image.getpixel((3, 3)) == (255, 255, 255)  # full scale stays white, not clipped noise


def test_palette_transparency_is_composited():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.info["transparency"] = 0
    image = load_url(url_of(encoded(palette, transparency=0))).image
    assert image.getpixel((0, 0)) == ALPHA_BACKGROUND


def test_exif_orientation_is_applied():
    tall = Image.new("RGB", (20, 10), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    image = load_url(url_of(encoded(tall, "JPEG", exif=exif.tobytes()), "image/jpeg")).image
    assert image.size == (10, 20)


@pytest.mark.parametrize("size", [(1, 1), (3000, 2), (2, 3000)])
def test_extreme_shapes_encode(v0, size):
    engine = LlavaEngine(Settings.from_params(v0.settings_params), log=lambda m: None)
    prepared = v0.prepare(engine, img_tag(Image.new("RGB", size, (10, 200, 30))))
    assert prepared.images_embedded == 1 and torch.isfinite(prepared.inputs_embeds).all()


# ---------------------------------------------------------------- never fetched


@pytest.mark.parametrize("src", ["http://example.com/cat.png", "https://example.com/x.jpg",
                                 "file:///etc/passwd", "/etc/hostname", "cat.png"])
def test_web_and_file_sources_are_never_opened(v0, src, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    opened = []
    real_open = open

    def watch_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    engine = LlavaEngine(Settings.from_params(v0.settings_params), log=lambda m: None)
    v0.prepare(engine, "warm " + img_tag(picture()))  # load the vision parts first
    monkeypatch.setattr("builtins.open", watch_open)
    with pytest.raises(ImageError) as error:
        v0.prepare(engine, f'look <img src="{src}">')
    assert "never fetches" in str(error.value) and "image 1 in the prompt" in str(error.value)
    assert not any(src.split("/")[-1] in path for path in opened)


# ---------------------------------------------------------------- tokens typed by the user


@pytest.mark.parametrize("typed", ["<im_patch>", "<im_start>", "<im_end>", "<image>", "<im_start><im_patch><im_end>"])
def test_typed_image_tokens_create_no_slots(v0, typed):
    engine = LlavaEngine(Settings.from_params(v0.settings_params), log=lambda m: None)
    honest = v0.prepare(engine, "before " + img_tag(picture()) + " after")
    hostile = v0.prepare(engine, f"{typed} before " + img_tag(picture()) + f" after {typed}")
    assert int((hostile.input_ids >= 32000).sum()) == 258
    slots_honest = (honest.input_ids[0] == PATCH_ID).nonzero().flatten()
    slots_hostile = (hostile.input_ids[0] == PATCH_ID).nonzero().flatten()
    assert torch.equal(honest.inputs_embeds[0, slots_honest], hostile.inputs_embeds[0, slots_hostile])


# ---------------------------------------------------------------- tag variants


@pytest.mark.parametrize("template", [
    "<img src='{u}'>", '<IMG SRC="{u}">', '<img alt="a cat" class=x src="{u}" width=3 />', "<img src={u}>",
    '<img\nsrc = "{u}"\n>', '<img src="{u}"',  # unclosed
])
def test_tag_variants_are_found(template):
    url = data_url(picture(4, 4))
    parsed = parse_prompt("a " + template.format(u=url) + " b")
    assert len(parsed.images) == 1
    assert parsed.images[0].source.load().image.size == (4, 4)
    assert parsed.text_only().startswith("a ")


def test_not_images():
    for text in ['<imgx src="data:image/png;base64,AAAA">', "<img>", "<img alt=x>", "< img src=x>", "<image>"]:
        assert parse_prompt(text).images == []


def test_hundred_images_in_one_prompt(v0):
    engine = LlavaEngine(Settings.from_params({**v0.settings_params, "add_all_images_to_prompt": True}),
                         log=lambda m: None)
    tags = [img_tag(picture(8, 8, seed=i % 5)) for i in range(100)]
    prepared = v0.prepare(engine, " ".join(tags))
    assert prepared.images_embedded == 100 and int((prepared.input_ids == PATCH_ID).sum()) == 25600
    assert engine.counters.vision_forwards == 5  # five distinct pictures


def test_one_image_longer_than_the_context(v0):
    engine = LlavaEngine(Settings.from_params(v0.settings_params), log=lambda m: None)
    prepared = v0.prepare(engine, "text " + img_tag(picture()) + " question?", max_length=100)
    assert prepared.images_dropped == 1 and prepared.images_embedded == 0
    assert int((prepared.input_ids >= 32000).sum()) == 0 and prepared.input_ids.shape[1] == len(" question?")
    with pytest.raises(LlavaError) as error:
        v0.prepare(engine, "text " + img_tag(picture()), max_length=100)
    assert "truncation_length" in str(error.value)


def test_concurrent_requests_each_get_their_own_picture(v0):
    engine = LlavaEngine(Settings.from_params({**v0.settings_params, "cache_size_mb": 1}), log=lambda m: None)
    prompts = ["q " + img_tag(picture(32, 32, seed=300 + i)) for i in range(12)]
    alone = [LlavaEngine(Settings.from_params(v0.settings_params), log=lambda m: None).prepare(
        p, model=v0.llm, tokenizer=v0.tokenizer, encode=BosEncoder(v0.tokenizer), max_length=None).inputs_embeds
        for p in prompts[:3]]
    results, errors = {}, []

    def ask(i):
        try:
            for _ in range(3):
                results[i] = v0.prepare(engine, prompts[i]).inputs_embeds
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(3):
        assert torch.allclose(results[i], alone[i], atol=1e-5)
    assert len({tuple(r[0, 5, :4].tolist()) for r in results.values()}) == 12  # twelve different answers
    stats = engine.cache.stats
    assert stats.stored_bytes <= 2**20 and stats.stored_bytes == len(engine.cache) * 256 * 64 * 4
    assert engine.counters.vision_forwards == 12 and (stats.misses, stats.hits, stats.evictions) == (12, 24, 0)


# ---------------------------------------------------------------- properties


texts = st.lists(st.sampled_from(list("ab <>/=\"'imgsrc_patchendstart") + ["<im_patch>", "<image>", "<img", "<im_end>"]),
                 max_size=12).map("".join)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.one_of(texts, st.integers(min_value=0, max_value=3)), min_size=1, max_size=6),
       embed_all=st.booleans())
def test_splice_touches_exactly_the_embedded_slots(v0, property_engines, pieces, embed_all):
    engine = property_engines[embed_all]
    prompt = "".join(p if isinstance(p, str) else property_tags[p] for p in pieces)
    # text pieces may have formed tags with each other; the parser is the judge of what is an image
    parsed = parse_prompt(prompt)
    images = [im for im in parsed.images if im.source.digest() in property_digests]
    assume(images and len(images) == len(parsed.images))
    prepared = v0.prepare(engine, prompt)
    ids = prepared.input_ids[0]
    plain = v0.llm.get_input_embeddings()(ids)
    changed = (prepared.inputs_embeds[0] != plain).any(-1)
    slots = (ids == PATCH_ID).nonzero().flatten().view(len(images), 256)
    expected = torch.zeros_like(changed)
    embedded = slots if embed_all else slots[-1:]
    expected[embedded.flatten()] = True
    assert torch.equal(changed, expected)
    assert int((ids == PATCH_ID).sum()) == 256 * len(images)


property_images = [picture(12, 12, seed=50 + i) for i in range(4)]
property_tags = [img_tag(im) for im in property_images]
property_digests = {parse_prompt(t).images[0].source.digest() for t in property_tags}


@pytest.fixture(scope="module")
def property_engines(v0):
    return {flag: LlavaEngine(Settings.from_params({**v0.settings_params, "add_all_images_to_prompt": flag}),
                              log=lambda m: None) for flag in (False, True)}


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_escaping_leaves_no_special_token(text):
    escaped = escape_special_tokens(text, ("<im_patch>", "<im_start>", "<im_end>", "<image>"))
    for token in ("<im_patch>", "<im_start>", "<im_end>", "<image>"):
        assert token not in escaped


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("<img src=\"'>data:x ")), max_size=300))
def test_parser_spans_are_ordered_and_inside_the_prompt(text):
    parsed = parse_prompt(text)
    end = 0
    for image in parsed.images:
        assert end <= image.start < image.end <= len(text)
        end = image.end
    assert "".join(p if isinstance(p, str) else text[p.start:p.end] for p in parsed.pieces()) == text
