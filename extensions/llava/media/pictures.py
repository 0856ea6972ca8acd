"""From a picture's bytes to an upright RGB picture, or a clear refusal, in two steps that agree:

- the header: its format (only the formats we name are opened: PNG, JPEG, GIF, WebP, BMP, TIFF,
  recognised by their first bytes before Pillow sees them), its size and its orientation, read
  without decoding a pixel; the size limits are checked here;
- the pixels: decoded once, turned by the very orientation the header gave, alpha over white, high
  bit depths scaled to 8 bits.

The orientation is what Pillow knows from the header: the EXIF orientation (a JPEG's APP1, a PNG's
eXIf chunk, a WebP's EXIF chunk, a TIFF's tag), an ImageMagick raw profile or XMP, as long as they
come before the pixel data. Metadata a PNG keeps after its pixel data is not read: finding it would
mean decoding the picture, and browsers ignore it too. So a picture's slot count (from its header)
and its features (from its pixels) always describe the same picture.

``source`` is a ``items.MediaItem``: refusals are ``source.error(reason)``. ``PICTURE`` is the kind
(``kinds.Kind``) these functions make.
"""

from __future__ import annotations

import functools
import io
import struct
import threading
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from PIL import Image

from .kinds import Kind

MAX_PIXELS = 50_000_000
# A picture of 32 bits a sample (float or int32 greyscale) is decoded at 4 bytes a pixel and scaled from there.
MAX_DEEP_PIXELS = 4096 * 4096
DEEP_MODES = ("I", "F")
# A baseline or progressive JPEG spends at least one bit on each 8×8 block of its luma: at most 512 pixels
# a byte of its data. One that claims more than twice that is a forged header, refused before decoding.
MAX_JPEG_PIXELS_PER_BYTE = 1024
# Pillow builds one entry per TIFF strip or tile while it reads the header: more than this is refused first.
MAX_TIFF_CHUNKS = 65_536
TIFF_CHUNK_TAGS = (273, 279, 324, 325)  # StripOffsets, StripByteCounts, TileOffsets, TileByteCounts
# One picture decoded at a time: concurrent requests wait instead of adding their peaks.
DECODING = threading.Semaphore(1)
ALPHA_BACKGROUND = (255, 255, 255)
SUPPORTED_FORMATS = "PNG, JPEG, GIF, WebP, BMP or TIFF"
# The first bytes of each format that is opened, and Pillow's name for it. Nothing else reaches Pillow.
SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
              (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"))
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "GIF": "image/gif",
               "WEBP": "image/webp", "BMP": "image/bmp", "TIFF": "image/tiff"}
ORIENTATION_TAG = 0x0112
# EXIF orientation → the turn that makes the picture upright (as Pillow's exif_transpose does)
TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
         5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
         8: Image.Transpose.ROTATE_90}
QUARTER_TURNS = {5, 6, 7, 8}


@dataclass
class Picture:
    image: Image.Image  # RGB
    notes: list[str] = field(default_factory=list)


def format_of(data: bytes) -> str | None:
    """The format of the picture ``data`` starts with, among the ones opened; None for anything else."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for signature, name in SIGNATURES if data.startswith(signature)), None)


def check_format(data: bytes, source) -> str:
    """The named format ``data`` starts with; anything else is refused from these first bytes."""
    kind = format_of(data)
    if kind is None:
        raise source.error(f"the data is not a picture in a supported format ({SUPPORTED_FORMATS})")
    return kind


def tiff_chunks_checked(data: bytes, source) -> bool:
    """Refuse a TIFF whose first directory lists more strips or tiles than ``MAX_TIFF_CHUNKS``, from the
    directory's entries alone; False when the directory does not lie within ``data``."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    head, entry, number = (16, 20, "Q") if big else (8, 12, "I")
    if len(data) < head:
        return False
    offset = struct.unpack_from(order + number, data, 8 if big else 4)[0]
    count_size = 8 if big else 2
    if offset + count_size > len(data):
        return False
    entries = struct.unpack_from(order + ("Q" if big else "H"), data, offset)[0]
    if entries > 65_535:
        raise source.error(f"the TIFF's directory has {entries:,} entries; the picture cannot be a normal one")
    if offset + count_size + entries * entry > len(data):
        return False
    for i in range(entries):
        at = offset + count_size + i * entry
        tag, _, count = struct.unpack_from(order + ("HHQ" if big else "HHI"), data, at)
        if tag in TIFF_CHUNK_TAGS and count > MAX_TIFF_CHUNKS:
            raise source.error(f"the TIFF is stored in {count:,} strips or tiles; at most {MAX_TIFF_CHUNKS:,} "
                               "are read (save it again with larger strips)")
    return True


