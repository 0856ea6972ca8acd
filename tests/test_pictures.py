"""Turning data into pictures: whatever arrives is refused with a reason a user can act on, or converted
with a defined result; web and file sources are never opened; a picture's size comes from the start of
its data, never from decoding all of it."""

import base64
import builtins
import socket
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from extensions.llava.media import items
from extensions.llava.media.items import HEADER_PREFIX_CHARS, DataUrlItem, ItemError
from testbed.photos import encoded, make_photo, noisy_picture, turned_jpeg
from testbed.tiny import bytes_url, img_tag, picture
from testbed.watch import record_calls, refuse_calls

WHITE = (255, 255, 255)  # what transparent parts become


def load_url(url, position=2):
    return DataUrlItem.from_url(url, position).load()


def refusal(url, position=2) -> str:
    with pytest.raises(ItemError) as error:
        load_url(url, position)
    message = str(error.value)
    assert message.startswith(f"picture {position} in the prompt: ")
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
    message = refusal(bytes_url(b"just some text, not a picture"))
    assert "not a picture in a supported format" in message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(fmt):
    data = encoded(picture(64, 64, seed=3), fmt)
    message = refusal(bytes_url(data[: len(data) // 2]))
    assert message == "picture 2 in the prompt: the picture's data is damaged or cut short"


def test_svg_and_other_media_types():
    assert "SVG is a vector format" in refusal(bytes_url(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"))
    assert "of type 'application/pdf', not one the extension takes" in refusal(bytes_url(b"%PDF-1.4", "application/pdf"))
    assert "not base64-encoded" in refusal("data:image/png,rawbytes")
    assert "no ',' between" in refusal("data:image/png;base64")


def test_decompression_bomb_is_refused_quickly():
    bomb = encoded(Image.new("L", (12000, 12000)), "PNG", optimize=True)  # 144 Mpx in a few hundred KB
    assert len(bomb) < 1_000_000
    message = refusal(bytes_url(bomb))
    assert message == "picture 2 in the prompt: the picture is larger than 50,000,000 pixels"


def test_huge_header_dimensions_are_refused_before_decoding():
    # a PNG header claiming 100000 × 100000 pixels followed by nothing
    header = encoded(Image.new("L", (1, 1)))
    ihdr = header.index(b"IHDR")
    body = b"IHDR" + (100000).to_bytes(4, "big") + (100000).to_bytes(4, "big") + header[ihdr + 12:ihdr + 17]
    forged = header[:ihdr] + body + zlib.crc32(body).to_bytes(4, "big") + header[ihdr + 21:]
    assert refusal(bytes_url(forged)) == "picture 2 in the prompt: the picture is larger than 50,000,000 pixels"


# ---------------------------------------------------------------- converted, with a defined result


def test_one_by_one_pixel():
    assert load_url(bytes_url(encoded(Image.new("RGB", (1, 1), (9, 8, 7))))).image.getpixel((0, 0)) == (9, 8, 7)


def test_animated_gif_uses_the_first_frame_and_says_so():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    loaded = load_url(bytes_url(gif, "image/gif"))
    assert loaded.image.getpixel((4, 4)) == (255, 0, 0)  # the first frame's red, not the second's blue
    assert loaded.notes == ["picture 2 in the prompt is animated; its first frame is used"]


def test_alpha_is_composited_over_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    image = load_url(bytes_url(encoded(rgba))).image
    assert image.mode == "RGB" and image.getpixel((1, 1)) == WHITE and image.getpixel((0, 0)) == (0, 0, 255)
    la = Image.new("LA", (2, 2), (0, 128))  # black at half opacity → mid grey: 255 × (1 - 128/255)
    assert load_url(bytes_url(encoded(la))).image.getpixel((0, 0)) == (127, 127, 127)


@pytest.mark.parametrize("mode,fmt", [("P", "PNG"), ("CMYK", "JPEG"), ("L", "PNG"), ("1", "PNG"), ("I;16", "PNG")])
def test_colour_modes_become_rgb(mode, fmt):
    source = picture(16, 16, seed=4).convert(mode) if mode != "I;16" else \
        Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16))
    image = load_url(bytes_url(encoded(source, fmt))).image
    assert image.mode == "RGB" and image.size == (16, 16)
    if mode == "I;16":
        assert image.getpixel((3, 3)) == (255, 255, 255)  # full scale stays white, not clipped noise


def test_palette_transparency_is_composited():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.info["transparency"] = 0
    image = load_url(bytes_url(encoded(palette, transparency=0))).image
    assert image.getpixel((0, 0)) == WHITE


def test_exif_orientation_is_applied():
    tall = Image.new("RGB", (20, 10), (0, 255, 0))
    image = load_url(bytes_url(turned_jpeg(tall), "image/jpeg")).image
    assert image.size == (10, 20)


@pytest.mark.parametrize("size", [(1, 1), (3000, 2), (2, 3000)])
def test_extreme_shapes_encode(v0, size):
    prepared = v0.prepare(v0.engine(), img_tag(Image.new("RGB", size, (10, 200, 30))))
    assert prepared.items_embedded == 1 and torch.isfinite(prepared.inputs_embeds).all()


# ---------------------------------------------------------------- never fetched


@pytest.mark.parametrize("src", ["http://example.com/cat.png", "https://example.com/x.jpg",
                                 "file:///etc/passwd", "/etc/hostname", "cat.png"])
def test_web_and_file_sources_are_never_opened(v0, src, monkeypatch):
    refuse_calls(monkeypatch, socket, "create_connection", "network access attempted")
    refuse_calls(monkeypatch, socket.socket, "connect", "network access attempted")
    engine = v0.engine()
    v0.prepare(engine, "warm " + img_tag(picture()))  # load the vision parts first
    opened = record_calls(monkeypatch, builtins, "open", note=lambda path, *args, **kwargs: str(path))
    with pytest.raises(ItemError) as error:
        v0.prepare(engine, f'look <img src="{src}">')
    assert "never fetches" in str(error.value) and "picture 1 in the prompt" in str(error.value)
    assert not any(src.split("/")[-1] in path for path in opened)


# ---------------------------------------------------------------- the size, from the start of the data


def decoded_whole(monkeypatch) -> list[int]:
    """The length of every base64 payload decoded whole from now on."""
    return record_calls(monkeypatch, items, "decode_base64", note=lambda payload, source: len(payload))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_a_header_is_read_from_the_start_of_the_data(fmt, monkeypatch):
    """The trimming loop counts every picture on every pass: a picture's size comes from the first
    64 K characters of its data (larger headers from more), never by decoding all of it."""
    data, upright = noisy_picture(fmt)
    url = bytes_url(data, f"image/{fmt.lower()}")
    assert len(url) > 4 * HEADER_PREFIX_CHARS[0]
    decoded = decoded_whole(monkeypatch)
    assert DataUrlItem.from_url(url).header() == upright
    # Pillow reads a WebP only whole (its EXIF follows its pixels)
    assert decoded == ([] if fmt != "WEBP" else [len(url) - url.index(",") - 1])
    assert DataUrlItem.from_url(url).load().image.size == upright


@pytest.mark.parametrize("icc_bytes, whole", [(300_000, False), (900_000, True)])
def test_a_long_header_is_read_from_more_of_the_data(icc_bytes, whole, monkeypatch):
    data, upright = noisy_picture("JPEG", size=(1400, 1000), icc_bytes=icc_bytes)
    url = bytes_url(data, "image/jpeg")
    assert len(url) > HEADER_PREFIX_CHARS[1]
    decoded = decoded_whole(monkeypatch)
    assert DataUrlItem.from_url(url).header() == upright == (1000, 1400)
    assert bool(decoded) == whole


def test_a_photos_header_costs_no_more_than_a_small_pictures(tmp_path, monkeypatch):
    with open(make_photo(str(tmp_path / "photo.jpg")), "rb") as f:
        url = bytes_url(f.read(), "image/jpeg")
    decoded = decoded_whole(monkeypatch)
    started = time.perf_counter()
    for _ in range(20):
        assert DataUrlItem.from_url(url).header() == (4000, 3000)
    per_header = (time.perf_counter() - started) / 20
    print(f"header of a {len(url) / 1e6:.1f} M-character photo: {per_header * 1e3:.2f} ms")
    assert decoded == [] and per_header < 0.010  # decoding all of it takes about 18 ms
