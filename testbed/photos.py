"""Phone-photo-sized pictures for the real-host tests and the benchmark: 12 megapixels of smooth
gradients under fine noise, which JPEG compresses about as badly as a real photo (about 4 MB)."""

import numpy as np
from PIL import Image, ImageDraw

PHOTO_SIZE = (4000, 3000)


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
