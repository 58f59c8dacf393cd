"""A tiny pure-Python PNG encoder (zlib + struct, no Pillow) for the mock image model.

Only what the mock needs: 8-bit RGB, no interlacing, filter type 0 on every row. The pattern
generator builds whole rows with C-level bytes operations (slice assignment, `bytes.translate`)
instead of a Python loop per pixel, so a 1024x1024 image takes tens of milliseconds, not seconds.

`png_info` reads a PNG back (checks the signature, every chunk CRC and the decompressed size) so
tests can prove that what the mock sends is a well-formed image of the requested size.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_SIDE = 8192

_COLOR_RGB = 2
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def encode_rgb(width: int, height: int, rows: list[bytes], *, level: int = 6) -> bytes:
    """Encode `height` rows of `width * 3` RGB bytes as a PNG."""
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise ValueError(f"PNG size must be between 1 and {MAX_SIDE} on each side, got {width}x{height}")
    if len(rows) != height or any(len(r) != width * 3 for r in rows):
        raise ValueError("rows do not match the image size")
    # Every scanline starts with its filter type byte (0 = none).
    raw = b"\x00" + b"\x00".join(rows)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, _COLOR_RGB, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw, level))
        + _chunk(b"IEND", b"")
    )


def pattern_png(width: int, height: int, *, seed: str = "", reveal: float = 1.0, level: int = 6) -> bytes:
    """A deterministic colourful pattern for `seed`: gradients crossed with "munching squares".

    `reveal` in [0, 1] paints only the top fraction of the rows and leaves the rest grey, which is
    how the mock draws partial images that "fill in" as generation goes on.
    """
    digest = hashlib.sha256(seed.encode()).digest()
    o_r, o_g, o_b, mul = digest[0], digest[1], digest[2], 1 + digest[3] % 3

    red = bytes(((x * 255 // max(1, width - 1)) + o_r) & 0xFF for x in range(width))
    # Blue is a checker of 16-pixel squares ((x/16) XOR (y/16)), shifted by the seed: blocky rows
    # repeat, so zlib keeps even 1024x1024 images small.
    x_blocks = bytes(((x >> 4) * mul) & 0xFF for x in range(width))
    grey = b"\x80" * (width * 3)
    painted = max(0, min(height, round(height * reveal)))

    tables: dict[int, bytes] = {}
    rows: list[bytes] = []
    for y in range(height):
        if y >= painted:
            rows.append(grey)
            continue
        row = bytearray(width * 3)
        row[0::3] = red
        row[1::3] = bytes((((y * 255 // max(1, height - 1)) + o_g) & 0xFF,)) * width
        # translate() applies the per-row table in C; a table depends only on the row's block.
        block = (y >> 4) & 0xFF
        table = tables.get(block)
        if table is None:
            table = tables[block] = bytes(((((i ^ (block * mul)) << 4) + o_b) & 0xFF) for i in range(256))
        row[2::3] = x_blocks.translate(table)
        rows.append(bytes(row))
    return encode_rgb(width, height, rows, level=level)


@dataclass(frozen=True)
class PngInfo:
    width: int
    height: int
    bit_depth: int
    color_type: int
    chunks: list[str]


def png_info(data: bytes) -> PngInfo:
    """Parse and check a PNG: signature, chunk CRCs, IHDR first, IEND last, IDAT size. Raises ValueError."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG (bad signature)")
    pos = len(PNG_SIGNATURE)
    chunks: list[str] = []
    idat = bytearray()
    header: tuple[int, ...] | None = None
    while pos < len(data):
        if pos + 8 > len(data):
            raise ValueError("truncated chunk header")
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length or pos + 12 + length > len(data):
            raise ValueError(f"truncated {kind!r} chunk")
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise ValueError(f"bad CRC in {kind!r} chunk")
        chunks.append(kind.decode("latin-1"))
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    if not chunks or chunks[0] != "IHDR" or chunks[-1] != "IEND" or header is None:
        raise ValueError("IHDR must come first and IEND last")
    width, height, depth, color, _, _, interlace = header
    if color not in _CHANNELS or interlace != 0:
        raise ValueError("unsupported color type or interlacing")
    expected = height * (1 + (width * _CHANNELS[color] * depth + 7) // 8)
    if len(zlib.decompress(bytes(idat))) != expected:
        raise ValueError("image data does not match the declared size")
    return PngInfo(width=width, height=height, bit_depth=depth, color_type=color, chunks=chunks)
