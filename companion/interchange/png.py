"""The few PNG chunks a character card needs, read and written with the standard library.

Why not Pillow: a card's picture is never decoded here, only carried. Walking the chunk list reads
the `tEXt` chunks without touching the pixel data (no decompression bombs, no image library in the
request path), and writing puts one `tEXt` chunk before `IEND` while keeping every other byte of
the picture as it came in.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_CHUNKS = 100_000


class PngError(ValueError):
    """Not a PNG, or a damaged one (what is wrong is in the message)."""


def is_png(data: bytes) -> bool:
    return data.startswith(SIGNATURE)


def chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Each chunk as (type, data), in file order, up to and including IEND. Raises PngError."""
    if not is_png(data):
        raise PngError("the file is not a PNG (wrong signature)")
    offset = len(SIGNATURE)
    for _ in range(MAX_CHUNKS):
        if offset + 8 > len(data):
            raise PngError("the PNG ends before its IEND chunk")
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        end = offset + 8 + length
        if end + 4 > len(data):
            raise PngError(f"the PNG chunk {kind!r} runs past the end of the file")
        body = data[offset + 8 : end]
        (crc,) = struct.unpack(">I", data[end : end + 4])
        if zlib.crc32(kind + body) != crc:
            raise PngError(f"the PNG chunk {kind.decode('latin-1')!r} is damaged (bad CRC)")
        yield kind, body
        if kind == b"IEND":
            return
        offset = end + 4
    raise PngError("the PNG has too many chunks")


def text_chunks(data: bytes) -> dict[str, str]:
    """The `tEXt` chunks by keyword (the first of each keyword wins). Raises PngError."""
    found: dict[str, str] = {}
    for kind, body in chunks(data):
        if kind != b"tEXt":
            continue
        keyword, sep, text = body.partition(b"\x00")
        if not sep:
            continue
        found.setdefault(keyword.decode("latin-1"), text.decode("latin-1"))
    return found


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def with_text(data: bytes, texts: dict[str, str], *, remove: tuple[str, ...] = ()) -> bytes:
    """The same PNG with `texts` as its only `tEXt` chunks of those keywords and none of `remove`
    (other chunks untouched), written just before IEND. Text must be Latin-1 (cards are base64).
    Raises PngError."""
    out = [SIGNATURE]
    replaced = {keyword.encode("latin-1") for keyword in (*texts, *remove)}
    for kind, body in chunks(data):
        if kind == b"tEXt" and body.partition(b"\x00")[0] in replaced:
            continue
        if kind == b"IEND":
            for keyword, text in texts.items():
                out.append(_chunk(b"tEXt", keyword.encode("latin-1") + b"\x00" + text.encode("latin-1")))
        out.append(_chunk(kind, body))
    return b"".join(out)


def minimal_png(width: int = 1, height: int = 1, rgb: tuple[int, int, int] = (200, 120, 90)) -> bytes:
    """A tiny valid RGB picture (for a card exported without one, and for tests)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\x00" + bytes(rgb) * width
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(row * height)) + _chunk(b"IEND", b"")
