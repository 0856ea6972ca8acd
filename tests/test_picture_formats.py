"""Closed doors for pictures: only the formats the README names are opened (recognised by their first
bytes before Pillow sees them), nothing is decoded past its budget, a picture's count and its pixels
follow the same orientation, and unusual number types are scaled, never clipped. Every hostile file is
built here, byte by byte."""

import base64
import io
import time

import numpy as np
import pytest
from PIL import EpsImagePlugin, GifImagePlugin, IcoImagePlugin, Image

from extensions.llava.families import slot_count
from extensions.llava.media import pictures as decode
from extensions.llava.media.pictures import SUPPORTED_FORMATS, normalise
from extensions.llava.media.items import ItemError, DataUrlItem
from testbed.hostile_files import (animated_gif, deep_tiff, eps_stub, exif_chunk, ico_holding, jpeg_claiming, png_with,
                                   raw_profile_chunk, tiff_in_strips, xmp_chunk)
from testbed.photos import encoded, turned_exif
from testbed.tiny_next import PIPELINE

NOT_A_PICTURE = f"the data is not a picture in a supported format ({SUPPORTED_FORMATS})"


def source(data: bytes, media: str = "image/png") -> DataUrlItem:
    return DataUrlItem.from_url(f"data:{media};base64,{base64.b64encode(data).decode()}", 1)


def refusal(data: bytes, media: str = "image/png") -> str:
    with pytest.raises(ItemError) as error:
        source(data, media).header()
    return error.value.reason


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_the_named_formats_open(fmt):
    picture = Image.new("RGB", (40, 20), (200, 30, 30))
    opened = source(encoded(picture, fmt))
    assert opened.header() == (40, 20) and opened.load().image.size == (40, 20)


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA", "PCX", "SGI", "IM", "DDS", "QOI", "XBM"])
def test_other_formats_pillow_knows_are_refused(fmt):
    picture = Image.new("1" if fmt == "XBM" else "RGB", (16, 16))
    data = encoded(picture, fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would have opened it
    assert refusal(data) == NOT_A_PICTURE


def test_an_eps_sent_as_a_png_never_reaches_its_reader(monkeypatch):
    """Pillow hands EPS files to Ghostscript; the extension never lets one reach Pillow's EPS reader."""
    def ghostscript(*args, **kwargs):
        raise AssertionError("the EPS reader ran")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", ghostscript)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript, raising=False)
    assert refusal(eps_stub(), "image/png") == NOT_A_PICTURE


def test_an_ico_hiding_a_huge_png_is_refused_before_anything_is_decoded(monkeypatch):
    monkeypatch.setattr(IcoImagePlugin.IcoImageFile, "load", lambda self: pytest.fail("the ICO was decoded"))
    data = ico_holding(Image.new("RGB", (3000, 3000)), claimed=16)
    started = time.perf_counter()
    assert refusal(data) == NOT_A_PICTURE
    assert time.perf_counter() - started < 0.05


ORIENTATION_PLACES = {
    "EXIF before the pixels": ([exif_chunk(6)], [], True),
    "XMP before the pixels": ([xmp_chunk(6)], [], True),
    "ImageMagick raw profile before the pixels": ([raw_profile_chunk(6)], [], True),
    "EXIF after the pixels": ([], [exif_chunk(6)], False),
    "XMP after the pixels": ([], [xmp_chunk(6)], False),
    "raw profile after the pixels": ([], [raw_profile_chunk(6)], False),
}


@pytest.mark.parametrize("place", list(ORIENTATION_PLACES))
def test_the_count_and_the_pixels_follow_the_same_orientation(place):
    """What the header says is what the pixels get: turned when the orientation stands before the
    pixel data, as stored when it follows them (reading it there would mean decoding)."""
    before, after, turned = ORIENTATION_PLACES[place]
    data = png_with(Image.new("RGB", (300, 150), (10, 200, 10)), before, after)
    expected = (150, 300) if turned else (300, 150)
    assert source(data).header() == expected and source(data).load().image.size == expected


def test_a_jpeg_turned_by_its_xmp_alone_is_counted_turned():
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    data = encoded(Image.new("RGB", (300, 150)), "JPEG", xmp=xmp)
    assert source(data, "image/jpeg").header() == (150, 300) == source(data, "image/jpeg").load().image.size


@pytest.mark.parametrize("place", list(ORIENTATION_PLACES))
def test_a_turned_picture_of_any_kind_splices_on_llava_1_6(next_converted, place):
    """The 1.6 slot count comes from the header; the features from the pixels: they always agree."""
    from testbed.tiny import quiet_engine
    before, after, _ = ORIENTATION_PLACES[place]
    data = png_with(Image.new("RGB", (700, 300), (10, 200, 10)), before, after)
    picture = source(data)
    prepared = next_converted.prepare(quiet_engine(), f'USER: <img src="{picture.text}"> ASSISTANT:')
    assert prepared.items_embedded == 1
    assert int((prepared.input_ids == next_converted.tokenizer.convert_tokens_to_ids("<image>")).sum()) == \
        slot_count(PIPELINE, *picture.header())


def test_pixels_that_disagree_with_their_header_are_refused_in_words():
    turned = Image.new("RGB", (30, 10))
    with pytest.raises(ItemError) as error:
        normalise(turned, source(encoded(turned)), turn=1, expected=(10, 30))
    assert error.value.reason == ("its header says 10×30 pixels but its pixel data is 30×10; save the picture "
                                  "again with another program")


def test_an_animated_gif_is_known_without_walking_its_frames(monkeypatch):
    def every_frame(self):
        raise AssertionError("every frame was walked")

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "n_frames", property(every_frame))
    picture = source(animated_gif(300, side=256), "image/gif").load()
    assert picture.notes == ["picture 1 in the prompt is animated; its first frame is used"]
    assert picture.image.size == (256, 256)


