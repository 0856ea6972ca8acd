"""Pictures as files hold them: encoded bytes, EXIF-turned JPEGs, noisy (so large) pictures, and
phone-photo-sized ones for the real-host tests and the benchmark: 12 megapixels of smooth gradients
under fine noise, which JPEG compresses about as badly as a real photo (about 4 MB)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageOps

PHOTO_SIZE = (4000, 3000)
TURNED_A_QUARTER = 6  # the EXIF orientation "rotate 90° clockwise for display"


def make_photo(path: str, seed: int = 0, size=PHOTO_SIZE, shape_colour=(215, 35, 35)) -> str:
    """Write a JPEG at ``path``: a photo-like background with a large circle in ``shape_colour``."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([120 + 60 * np.sin(x / (width / (2 + seed % 3))),
                     120 + 60 * np.cos(y / (height / 3)),
                     130 + 50 * np.sin((x + y) / (width / 4))], axis=-1)
    noisy = base + rng.normal(0, 15, size=(height, width, 3)).astype(np.float32)
    canvas = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    radius = min(width, height) // 4
    ImageDraw.Draw(canvas).ellipse((width // 2 - radius, height // 2 - radius, width // 2 + radius,
                                    height // 2 + radius), fill=shape_colour)
    canvas.save(path, format="JPEG", quality=90)
    return path


def encoded(image: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    """``image`` as the bytes of a file in ``fmt``."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def turned_exif() -> bytes:
    """EXIF data that tells a viewer to show the picture turned a quarter clockwise."""
    exif = Image.Exif()
    exif[0x0112] = TURNED_A_QUARTER
    return exif.tobytes()


def turned_jpeg(image: Image.Image) -> bytes:
    """A JPEG stored as ``image`` is, whose EXIF says to show it turned 90° (so its width and height swap)."""
    return encoded(image, "JPEG", exif=turned_exif())


def noisy_picture(fmt: str, size=(700, 500), icc_bytes: int = 0, turned: bool = True) -> tuple[bytes, tuple]:
    """A noisy (so large) picture's bytes in ``fmt``, turned by its EXIF where the format has one, with an
    ICC profile of ``icc_bytes`` in front of its pixels; and its upright size."""
    pixels = np.random.default_rng(7).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    options = {}
    if turned and fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        options["exif"] = turned_exif()
    if icc_bytes:
        options["icc_profile"] = np.random.default_rng(3).bytes(icc_bytes)
    data = encoded(Image.fromarray(pixels), fmt, **options)
    return data, ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size


def shape_picture(path: str, colour: tuple, shape: str) -> str:
    """A drawn square or triangle on grey, like the bundled demo's training pictures, written to ``path``."""
    canvas = Image.new("RGB", (128, 128), (150, 150, 150))
    pen = ImageDraw.Draw(canvas)
    if shape == "square":
        pen.rectangle((34, 34, 94, 94), fill=colour)
    else:
        pen.polygon([(64, 28), (100, 96), (28, 96)], fill=colour)
    canvas.save(path)
    return path


CORNER_COLOURS = {"top left": (230, 30, 30), "top right": (30, 200, 40), "bottom left": (40, 60, 230),
                  "bottom right": (240, 220, 20)}


def corner_picture(path: str, size: tuple) -> str:
    """A PNG of ``size``: grey, with a square of its own colour in each corner (an eighth of the shorter
    side), so that a screenshot shows whether the whole picture is drawn and in what proportions."""
    width, height = size
    side = min(size) // 8
    canvas = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(canvas)
    for (name, colour), (left, top) in zip(CORNER_COLOURS.items(),
                                           ((0, 0), (width - side, 0), (0, height - side), (width - side, height - side))):
        draw.rectangle((left, top, left + side - 1, top + side - 1), fill=colour)
    canvas.save(path, format="PNG")
    return path


def drawn_corners(screenshot: Image.Image, tolerance: int = 40) -> dict:
    """Where each corner colour of ``corner_picture`` shows in ``screenshot``: its bounding box
    (left, top, right, bottom), or None where it does not show."""
    pixels = np.asarray(screenshot.convert("RGB")).astype(np.int32)
    found = {}
    for name, colour in CORNER_COLOURS.items():
        rows, columns = np.nonzero(np.abs(pixels - np.array(colour)).max(axis=-1) <= tolerance)
        found[name] = (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1) if len(rows) else None
    return found
