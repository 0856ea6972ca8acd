"""Pictures an attacker or an odd program would send, built here byte by byte (no binary fixtures):
formats nobody named, an ICO holding a huge PNG, orientation kept in unusual places."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

from testbed.photos import encoded


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of each chunk of a PNG."""
    chunks, at = [], 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        chunks.append((kind, data[at + 8:at + 8 + length]))
        at += 12 + length
    return chunks


def png_with(image: Image.Image, before_pixels: list[bytes] = (), after_pixels: list[bytes] = ()) -> bytes:
    """A PNG of ``image`` with extra chunks before its first IDAT and after its last one."""
    chunks = png_chunks(encoded(image))
    out = bytearray(b"\x89PNG\r\n\x1a\n")
    kinds = [kind for kind, _ in chunks]
    first, last = kinds.index(b"IDAT"), len(kinds) - 1 - kinds[::-1].index(b"IDAT")
    for i, (kind, data) in enumerate(chunks):
        if i == first:
            out += b"".join(before_pixels)
        out += chunk(kind, data)
        if i == last:
            out += b"".join(after_pixels)
    return bytes(out)


def exif_block(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def exif_chunk(orientation: int) -> bytes:
    return chunk(b"eXIf", exif_block(orientation))


def xmp_chunk(orientation: int) -> bytes:
    xmp = (f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           f'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="{orientation}"/>'
           f'</rdf:RDF></x:xmpmeta>')
    return chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp.encode())


def raw_profile_chunk(orientation: int) -> bytes:
    """ImageMagick's way: the EXIF block as hexadecimal text in a tEXt chunk."""
    block = b"Exif\x00\x00" + exif_block(orientation)
    text = f"\nexif\n{len(block):8d}\n{block.hex()}\n"
    return chunk(b"tEXt", b"Raw profile type exif\x00" + text.encode())


def ico_holding(image: Image.Image, claimed: int = 16) -> bytes:
    """An ICO whose directory says ``claimed``×``claimed`` but whose one entry is a PNG of ``image``."""
    payload = encoded(image)
    directory = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", claimed % 256, claimed % 256, 0, 0, 1, 32, len(payload), 6 + 16)
    return directory + entry + payload


def eps_stub() -> bytes:
    """The start of an Encapsulated PostScript file (Pillow hands those to Ghostscript)."""
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
            b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")


def animated_gif(frames: int, side: int = 64) -> bytes:
    images = [Image.new("RGB", (side, side), (i % 256, 255 - i % 256, 0)) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, "GIF", save_all=True, append_images=images[1:], duration=10)
    return buffer.getvalue()


def tiff_in_strips(strips: int, width: int = 1) -> bytes:
    """An uncompressed greyscale TIFF ``width`` × ``strips`` pixels stored one row a strip: each strip is an
    entry of its directory's offset and byte-count arrays (8 bytes), read before any pixel."""
    entries = [(256, 4, 1, width), (257, 4, 1, strips), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, strips, 0), (277, 3, 1, 1), (278, 4, 1, 1), (279, 4, strips, 0)]
    directory_size = 2 + 12 * len(entries) + 4
    offsets_at = 8 + directory_size
    counts_at = offsets_at + 4 * strips
    pixels_at = counts_at + 4 * strips
    values = {273: offsets_at, 279: counts_at}
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)))
    for tag, kind, count, value in entries:
        out += struct.pack("<HHII", tag, kind, count, values.get(tag, value) if kind == 4 or tag in values else value)
    out += struct.pack("<I", 0)
    out += struct.pack(f"<{strips}I", *range(pixels_at, pixels_at + strips * width, width))
    out += struct.pack(f"<{strips}I", *([width] * strips))
    out += bytes(strips * width)
    return bytes(out)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header is rewritten to claim ``width`` × ``height`` pixels."""
    data = bytearray(encoded(Image.new("RGB", (16, 16), (200, 30, 30)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def deep_tiff(width: int, height: int, mode: str = "F", value: float = 0.5) -> bytes:
    """A compressed TIFF of one value in 32 bits a pixel (float or int32): small on disk, 4 bytes a pixel decoded."""
    return encoded(Image.new(mode, (width, height), value), "TIFF", compression="tiff_adobe_deflate")
