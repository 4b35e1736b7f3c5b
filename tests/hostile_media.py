"""Hostile and ordinary media built in memory for the failure tests (tests/test_hostile_data.py,
tests/test_chaos.py): nothing here is downloaded."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import soundfile
from PIL import Image


def png_of_zeros(width: int, height: int) -> bytes:
    """A real, valid black RGB PNG of any size, built row by row (a few hundred KB for 100M pixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\0" * (1 + 3 * width)  # filter byte + RGB
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def flac_claiming(total_frames: int) -> bytes:
    """1 s of flac whose STREAMINFO header promises `total_frames` samples."""
    buf = io.BytesIO()
    soundfile.write(buf, np.zeros(16_000, np.float32), 16_000, format="FLAC")
    data = bytearray(buf.getvalue())
    word = int.from_bytes(data[18:26], "big")  # 20 bits rate, 3 channels, 5 bits/sample, 36 total
    data[18:26] = ((word & ~((1 << 36) - 1)) | total_frames).to_bytes(8, "big")
    data[26:42] = bytes(16)  # no MD5 to check against
    return bytes(data)


def wav(rate: int, seconds: float = 1.0, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, np.zeros((round(rate * seconds), channels), np.float32), rate, format="WAV")
    return buf.getvalue()


def tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(buf, format="TIFF")
    return buf.getvalue()


def png(i: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (10 * i, 100, 50)).save(buf, format="PNG")
    return buf.getvalue()