def check_claimed_size(image: Image.Image, data_bytes: int, source) -> None:
    """Refuse a size the data cannot hold (a JPEG's forged header), and a deep picture too large to scale."""
    width, height = image.size
    if image.format in ("JPEG", "MPO") and width * height > MAX_JPEG_PIXELS_PER_BYTE * data_bytes:
        raise source.error(f"its header claims {width}×{height} pixels, more than its {data_bytes:,} bytes of "
                           "JPEG data can hold; the header is forged or the file cut short")
    if image.mode in DEEP_MODES and width * height > MAX_DEEP_PIXELS:
        raise source.error(f"the picture is {width}×{height} pixels of 32 bits (mode '{image.mode}'); such "
                           f"pictures are read up to {MAX_DEEP_PIXELS:,} pixels")


def open_header(data: bytes, source, partial: bool = False, data_bytes: int | None = None) -> Image.Image | None:
    """Pillow's lazy open, for the named formats only: the header is read, no pixel is decoded; the
    size limits are checked here. With ``partial`` (``data`` is the start of the picture, of
    ``data_bytes`` in all) None when the header does not end in it."""
    kind = check_format(data, source)
    if kind == "TIFF" and not tiff_chunks_checked(data, source):
        if partial:
            return None
        raise source.error("the TIFF's directory lies outside its data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[kind])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise source.error(f"the picture is larger than {MAX_PIXELS:,} pixels") from None
    except Exception:
        if partial:
            return None
        raise source.error(f"the data is not a picture in a supported format ({SUPPORTED_FORMATS})") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise source.error("the picture has no pixels")
    if width * height > MAX_PIXELS:
        raise source.error(f"the picture is {width}×{height} pixels; the limit is {MAX_PIXELS:,} pixels")
    check_claimed_size(image, len(data) if data_bytes is None else data_bytes, source)
    return image


def orientation(image: Image.Image) -> int:
    """The orientation Pillow knows from the header, read without decoding. (A PNG's own ``getexif``
    decodes the picture to look past its pixel data; the base one reads what the header gave.)"""
    try:
        value = int(Image.Image.getexif(image).get(ORIENTATION_TAG, 1) or 1)
    except Exception:
        return 1  # a broken EXIF block leaves the picture as stored
    return value if value in TURNS else 1


def stored_size(image: Image.Image) -> tuple[int, int]:
    """The size before any turn. Recent Pillow reports a turned TIFF's size already turned (by its tag,
    not by XMP), so a TIFF's own width and length tags are read."""
    if image.format == "TIFF":
        tags = getattr(image, "tag_v2", {})
        return int(tags.get(256, image.size[0])), int(tags.get(257, image.size[1]))
    return image.size


def upright_size(image: Image.Image) -> tuple[int, int]:
    width, height = stored_size(image)
    return (height, width) if orientation(image) in QUARTER_TURNS else (width, height)


def sniff_header(data: bytes, source, partial: bool = False,
                 data_bytes: int | None = None) -> tuple[str, tuple[int, int]] | None:
    """The picture's media type and its upright size, from its header alone; refuses what
    ``open_picture`` would refuse before decoding. With ``partial``, None when the header does not
    end in ``data`` (the start of the picture's ``data_bytes``)."""
    image = open_header(data, source, partial, data_bytes)
    if image is None:
        return None
    return MEDIA_TYPES.get(image.format, "image/png"), upright_size(image)


def open_picture(data: bytes, source) -> Picture:
    with DECODING:
        return _decoded(data, source)


def _decoded(data: bytes, source) -> Picture:
    image = open_header(data, source)
    expected, turn = upright_size(image), orientation(image)
    notes = [f"{source.label} is animated; its first frame is used"] if getattr(image, "is_animated", False) else []
    try:
        image.seek(0)
        image.load()
    except Exception:
        raise source.error("the picture's data is damaged or cut short") from None
    if image.format == "TIFF" and _pillow_turns_tiffs():
        turn = 1  # Pillow turned it while loading, by the orientation read above
    picture = normalise(image, source, turn, expected)
    picture.notes[:0] = notes
    return picture


@functools.cache
def _pillow_turns_tiffs() -> bool:
    """Whether this Pillow turns a TIFF by its orientation as it loads it (recent ones do)."""
    probe, exif = Image.new("L", (2, 1)), Image.Exif()
    exif[ORIENTATION_TAG] = 6
    buffer = io.BytesIO()
    probe.save(buffer, "TIFF", exif=exif)
    loaded = Image.open(buffer)
    loaded.load()
    return loaded.size == (1, 2)


def normalise(image: Image.Image, source, turn: int | None = None,
              expected: tuple[int, int] | None = None) -> Picture:
    """Upright RGB: turned by ``turn`` (by default the picture's own orientation), alpha over white,
    high bit depths scaled. ``expected`` is the upright size the header gave: pixels of another size
    are refused (a slot count made from the header would not fit them)."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise source.error(f"the picture is {width}×{height} pixels; the limit is {MAX_PIXELS:,} pixels")
    turn = orientation(image) if turn is None else turn
    if turn in TURNS:
        image = image.transpose(TURNS[turn])
    if expected is not None and image.size != tuple(expected):
        raise source.error(f"its header says {expected[0]}×{expected[1]} pixels but its pixel data is "
                           f"{image.size[0]}×{image.size[1]}; save the picture again with another program")
    try:
        return Picture(_to_rgb(image))
    except Exception:
        raise source.error(f"its colour mode '{image.mode}' cannot be converted to RGB") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        image = _scale_to_8_bit(image)
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


def _scale_to_8_bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit greyscale and floats onto 0..255, never clipped: integers up to 255 stay, up to
    65535 span the 16-bit range, floats from 0 to 1 span that range; anything else is stretched from
    the lowest value (or 0) to the highest."""
    values = np.array(image, dtype=np.float32)  # one copy at 4 bytes a pixel; all else is done in place
    np.nan_to_num(values, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    ranges = (1.0,) if image.mode == "F" else (255.0, 65535.0)
    top = next((top for top in ranges if low >= 0 and high <= top), None)
    if top is not None:
        values *= 255.0 / top
    else:
        low = min(low, 0.0)
        values -= low
        values *= 255.0 / (high - low) if high > low else 0.0  # one value below 0 everywhere: all at the lowest
    np.clip(values, 0, 255, out=values)
    return Image.fromarray(np.rint(values, out=values).astype(np.uint8), mode="L")


class PictureHeader(NamedTuple):
    """What a picture's header says: its upright size."""

    width: int
    height: int


class PictureKind(Kind):
    name, media_type, tag, part, attachment = "picture", "image/", "img", "image_url", "image"
    formats = SUPPORTED_FORMATS
    refused_types = {"image/svg+xml": f"SVG is a vector format; send a raster image ({SUPPORTED_FORMATS})"}

    def header(self, data: bytes, item, partial: bool = False, data_bytes: int | None = None):
        found = sniff_header(data, item, partial, data_bytes)
        return None if found is None else (found[0], PictureHeader(*found[1]))

    def open(self, data: bytes, item) -> Picture:
        return open_picture(data, item)

    def check_start(self, start: bytes, whole, item) -> None:
        """A format not named is refused from the first bytes, and a TIFF whose directory lies outside its
        data (Pillow would build one entry per strip while merely opening it)."""
        if check_format(start, item) == "TIFF" and not tiff_chunks_checked(whole(), item):
            raise item.error("the TIFF's directory lies outside its data")


PICTURE = PictureKind()

