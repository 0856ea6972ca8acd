"""Turning what a user or client sent into an RGB picture, or a clear refusal.

Every refusal is an ``ImageError`` naming the image's position in the prompt and the
reason in plain words. Nothing here reaches the network or the file system: only
``data:`` URLs and pictures handed over by the host are ever opened.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageOps

from .errors import LlavaError

MAX_ENCODED_CHARS = 64 * 1024 * 1024
MAX_PIXELS = 50_000_000
ALPHA_BACKGROUND = (255, 255, 255)
SUPPORTED_FORMATS = "PNG, JPEG, GIF, WebP, BMP or TIFF"
# base64 characters of a data URL read for its header before all of it: a photo's header with its
# EXIF fits in the first; large ICC profiles or previews may need the second
HEADER_PREFIX_CHARS = (64 * 1024, 1024 * 1024)
_URL_SAFE = str.maketrans("-_", "+/")


class ImageError(LlavaError):
    """An image that cannot be used, with the reason in plain words."""

    def __init__(self, label: str, reason: str, position: int = 0):
        self.label = label
        self.reason = reason
        self.position = position
        super().__init__(f"{label}: {reason}")


@dataclass
class Picture:
    image: Image.Image  # RGB
    notes: list[str] = field(default_factory=list)


class ImageSource:
    """Something that can become a picture. ``position`` is 1-based in prompt order."""

    position: int = 0
    origin: str = "in the prompt"

    def at_position(self, position: int) -> "ImageSource":
        return replace(self, position=position)

    def digest(self) -> str:
        raise NotImplementedError

    def load(self) -> Picture:
        raise NotImplementedError

    def header(self) -> tuple[int, int]:
        """The picture's size, read from its header; refuses what ``load`` would refuse before decoding."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        return f"image {self.position} {self.origin}" if self.position else f"an image {self.origin}"

    def error(self, reason: str) -> ImageError:
        return ImageError(self.label, reason, self.position)


@dataclass(frozen=True, eq=False)
class InlineImage(ImageSource):
    """A ``data:`` URL held as a span of a larger text (no copy until it is opened)."""

    text: str
    start: int
    end: int
    position: int = 0
    origin: str = "in the prompt"

    @classmethod
    def from_url(cls, url: str, position: int = 0, origin: str = "in the prompt") -> "InlineImage":
        return cls(url, 0, len(url), position, origin)

    def digest(self) -> str:
        return hashlib.sha256(self.text[self.start:self.end].encode("utf-8", "surrogatepass")).hexdigest()

    def load(self) -> Picture:
        return open_picture(self._data(), self)

    def header(self) -> tuple[int, int]:
        """The size from the first part of the data when that part holds the whole header (a
        photo's size is known from its first kilobytes), else from all of it."""
        payload = self._payload_start()
        for chars in HEADER_PREFIX_CHARS:
            if payload + chars >= self.end:
                break
            prefix = decode_base64_prefix(self.text[payload:payload + chars])
            found = sniff_header(prefix, self, partial=True) if prefix else None
            if found is not None:
                return found[1]
        return sniff_header(self._data(), self)[1]

    def _data(self) -> bytes:
        return decode_base64(self.text[self._payload_start():self.end], self)

    def _payload_start(self) -> int:
        """Where the base64 starts, after checking the URL's header."""
        if self.end - self.start > MAX_ENCODED_CHARS:
            raise self.error(f"the data URL is longer than {MAX_ENCODED_CHARS // 2**20} MB")
        comma = self.text.find(",", self.start, self.end)
        if comma < 0:
            raise self.error("the data URL has no ',' between its header and its data")
        header = self.text[self.start + 5:comma].strip().lower()
        media_type, *parameters = [part.strip() for part in header.split(";")]
        if media_type == "image/svg+xml":
            raise self.error("SVG is a vector format; send a raster image "
                             f"({SUPPORTED_FORMATS})")
        if not media_type.startswith("image/"):
            raise self.error(f"the data URL is of type '{media_type or 'none'}', not an image")
        if "base64" not in parameters:
            raise self.error("the data URL is not base64-encoded (expected 'data:image/...;base64,')")
        return comma + 1


@dataclass(frozen=True, eq=False)
class PilImage(ImageSource):
    """A picture the host already decoded (the OpenAI chat endpoint's ``raw_images``)."""

    image: Image.Image
    position: int = 0
    origin: str = "in the request"

    def digest(self) -> str:
        h = hashlib.sha256(f"{self.image.mode}:{self.image.size}:".encode())
        h.update(self.image.tobytes())
        return h.hexdigest()

    def load(self) -> Picture:
        return normalise(self.image, self)

    def header(self) -> tuple[int, int]:
        return self.image.size