@pytest.mark.parametrize("mode,values,expected", [
    ("I", [0, 50_000, 100_000], [0, 128, 255]),  # beyond 16 bits: stretched to the highest
    ("I", [-1000, 0, 1000], [0, 128, 255]),  # below zero: from the lowest
    ("I", [0, 32768, 65535], [0, 128, 255]),  # 16-bit values: the 16-bit range
    ("I", [0, 100, 200], [0, 100, 200]),  # 8-bit values in a 32-bit picture stay
    ("F", [0.0, 0.5, 1.0], [0, 128, 255]),  # floats from 0 to 1
    ("F", [0.0, 1.0, 2.0], [0, 128, 255]),  # floats above 1: stretched, not clipped
    ("F", [0.0, float("nan"), 300.0], [0, 0, 255]),  # no number is no light
    ("F", [-5.0, -5.0, -5.0], [0, 0, 0]),  # one value below zero: all at the lowest, not a division by zero
    ("I", [-7, -7, -7], [0, 0, 0]),
])
def test_deep_greyscale_is_scaled_never_clipped(mode, values, expected):
    dtype = np.float32 if mode == "F" else np.int32
    picture = Image.fromarray(np.array([values], dtype=dtype), mode=mode)
    assert np.asarray(normalise(picture, source(encoded(Image.new("L", (1, 1))))).image)[0, :, 0].tolist() == expected


def test_a_tiff_turned_by_its_tag_is_counted_and_decoded_once_turned():
    data = encoded(Image.new("RGB", (300, 150)), "TIFF", exif=turned_exif())
    assert source(data, "image/tiff").header() == (150, 300) == source(data, "image/tiff").load().image.size


def test_a_constant_negative_picture_is_stretched_not_refused():
    picture = source(deep_tiff(8, 8, "F", -3.5), "image/tiff").load()
    assert picture.image.mode == "RGB" and picture.image.getextrema() == ((0, 0),) * 3


@pytest.fixture
def pillow_opens(monkeypatch):
    """Every Pillow open from now on."""
    opened = []
    original = Image.open
    monkeypatch.setattr(Image, "open", lambda *args, **kwargs: opened.append(1) or original(*args, **kwargs))
    return opened


def test_a_tiff_of_absurdly_many_strips_is_refused_from_its_directory(pillow_opens):
    started = time.perf_counter()
    for check in ("header", "check_start"):
        with pytest.raises(ItemError) as error:
            getattr(source(tiff_in_strips(200_000), "image/tiff"), check)()
        assert error.value.reason == "the TIFF is stored in 200,000 strips or tiles; at most 65,536 are read " \
                                     "(save it again with larger strips)"
    assert pillow_opens == [] and time.perf_counter() - started < 1
    assert source(tiff_in_strips(600), "image/tiff").header() == (1, 600)  # a normal strip count opens


def test_a_jpeg_claiming_more_pixels_than_its_bytes_can_hold_is_refused():
    data = jpeg_claiming(7000, 7000)
    assert refusal(data, "image/jpeg") == f"its header claims 7000×7000 pixels, more than its {len(data):,} bytes " \
                                          "of JPEG data can hold; the header is forged or the file cut short"
    flat = encoded(Image.new("L", (2000, 2000), 128), "JPEG")  # the most a real JPEG packs into a byte
    assert 2000 * 2000 / len(flat) < decode.MAX_JPEG_PIXELS_PER_BYTE
    assert source(flat, "image/jpeg").header() == (2000, 2000)


def test_a_deep_picture_is_bounded_before_it_is_decoded(pillow_opens):
    assert refusal(deep_tiff(4200, 4200), "image/tiff") == \
        "the picture is 4200×4200 pixels of 32 bits (mode 'F'); such pictures are read up to 16,777,216 pixels"
    assert source(deep_tiff(600, 400, "I", 70_000), "image/tiff").load().image.size == (600, 400)


def test_pictures_are_decoded_one_at_a_time(monkeypatch):
    import threading
    inside, most = [0], [0]
    original = decode.normalise

    def slow(*args, **kwargs):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.05)
        inside[0] -= 1
        return original(*args, **kwargs)

    monkeypatch.setattr(decode, "normalise", slow)
    data = encoded(Image.new("RGB", (32, 32)))
    threads = [threading.Thread(target=lambda: source(data).load()) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1