@dataclass(frozen=True, eq=False)
class UnreachableImage(ImageSource):
    """An ``<img>`` whose source is a web address or a file: never fetched."""

    src: str
    position: int = 0
    origin: str = "in the prompt"

    def digest(self) -> str:
        return hashlib.sha256(self.src.encode("utf-8", "surrogatepass")).hexdigest()

    def header(self) -> tuple[int, int]:
        self.load()

    def load(self) -> Picture:
        shown = self.src if len(self.src) <= 60 else self.src[:57] + "..."
        raise self.error(f"its source '{shown}' is not a data URL; the extension never fetches web "
                         "addresses or reads local files; embed the picture as "
                         "data:image/...;base64,...")


def data_url(image: Image.Image, fmt: str = "PNG", **save_args) -> str:
    """``image`` encoded as a ``data:`` URL."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def decode_base64(payload: str, source: ImageSource) -> bytes:
    compact = "".join(payload.split())
    if not compact:
        raise source.error("the data URL holds no data")
    if "-" in compact or "_" in compact:
        compact = compact.translate(_URL_SAFE)
    compact += "=" * (-len(compact) % 4)  # tolerate missing padding
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise source.error("the data after 'base64,' is not valid base64") from None


def decode_base64_prefix(chars: str) -> bytes | None:
    """The bytes of the first whole base64 quartets of ``chars``; None if they are not base64."""
    compact = "".join(chars.split()).translate(_URL_SAFE)
    try:
        return base64.b64decode(compact[:len(compact) // 4 * 4], validate=True)
    except (binascii.Error, ValueError):
        return None


def _open_header(data: bytes, source: ImageSource, partial: bool = False) -> Image.Image | None:
    """Pillow's lazy open: the header is read, no pixel is decoded; size limits are checked here.
    With ``partial`` (``data`` is the start of the picture) None when the header does not end in it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
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
    return image


# EXIF orientations that turn the picture a quarter (transpose, 90°, transverse, 270°)
_QUARTER_TURNS = {5, 6, 7, 8}


def sniff_header(data: bytes, source: ImageSource, partial: bool = False) -> tuple[str, tuple[int, int]] | None:
    """The picture's media type and its upright size (after its EXIF orientation, as ``open_picture``
    turns it), from its header alone; refuses what ``open_picture`` would refuse before decoding.
    With ``partial`` (``data`` is the start of the picture) None when the header does not end in it."""
    image = _open_header(data, source, partial)
    if image is None:
        return None
    width, height = _stored_size(image)
    if _orientation(image) in _QUARTER_TURNS:
        width, height = height, width
    return image.get_format_mimetype() or "image/png", (width, height)


def _stored_size(image: Image.Image) -> tuple[int, int]:
    """The size before any EXIF turn. Recent Pillow reports a turned TIFF's size already upright
    (it turns TIFFs as it loads them), so a TIFF's own width and length tags are read."""
    if image.format == "TIFF":
        tags = getattr(image, "tag_v2", {})
        return int(tags.get(256, image.size[0])), int(tags.get(257, image.size[1]))
    return image.size


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation known from the header. A PNG's EXIF block may follow its pixel data,
    and reading it there would decode the picture: only one before the pixels counts (Pillow has
    then put it into ``info``)."""
    try:
        if image.format == "PNG":
            exif = Image.Exif()
            if image.info.get("exif"):
                exif.load(image.info["exif"])
            return int(exif.get(0x0112, 1) or 1)
        return int(image.getexif().get(0x0112, 1) or 1)
    except Exception:
        return 1


def open_picture(data: bytes, source: ImageSource) -> Picture:
    image = _open_header(data, source)
    notes = []
    if getattr(image, "n_frames", 1) > 1:
        notes.append(f"{source.label} is animated; its first frame is used")
    try:
        image.seek(0)
        image.load()
    except Exception:
        raise source.error("the picture's data is damaged or cut short") from None
    picture = normalise(image, source)
    picture.notes[:0] = notes
    return picture


def normalise(image: Image.Image, source: ImageSource) -> Picture:
    """Upright RGB: EXIF orientation applied, alpha over white, high bit depths scaled."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise source.error(f"the picture is {width}×{height} pixels; the limit is {MAX_PIXELS:,} pixels")
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:
        pass  # a broken EXIF block leaves the picture as stored
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
    """16- and 32-bit greyscale: map the format's range onto 0..255 instead of clipping."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if values.size and np.nanmax(values) <= 1.0 else 255.0
    else:
        top = 65535.0 if values.size and values.max() > 255 else 255.0
    scaled = np.clip(np.nan_to_num(values) * (255.0 / top), 0, 255).round().astype(np.uint8)
    return Image.fromarray(scaled, mode="L")
